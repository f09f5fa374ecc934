"""The keyed work queue: one run per key at a time, coalescing, requeue and error back-off."""

from __future__ import annotations

import asyncio
import itertools
import threading

from kiln.controllers.runtime import Result, WorkQueue


async def _until(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


def test_events_during_a_run_coalesce_into_one_more_run():
    async def main():
        calls: list[str] = []
        gate = threading.Event()
        active = {"n": 0, "max": 0}

        def reconcile(ns, name):
            active["n"] += 1
            active["max"] = max(active["max"], active["n"])
            calls.append(name)
            if len(calls) == 1:
                gate.wait(5)
            active["n"] -= 1
            return None

        q = WorkQueue("T", reconcile, workers=4)
        q.enqueue(("ns", "a"))
        await _until(lambda: len(calls) == 1)
        for _ in range(10):
            q.enqueue(("ns", "a"))
        gate.set()
        await _until(lambda: not q.keys_in_flight())
        await q.close()
        assert calls == ["a", "a"] and active["max"] == 1

    asyncio.run(main())


def test_requeue_after_runs_again():
    async def main():
        calls: list[float] = []
        loop = asyncio.get_running_loop()

        def reconcile(ns, name):
            calls.append(loop.time())
            return Result(requeue_after=0.05) if len(calls) < 3 else None

        q = WorkQueue("T", reconcile)
        q.enqueue(("ns", "a"))
        await _until(lambda: len(calls) == 3)
        await q.close()
        assert calls[1] - calls[0] >= 0.04 and calls[2] - calls[1] >= 0.04

    asyncio.run(main())


def test_errors_retry_with_backoff_and_reset_on_success():
    async def main():
        calls: list[float] = []
        loop = asyncio.get_running_loop()

        def reconcile(ns, name):
            calls.append(loop.time())
            if len(calls) <= 2:
                raise RuntimeError("API down")
            return None

        q = WorkQueue("T", reconcile)
        q.enqueue(("ns", "a"))
        await _until(lambda: len(calls) == 3, timeout=10)
        await q.close()
        # back-off of 1 s then 2 s (2^(n-1))
        assert calls[1] - calls[0] >= 0.9 and calls[2] - calls[1] >= 1.9
        assert ("ns", "a") not in q._failures

    asyncio.run(main())


def test_earlier_delayed_request_wins():
    async def main():
        calls: list[str] = []
        q = WorkQueue("T", lambda ns, name: calls.append(name))
        q.enqueue(("ns", "a"), delay=10)
        q.enqueue(("ns", "a"), delay=0.02)
        await _until(lambda: calls == ["a"])
        await q.close()

    asyncio.run(main())


def test_object_gone_mid_reconcile_is_not_an_error():
    from kiln.kube import Gone

    async def main():
        calls: list[str] = []

        def reconcile(ns, name):
            calls.append(name)
            raise Gone("TrainingJob ns/a")

        q = WorkQueue("T", reconcile)
        q.enqueue(("ns", "a"))
        await _until(lambda: calls and not q.keys_in_flight())
        await q.close()
        assert calls == ["a"] and ("ns", "a") not in q._failures

    asyncio.run(main())


def test_conflict_reruns_at_once_and_is_not_an_error():
    """A 409 from a write guarded by resourceVersion: another run right away, no back-off, no error."""
    from kiln.kube import Conflict
    from kiln.metrics import RECONCILE_ERRORS, RECONCILE_TOTAL

    async def main():
        calls: list[float] = []
        loop = asyncio.get_running_loop()
        errors = RECONCILE_ERRORS.labels("C")._value.get()
        conflicts = RECONCILE_TOTAL.labels("C", "conflict")._value.get()

        def reconcile(ns, name):
            calls.append(loop.time())
            if len(calls) == 1:
                raise Conflict("the object has been modified")
            return None

        q = WorkQueue("C", reconcile)
        q.enqueue(("ns", "a"))
        await _until(lambda: len(calls) == 2 and not q.keys_in_flight())
        await q.close()
        assert calls[1] - calls[0] < 0.5  # not the 1 s error back-off
        assert ("ns", "a") not in q._failures
        assert RECONCILE_ERRORS.labels("C")._value.get() == errors
        assert RECONCILE_TOTAL.labels("C", "conflict")._value.get() == conflicts + 1

    asyncio.run(main())


def test_conflicts_in_a_row_slow_down():
    """A key that keeps conflicting re-runs at once a few times, then with a growing delay."""
    from kiln.controllers.runtime import IMMEDIATE_CONFLICT_RERUNS
    from kiln.kube import Conflict

    async def main():
        calls: list[float] = []
        loop = asyncio.get_running_loop()

        def reconcile(ns, name):
            calls.append(loop.time())
            if len(calls) <= IMMEDIATE_CONFLICT_RERUNS + 2:
                raise Conflict("the object has been modified")
            return None

        q = WorkQueue("C2", reconcile)
        q.enqueue(("ns", "a"))
        await _until(lambda: len(calls) == IMMEDIATE_CONFLICT_RERUNS + 3 and not q.keys_in_flight())
        await q.close()
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        first_delayed = gaps[IMMEDIATE_CONFLICT_RERUNS]
        assert max(gaps[:IMMEDIATE_CONFLICT_RERUNS]) < first_delayed  # the first ones at once
        assert first_delayed >= 0.19 and gaps[IMMEDIATE_CONFLICT_RERUNS + 1] >= 0.39
        assert ("ns", "a") not in q._conflicts

    asyncio.run(main())


def test_rejected_child_backs_off_without_traceback(caplog):
    from kubernetes.client.rest import ApiException

    from kiln.kube import Rejected

    pod = {"kind": "Pod", "metadata": {"name": "a-node-0", "namespace": "ns"}}
    denied = ApiException(status=403, reason="Forbidden", body='{"message": "exceeded quota: q"}')

    async def main():
        calls: list[float] = []
        loop = asyncio.get_running_loop()

        def reconcile(ns, name):
            calls.append(loop.time())
            raise Rejected(pod, denied)

        q = WorkQueue("T", reconcile)
        q.enqueue(("ns", "a"))
        await _until(lambda: len(calls) == 2, timeout=5)
        await q.close()
        assert calls[1] - calls[0] >= 0.9  # the error back-off, not a hot loop
        assert q._failures[("ns", "a")] >= 1

    with caplog.at_level("WARNING", logger="kiln.runtime"):
        asyncio.run(main())
    records = [r for r in caplog.records if r.name == "kiln.runtime"]
    assert records and all(r.exc_info is None for r in records)
    assert (
        "Pod a-node-0 rejected by the API server (403 Forbidden): exceeded quota: q"
        in records[0].getMessage()
    )


def test_a_paused_queue_records_work_and_resume_reconciles_every_known_object_once():
    async def main():
        calls: list[str] = []
        q = WorkQueue("T", lambda ns, name: calls.append(name), paused=True)
        for name in ("a", "b", "gone"):
            q.observe(("ns", name), f"uid-{name}")
        q.observe(("ns", "gone"), "uid-gone", deleted=True)
        q.enqueue(("ns", "a"))
        q.enqueue(("ns", "a"))
        q.enqueue(("ns", "child-event-parent"))  # enqueued by a child's event only
        q.enqueue(("ns", "b"), delay=0.01)
        await asyncio.sleep(0.1)
        assert calls == [] and q.paused  # a follower never reconciles
        q.resume()
        await _until(lambda: len(calls) == 3 and not q.keys_in_flight())
        await asyncio.sleep(0.05)
        await q.close()
        assert sorted(calls) == ["a", "b", "child-event-parent"]

    asyncio.run(main())


def test_pause_stops_new_runs_and_moves_timers_and_reruns_to_resume():
    async def main():
        calls: list[str] = []
        gate = threading.Event()

        def reconcile(ns, name):
            calls.append(name)
            if name == "a" and calls.count("a") == 1:
                gate.wait(5)
            return Result(requeue_after=0.5) if name == "t" and calls.count("t") == 1 else None

        q = WorkQueue("T", reconcile)
        q.enqueue(("ns", "t"))
        await _until(lambda: calls.count("t") == 1 and not q.keys_in_flight())
        q.enqueue(("ns", "a"))
        await _until(lambda: "a" in calls)
        q.enqueue(("ns", "a"))  # would rerun after the run in flight
        q.pause()  # e.g. leadership lost
        gate.set()
        await _until(lambda: not q.keys_in_flight())
        await asyncio.sleep(0.6)  # past t's requeue time
        assert calls == ["t", "a"]  # no rerun of a, no requeue of t while paused
        q.resume()
        await _until(lambda: calls.count("t") == 2 and calls.count("a") == 2)
        await q.close()

    asyncio.run(main())


def test_not_leader_stops_a_reconcile_without_error_or_back_off():
    from kiln.leaderelection import NotLeader

    async def main():
        calls: list[str] = []

        def reconcile(ns, name):
            calls.append(name)
            raise NotLeader("PATCH refused: this replica is not the leader")

        q = WorkQueue("T", reconcile)
        q.enqueue(("ns", "a"))
        await _until(lambda: calls and not q.keys_in_flight())
        await asyncio.sleep(0.05)
        await q.close()
        assert calls == ["a"] and ("ns", "a") not in q._failures and not q._timers

    asyncio.run(main())


def test_every_line_logged_during_a_reconcile_names_the_object(caplog):
    import logging

    from kiln.logs import ObjectContextFilter

    async def main():
        def reconcile(ns, name):
            logging.getLogger("kiln.anything").warning("inside the reconcile of %s", name)

        q = WorkQueue("TrainingJob", reconcile)
        q.observe(("ns", "a"), "uid-a")
        q.enqueue(("ns", "a"))
        await _until(lambda: caplog.records and not q.keys_in_flight())
        await q.close()
        logging.getLogger("kiln.anything").warning("outside")

    caplog.handler.addFilter(ObjectContextFilter())
    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    inside, outside = caplog.records
    assert (inside.kiln_kind, inside.kiln_namespace, inside.kiln_name, inside.kiln_uid) == (
        "TrainingJob",
        "ns",
        "a",
        "uid-a",
    )
    assert not hasattr(outside, "kiln_name")
