"""The dynamic batcher and the output cache, in-process."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("torch")  # the serve extra (torch, numpy, aiohttp, safetensors)

import numpy as np

from kiln.server.batcher import BatcherClosedError, DynamicBatcher
from kiln.server.cache import OutputCache

pytestmark = pytest.mark.torch


class Recorder:
    """A fake model: output = 2 * rows; records batch sizes and the threads it ran on."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.delay = delay

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(x.shape[0])
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        return x * 2


def rows(n: int, start: float = 0.0) -> np.ndarray:
    return np.arange(start, start + n * 2, dtype=np.float32).reshape(n, 2)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_submissions_share_a_forward_pass_and_get_their_own_rows() -> None:
    rec = Recorder()

    async def go() -> None:
        b = DynamicBatcher(rec, max_batch_size=32, max_batch_delay=0.05)
        b.start()
        inputs = [rows(1 + i % 3, 100.0 * i) for i in range(10)]
        outs = await asyncio.gather(*(b.submit(x) for x in inputs))
        for x, y in zip(inputs, outs, strict=True):
            np.testing.assert_array_equal(y, x * 2)
        await b.stop()

    run(go())
    assert rec.batches == [sum(1 + i % 3 for i in range(10))]  # all 19 rows in one forward pass
    assert threading.get_ident() not in rec.threads  # the forward pass ran off the event loop


def test_batches_respect_max_rows_and_big_requests_run_alone() -> None:
    rec = Recorder()

    async def go() -> None:
        b = DynamicBatcher(rec, max_batch_size=4, max_batch_delay=0.05)
        b.start()
        sizes = [3, 2, 1, 1, 9, 1]
        outs = await asyncio.gather(*(b.submit(rows(n)) for n in sizes))
        assert [o.shape[0] for o in outs] == sizes
        await b.stop()

    run(go())
    assert rec.batches == [3, 4, 9, 1]  # FIFO: [3], [2,1,1], [9] alone, [1]


def test_lone_request_is_not_delayed() -> None:
    """With nothing else arriving, the batcher dispatches at once, not after max_batch_delay."""
    rec = Recorder()

    async def go() -> float:
        b = DynamicBatcher(rec, max_batch_size=32, max_batch_delay=2.0)
        b.start()
        t = time.perf_counter()
        await b.submit(rows(1))
        elapsed = time.perf_counter() - t
        await b.stop()
        return elapsed

    assert run(go()) < 0.5


def test_waits_for_announced_arrivals_up_to_the_delay() -> None:
    rec = Recorder()

    async def go() -> None:
        b = DynamicBatcher(rec, max_batch_size=32, max_batch_delay=1.0)
        b.start()
        late = b.arrival()  # a request whose body is still being read

        async def arrive_later() -> np.ndarray:
            await asyncio.sleep(0.05)
            return await late.submit(rows(2))

        first = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.gather(first, arrive_later())
        # An announced request that leaves without submitting stops the wait early.
        gone = b.arrival()
        t = time.perf_counter()
        task = asyncio.ensure_future(b.submit(rows(1)))
        await asyncio.sleep(0.05)
        gone.close()
        await task
        assert time.perf_counter() - t < 0.5
        await b.stop()

    run(go())
    assert rec.batches == [3, 1]


def test_max_batch_delay_bounds_the_wait() -> None:
    rec = Recorder()

    async def go() -> float:
        b = DynamicBatcher(rec, max_batch_size=32, max_batch_delay=0.05)
        b.start()
        never = b.arrival()  # announced but never submits
        t = time.perf_counter()
        await b.submit(rows(1))
        elapsed = time.perf_counter() - t
        never.close()
        await b.stop()
        return elapsed

    assert 0.04 <= run(go()) < 1.0
    assert rec.batches == [1]


async def concurrent_passes(b: DynamicBatcher, passes: int, requests: int) -> None:
    """``passes`` forward passes of ``requests`` concurrent one-row requests each."""
    for _ in range(passes):
        await asyncio.gather(*(b.submit(rows(1)) for _ in range(requests)))


