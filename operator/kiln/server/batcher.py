"""Dynamic batching: many concurrent requests, one forward pass.

Requests (each one or more rows) wait in a queue. A single batcher coroutine takes the oldest
request, then adds queued requests until the batch holds ``max_batch_size`` rows, runs *one*
forward pass in an executor thread (so the event loop keeps serving), and hands each request its
slice of the result. A request with more rows than ``max_batch_size`` runs alone; a request never
is split.

When to stop waiting for more rows is adaptive, so that batching never costs an idle server
latency:

- whatever is queued when the batcher looks is always taken (under load, requests pile up while
  the previous forward pass runs, so batches form by themselves);
- the batcher *waits* for more only while other requests are known to be on their way (their
  handler has started: they are being read or parsed, see :meth:`DynamicBatcher.arrival`), or
  while recent forward passes show concurrent clients (they held :data:`CONCURRENT` requests or
  more on average: an exponential moving average, weight :data:`SMOOTHING`), and never longer
  than ``max_batch_delay`` after the oldest queued request arrived.

A lone request on a quiet server is therefore dispatched at once (no fixed delay is added), while
a burst of concurrent requests is gathered into one forward pass. When a burst ends, the average
falls below :data:`CONCURRENT` within a few forward passes (about eight from five requests per
pass), each of which waited at most ``max_batch_delay``; ``max_batch_delay=0`` never waits.

The second signal is what batches gRPC. ``grpc.aio`` accepts one call of a method per event-loop
turn and starts its handler only once the whole message is read, so a gRPC request is never seen
on its way (it is queued the moment it is announced) and concurrent calls reach the batcher one
at a time. With the first signal alone a forward pass held 1.2 gRPC requests at 32 concurrent
clients (REST: 11), and gRPC used twice REST's server CPU per request (``hack/bench-server``).

What is batched is a :data:`Tensors`: one array, or a mapping of input name to array (a model
with several inputs), every array with the same leading (batch) dimension, the request's row
count. Requests are concatenated along that dimension, so only requests whose arrays agree in
everything else (names, trailing shapes, dtypes: :func:`layout`) share a forward pass; the
outputs (an array or a mapping of arrays, each with the batch's rows first) are split back.

Where a forward pass runs: in the executor thread, unless the model has shown it is cheap. Handing
a batch to a thread and its result back costs the event loop a queue put, a thread wake-up and a
``call_soon_threadsafe`` (a self-pipe write), and under load the thread then waits for the GIL,
which the busy loop gives up only every switch interval (5 ms): for a forward pass of tens of
microseconds that is most of the work (``hack/bench-server``: the digits MLP at 32 concurrent
clients, 315 us of server CPU per request with every pass in the thread, 237 us inline). So with
``inline_below`` set, a forward pass whose recent CPU cost (``time.thread_time`` of the thread that
runs it: waiting for the GIL or for a core is not the model's cost; moving average, weight
:data:`SMOOTHING`) is under ``inline_below`` seconds runs on the event loop itself, blocking it
for about that long. Only for ``predict`` that computes and never waits: a forward pass that
waits on I/O costs little CPU and would block the loop for as long as it waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

#: A request's (or a batch's) tensors: one array, or input name -> array; rows first.
Tensors = np.ndarray | Mapping[str, np.ndarray]
Predict = Callable[[Tensors], Tensors]

log = logging.getLogger(__name__)

#: Requests per forward pass (moving average) from which clients are taken to be concurrent.
CONCURRENT = 1.5
#: Weight of the latest forward pass in that moving average.
SMOOTHING = 0.25


def rows(x: Tensors) -> int:
    """The leading (batch) dimension of ``x`` (that of its first array for a mapping)."""
    first = x if isinstance(x, np.ndarray) else next(iter(x.values()))
    return int(first.shape[0])


def layout(x: Tensors) -> tuple[object, ...]:
    """What must agree for two requests to be concatenated: names, trailing shapes, dtypes."""
    if isinstance(x, np.ndarray):
        return (x.shape[1:], x.dtype.str)
    return tuple((k, v.shape[1:], v.dtype.str) for k, v in x.items())


def concat(parts: list[Tensors]) -> Tensors:
    """``parts`` joined along the batch dimension (``parts[0]`` itself when alone)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)  # type: ignore[arg-type]
    return {k: np.concatenate([p[k] for p in parts]) for k in first}


def take(y: Tensors, start: int, stop: int) -> Tensors:
    """Rows ``start:stop`` of every array of ``y``."""
    if isinstance(y, np.ndarray):
        return y[start:stop]
    return {k: v[start:stop] for k, v in y.items()}


class BatcherClosedError(RuntimeError):
    """The batcher is stopped and accepts no more work."""