def test_after_concurrent_passes_an_unannounced_request_waits_for_company() -> None:
    """gRPC requests are queued the moment they are seen: after passes that held several requests,
    the batcher waits (at most max_batch_delay) for more instead of running a pass per request."""
    rec = Recorder()

    async def go() -> None:
        b = DynamicBatcher(rec, max_batch_size=32, max_batch_delay=1.0)
        b.start()
        await concurrent_passes(b, 2, 4)
        assert b.concurrent

        async def later() -> np.ndarray:
            await asyncio.sleep(0.05)
            return await b.submit(rows(1))

        t = time.perf_counter()
        await asyncio.gather(b.submit(rows(1)), later(), later())
        assert time.perf_counter() - t >= 0.9  # the wait ran to the delay: nobody announced a stop
        await b.stop()

    run(go())
    assert rec.batches == [4, 4, 3]


def test_the_wait_ends_a_few_passes_after_the_burst() -> None:
    rec = Recorder()

    async def go() -> list[tuple[bool, float]]:
        b = DynamicBatcher(rec, max_batch_size=32, max_batch_delay=0.05)
        b.start()
        await concurrent_passes(b, 3, 5)
        steps = []
        for _ in range(12):  # one client now: each request alone
            concurrent = b.concurrent
            t = time.perf_counter()
            await b.submit(rows(1))
            steps.append((concurrent, time.perf_counter() - t))
        await b.stop()
        return steps

    steps = run(go())
    # The moving average of requests per pass (3.3 after the burst) falls below 1.5 in 6 passes.
    assert [c for c, _ in steps] == [True] * 6 + [False] * 6
    assert all(w >= 0.045 for c, w in steps if c)  # each of those waited out the delay
    assert rec.batches == [5, 5, 5] + [1] * 12


def test_no_delay_never_waits_even_when_concurrent() -> None:
    rec = Recorder()

    async def go() -> float:
        b = DynamicBatcher(rec, max_batch_size=32, max_batch_delay=0.0)
        b.start()
        await concurrent_passes(b, 2, 4)
        t = time.perf_counter()
        await b.submit(rows(1))
        elapsed = time.perf_counter() - t
        await b.stop()
        return elapsed

    assert run(go()) < 0.5


def test_requests_queue_while_a_forward_pass_runs() -> None:
    rec = Recorder(delay=0.05)

    async def go() -> None:
        with ThreadPoolExecutor(1) as pool:
            b = DynamicBatcher(rec, max_batch_size=64, max_batch_delay=0.0, executor=pool)
            b.start()
            first = asyncio.ensure_future(b.submit(rows(1)))
            await asyncio.sleep(0.01)  # the first forward pass is running now
            rest = [asyncio.ensure_future(b.submit(rows(1))) for _ in range(20)]
            await asyncio.gather(first, *rest)
            await b.stop()

    run(go())
    assert rec.batches == [1, 20]