@dataclass
class _Item:
    rows: Tensors
    future: asyncio.Future[Tensors]
    enqueued_at: float
    n: int = field(init=False)
    layout: tuple[object, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.n = rows(self.rows)
        self.layout = layout(self.rows)


class Arrival:
    """A request that has started arriving: counted as "on its way" until it submits or leaves.

    Use as an async context manager around a request handler; :meth:`submit` queues the rows
    (at most once) and waits for their outputs.
    """

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher = batcher
        self._open = True
        batcher._expected += 1

    def close(self) -> None:
        """Stop counting this request as on its way (idempotent)."""
        if self._open:
            self._open = False
            self._batcher._expected -= 1
            self._batcher._changed.set()

    async def submit(self, rows: Tensors) -> Tensors:
        """Queue ``rows`` (:data:`Tensors`, ``n`` rows first) and return the model outputs for them."""
        self.close()
        return await self._batcher.submit(rows)

    async def __aenter__(self) -> Arrival:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class DynamicBatcher:
    """Gathers queued rows into batches for ``predict``, which runs in ``executor``.

    Args:
        predict: maps :data:`Tensors` of ``n`` rows to outputs of ``n`` rows (an array or a
            mapping of arrays); it runs in ``executor``, one call at a time.
        max_batch_size: most rows per forward pass (a single larger request still runs, alone).
        max_batch_delay: seconds; the longest a queued request waits for others to join it.
        executor: where ``predict`` runs (``None``: the loop's default executor).
        on_batch: called on the loop with the row count of every batch run (for metrics).
        inline_below: seconds; a forward pass whose recent CPU cost is below this runs on the
            event loop instead of ``executor`` (see the module doc); 0 always uses ``executor``.
            Only for a ``predict`` that never waits (on I/O, a lock, another process).
    """

    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int = 32,
        max_batch_delay: float = 0.002,
        executor: Executor | None = None,
        on_batch: Callable[[int], None] | None = None,
        inline_below: float = 0.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_batch_delay < 0:
            raise ValueError("max_batch_delay must be >= 0")
        if inline_below < 0:
            raise ValueError("inline_below must be >= 0")
        self._predict = predict
        self._max_batch_size = max_batch_size
        self._max_batch_delay = max_batch_delay
        self._executor = executor
        self._on_batch = on_batch
        self._pending: collections.deque[_Item] = collections.deque()
        self._pending_rows = 0
        self._expected = 0
        #: Moving average of the requests (not rows) per forward pass.
        self._requests_per_pass = 1.0
        self._inline_below = inline_below
        #: Moving average of a forward pass's CPU seconds (unknown until the first pass).
        self._pass_seconds = math.inf
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queued_rows(self) -> int:
        """Rows queued and not yet in a forward pass."""
        return self._pending_rows

    @property
    def concurrent(self) -> bool:
        """True while recent forward passes held several requests on average (see the module doc)."""
        return self._requests_per_pass >= CONCURRENT

    @property
    def inline(self) -> bool:
        """True while forward passes run on the event loop (see the module doc)."""
        return self._pass_seconds < self._inline_below

    @property
    def idle(self) -> bool:
        """True when nothing is queued or arriving (a forward pass may still be finishing)."""
        return not self._pending and self._expected == 0

    def start(self) -> None:
        """Start the batcher coroutine on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kiln-batcher")

    async def stop(self) -> None:
        """Refuse new work, finish everything queued, then stop the batcher coroutine."""
        self._closing = True
        self._changed.set()
        if self._task is not None:
            await self._task
            self._task = None

    def arrival(self) -> Arrival:
        """Announce a request whose rows will follow (see :class:`Arrival`)."""
        return Arrival(self)

    async def submit(self, rows: Tensors) -> Tensors:
        """Queue ``rows`` and wait for their outputs.

        Raises:
            BatcherClosedError: when the batcher is stopped.
            Exception: whatever ``predict`` raised for the batch these rows were in.
        """
        if self._closing or self._task is None:
            raise BatcherClosedError("the model server is shutting down")
        loop = asyncio.get_running_loop()
        item = _Item(rows, loop.create_future(), loop.time())
        self._pending.append(item)
        self._pending_rows += item.n
        self._changed.set()
        return await item.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._changed.clear()
                await self._changed.wait()
                continue
            deadline = self._pending[0].enqueued_at + self._max_batch_delay
            while (
                self._pending_rows < self._max_batch_size
                and (self._expected > 0 or self.concurrent)
                and not self._closing
            ):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._changed.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                except TimeoutError:
                    break
            await self._run_batch(self._take_batch())

    def _take_batch(self) -> list[_Item]:
        batch = [self._pending.popleft()]
        n = batch[0].n
        while (
            self._pending
            and n + self._pending[0].n <= self._max_batch_size
            and self._pending[0].layout == batch[0].layout
        ):
            item = self._pending.popleft()
            batch.append(item)
            n += item.n
        self._pending_rows -= n
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = [it for it in batch if not it.future.done()]  # a cancelled caller needs no rows
        if not live:
            return
        self._requests_per_pass += SMOOTHING * (len(live) - self._requests_per_pass)
        x = concat([it.rows for it in live])
        if self._on_batch is not None:
            self._on_batch(rows(x))
        try:
            y = await self._forward(x)
        except Exception as e:
            for it in live:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        start = 0
        for it in live:
            with contextlib.suppress(asyncio.InvalidStateError):
                it.future.set_result(take(y, start, start + it.n))
            start += it.n

    async def _forward(self, x: Tensors) -> Tensors:
        """One forward pass over ``x``: on the loop while :attr:`inline`, else in the executor."""
        was = self.inline
        if was:
            y, seconds = self._timed(x)
        else:
            y, seconds = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, x)
        if math.isinf(self._pass_seconds):
            self._pass_seconds = seconds
        else:
            self._pass_seconds += SMOOTHING * (seconds - self._pass_seconds)
        if self.inline != was:
            log.debug(
                "forward passes now run %s: they cost %.0f us of CPU on average (threshold %.0f us)",
                "on the event loop" if self.inline else "in a thread",
                self._pass_seconds * 1e6,
                self._inline_below * 1e6,
            )
        return y

    def _timed(self, x: Tensors) -> tuple[Tensors, float]:
        """``predict(x)`` and the CPU seconds the calling thread spent in it."""
        started = time.thread_time()
        y = self._predict(x)
        return y, time.thread_time() - started