def test_forward_errors_reach_every_caller_and_the_batcher_survives() -> None:
    calls = 0

    def flaky(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return x

    async def go() -> None:
        b = DynamicBatcher(flaky, max_batch_size=8, max_batch_delay=0.01)
        b.start()
        results = await asyncio.gather(b.submit(rows(1)), b.submit(rows(1)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        np.testing.assert_array_equal(await b.submit(rows(1)), rows(1))
        await b.stop()
        with pytest.raises(BatcherClosedError):
            await b.submit(rows(1))

    run(go())


def test_stop_finishes_queued_work() -> None:
    rec = Recorder(delay=0.02)

    async def go() -> None:
        b = DynamicBatcher(rec, max_batch_size=2, max_batch_delay=0.0)
        b.start()
        futures = [asyncio.ensure_future(b.submit(rows(1))) for _ in range(6)]
        await asyncio.sleep(0)
        await b.stop()
        assert all(f.done() and f.exception() is None for f in futures)

    run(go())
    assert sum(rec.batches) == 6


def test_output_cache_is_a_bounded_lru() -> None:
    c = OutputCache(2, "3")
    keys = [c.key(rows(1, i)) for i in range(3)]
    assert len(set(keys)) == 3
    assert c.key(rows(1, 0)) == keys[0]  # deterministic
    assert OutputCache(2, "4").key(rows(1, 0)) != keys[0]  # the version is part of the key
    assert c.key(rows(1, 0).reshape(2, 1)) != keys[0]  # so is the shape
    c.put(keys[0], rows(1, 0))
    c.put(keys[1], rows(1, 1))
    assert c.get(keys[0]) is not None  # 0 is now the most recently used
    c.put(keys[2], rows(1, 2))
    assert len(c) == 2 and c.get(keys[1]) is None and c.get(keys[0]) is not None
    value = c.get(keys[2])
    assert value is not None and not value.flags.writeable
    off = OutputCache(0, "3")
    off.put(keys[0], rows(1))
    assert not off.enabled and off.get(keys[0]) is None and len(off) == 0


class Timed:
    """A model whose forward pass burns ``cpu`` seconds of CPU; records the thread of each pass."""

    def __init__(self, cpu: float = 0.0) -> None:
        self.cpu = cpu
        self.threads: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.get_ident())
        end = time.thread_time() + self.cpu
        while time.thread_time() < end:
            pass
        return x


async def sequential_passes(b: DynamicBatcher, n: int) -> int:
    """``n`` forward passes one after the other; returns the event loop's thread."""
    b.start()
    for _ in range(n):
        await b.submit(rows(1))
    await b.stop()
    return threading.get_ident()


def test_cheap_forward_passes_run_on_the_event_loop_after_the_first() -> None:
    model = Timed()
    loop_thread = run(sequential_passes(DynamicBatcher(model, max_batch_delay=0.0, inline_below=0.01), 6))
    assert model.threads[0] != loop_thread  # unknown cost: the executor measures it
    assert model.threads[1:] == [loop_thread] * 5


def test_no_inline_threshold_always_uses_the_executor() -> None:
    model = Timed()
    loop_thread = run(sequential_passes(DynamicBatcher(model, max_batch_delay=0.0), 4))
    assert loop_thread not in model.threads


def test_forward_passes_costing_more_than_the_threshold_stay_in_the_executor() -> None:
    model = Timed(cpu=0.02)
    loop_thread = run(sequential_passes(DynamicBatcher(model, max_batch_delay=0.0, inline_below=0.005), 4))
    assert loop_thread not in model.threads


def test_a_model_that_gets_costly_goes_back_to_the_executor() -> None:
    model = Timed()
    b = DynamicBatcher(model, max_batch_delay=0.0, inline_below=0.005)

    async def go() -> int:
        b.start()
        for _ in range(3):
            await b.submit(rows(1))
        model.cpu = 0.02  # now 20 ms per pass: one of those lifts the average (weight 1/4) over 5 ms
        for _ in range(4):
            await b.submit(rows(1))
        await b.stop()
        return threading.get_ident()

    loop_thread = run(go())
    assert [t == loop_thread for t in model.threads] == [False, True, True, True, False, False, False]
    assert not b.inline


def test_inline_forward_errors_reach_the_callers() -> None:
    calls = 0

    def flaky(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first inline pass
            raise RuntimeError("boom")
        return x

    async def go() -> None:
        b = DynamicBatcher(flaky, max_batch_delay=0.0, inline_below=0.01)
        b.start()
        await b.submit(rows(1))
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(rows(1))
        np.testing.assert_array_equal(await b.submit(rows(1)), rows(1))
        assert b.inline
        await b.stop()

    run(go())


@pytest.mark.parametrize(("hook", "inline"), [("", True), ("digits_hooks:Scale", False)])
def test_kiln_serve_runs_cheap_passes_inline_unless_a_hook_may_wait(
    make_server, digits_artifact, hook, inline
):
    """kiln-serve hands the batcher its threshold; a model hook (which may wait on I/O) keeps
    every pass in the executor. The threshold is set far above any pass, so the machine's
    speed decides nothing here."""
    from .test_server_drift import infer

    server = make_server(model_hook=hook, inline_forward_below_us=1e6)
    for chunk in np.array_split(digits_artifact.x_test[:20], 5):
        infer(server.url, chunk)
    assert server.server.core.batcher.inline is inline
