"""The reconcile loop: kopf watches, a keyed work queue reconciles.

kopf does the watching (with re-listing, back-off, peering, probes and logging); every watch
event of a parent object or of a child labelled with its parent's name only *enqueues* the
parent's key. A per-kind :class:`WorkQueue` then runs the kind's level-based ``reconcile(ns,
name)`` function, in a worker thread, at most once at a time per object, in the manner of
controller-runtime's workqueue:

- events arriving while an object is being reconciled coalesce into one more run;
- a reconcile returns :class:`Result` with ``requeue_after`` for time-based work (back-off,
  deadlines, TTLs, rollout pauses, analysis intervals);
- :class:`kiln.kube.Conflict` (HTTP 409 from a write guarded by ``resourceVersion``, see
  :mod:`kiln.status`) means another writer got there first and nothing was written: the key
  runs again at once from a fresh read, counted as ``result="conflict"``, not logged as an error
  (after :data:`IMMEDIATE_CONFLICT_RERUNS` conflicts in a row, with a short growing delay, so
  writers that keep colliding spread out instead of hammering the API server);
- any other exception is logged, counted and retried with per-object exponential back-off; a
  child the API server refused (:class:`kiln.kube.Rejected`, already reported on the parent by
  :mod:`kiln.controllers.rejections`) is logged in one line, without a traceback;
- every log line written during a reconcile names the object (:func:`kiln.logs.bind`);
- with leader election, a queue is *paused* while this replica is not the leader: watch events
  still arrive and only record which objects exist; on :meth:`WorkQueue.resume` (this replica
  became the leader) every known object is reconciled once, then events flow as usual;
- a controller may record its own writes (:meth:`WatchCache.wrote`): the watch event that only
  echoes one of them (same object, same resourceVersion) enqueues nothing, since the reconcile
  that wrote it decided from everything that event shows (a write raced by another writer is a
  409, never an echo); and a kind watched with ``cached=True`` keeps each object as its watch
  last delivered it (:meth:`WatchCache.get`), so a reconcile can skip the GET unless one of its
  own writes to that object is not in the watch yet. This is controller-runtime's informer
  cache with its "expectations", for the parent objects only: children are still listed live.

Why not kopf's ``on.create/update`` and ``@kopf.timer``: timers make kopf put a finalizer on
every object (deletion then hangs whenever the operator is down), and kopf's per-handler
progress bookkeeping is edge-triggered; reconciling the whole object from its current state is
simpler to reason about and survives operator restarts without a special path.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kopf

from kiln import logs
from kiln.kube import Conflict, Gone, Rejected
from kiln.leaderelection import NotLeader
from kiln.metrics import QUEUE_DEPTH, RECONCILE_DURATION, RECONCILE_ERRORS, RECONCILE_TOTAL

log = logging.getLogger("kiln.runtime")

Key = tuple[str, str]  # (namespace, name)

#: Conflicts in a row that re-run a key at once; later ones wait 0.1 s * 2^k (capped at 5 s).
IMMEDIATE_CONFLICT_RERUNS = 3
#: How long a write of ours waits for its echo in the watch (:class:`WatchCache`); after that the
#: object is read live again (an echo can be missed when kopf re-lists after a broken watch).
ECHO_SECONDS = 30.0

ObjectKey = tuple[str, str, str]  # (plural, namespace, name)


@dataclass(frozen=True)
class Result:
    """What a reconcile asks for next: nothing, or another run after ``requeue_after`` seconds."""

    requeue_after: float | None = None


ReconcileFn = Callable[[str, str], Result | None]


class WorkQueue:
    """Per-kind keyed queue running ``reconcile`` with at most one run per key at a time.

    Args:
        kind: the kind's name, for logs and metrics.
        reconcile: ``reconcile(namespace, name) -> Result | None``; runs in a thread.
        workers: runs in flight at once across keys.
        max_backoff: cap of the error back-off, in seconds (it starts at 1 s and doubles).
        paused: start paused (a replica that is not, or not yet, the leader).
    """

    def __init__(
        self,
        kind: str,
        reconcile: ReconcileFn,
        *,
        workers: int = 8,
        max_backoff: float = 300.0,
        paused: bool = False,
    ) -> None:
        self.kind = kind
        self._reconcile = reconcile
        self._sem = asyncio.Semaphore(workers)
        self._max_backoff = max_backoff
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[Key, int] = {}
        self._conflicts: dict[Key, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        # Reconciles block on API calls: give them their own threads (asyncio's default executor
        # has only min(32, cores + 4) threads shared with everything else).
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"kiln-{kind.lower()}")
        self._closed = False
        self._paused = paused
        self._pending: set[Key] = set()  # enqueued while paused
        self._known: dict[Key, str | None] = {}  # objects of this kind seen by the watch -> uid

    def observe(self, key: Key, uid: str | None, deleted: bool = False) -> None:
        """Record that an object of this kind exists (with its uid, for logs) or was deleted."""
        if deleted:
            self._known.pop(key, None)
        else:
            self._known[key] = uid

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Start no more runs (runs in flight finish); timers and new requests wait for resume."""
        self._paused = True
        for key, (_, handle) in self._timers.items():
            handle.cancel()
            self._pending.add(key)
        self._timers.clear()

    def resume(self) -> None:
        """Run everything requested while paused and every known object once, then flow as usual."""
        if not self._paused:
            return
        self._paused = False
        keys, self._pending = self._pending | set(self._known), set()
        for key in sorted(keys):
            self.enqueue(key)

    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        """Reconcile ``key`` after ``delay`` seconds (0: now). An earlier request wins."""
        if self._closed:
            return
        if self._paused:
            self._pending.add(key)
            return
        if delay > 0:
            due = self._loop.time() + delay
            current = self._timers.get(key)
            if current and current[0] <= due:
                return
            if current:
                current[1].cancel()
            self._timers[key] = (due, self._loop.call_later(delay, self._fire, key))
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        QUEUE_DEPTH.labels(self.kind).inc()
        task = self._loop.create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def enqueue_threadsafe(self, key: Key, delay: float = 0.0) -> None:
        """:meth:`enqueue` from another thread (e.g. from inside a reconcile)."""
        self._loop.call_soon_threadsafe(self.enqueue, key, delay)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.enqueue(key)

    async def _run(self, key: Key) -> None:
        try:
            while True:
                self._dirty.discard(key)
                async with self._sem:
                    result, failed = await self._once(key)
                if key not in self._dirty:
                    break
                if self._paused:
                    self._pending.add(key)
                    break
            if failed:
                n = self._failures.get(key, 0) + 1
                self._failures[key] = n
                self.enqueue_later(key, min(self._max_backoff, 2.0 ** (n - 1)))
            else:
                self._failures.pop(key, None)
                if result and result.requeue_after is not None:
                    self.enqueue_later(key, max(0.05, result.requeue_after))
        finally:
            self._running.discard(key)
            QUEUE_DEPTH.labels(self.kind).dec()

    def enqueue_later(self, key: Key, delay: float) -> None:
        # Called while key is still marked running: schedule a timer (not a dirty rerun).
        self._loop.call_soon(self.enqueue, key, delay)

    async def _once(self, key: Key) -> tuple[Result | None, bool]:
        ns, name = key
        t0 = time.perf_counter()
        ref = logs.ObjectRef(self.kind, ns, name, self._known.get(key))
        try:
            result = await self._loop.run_in_executor(self._executor, self._call, ref)
        except NotLeader as e:
            # Leadership was lost mid-reconcile: the write was refused. The new leader redoes it.
            RECONCILE_TOTAL.labels(self.kind, "not-leader").inc()
            log.info("reconcile of %s %s/%s stopped: %s", self.kind, ns, name, e)
            return None, False
        except Gone:
            # Deleted between the read and a write: nothing left to reconcile (children go with
            # it through their ownerReferences).
            RECONCILE_TOTAL.labels(self.kind, "gone").inc()
            self._conflicts.pop(key, None)
            return None, False
        except Conflict:
            # Another writer changed the object since our read; nothing was written. Decide
            # again from a fresh read, now (marking the key dirty makes _run loop once more).
            RECONCILE_TOTAL.labels(self.kind, "conflict").inc()
            n = self._conflicts.get(key, 0) + 1
            self._conflicts[key] = n
            if n <= IMMEDIATE_CONFLICT_RERUNS:
                self._dirty.add(key)
                return None, False
            return Result(requeue_after=min(5.0, 0.1 * 2 ** (n - IMMEDIATE_CONFLICT_RERUNS))), False
        except Rejected as e:
            RECONCILE_TOTAL.labels(self.kind, "rejected").inc()
            log.warning("reconcile of %s %s/%s: %s; retrying with back-off", self.kind, ns, name, e)
            self._conflicts.pop(key, None)
            return None, True
        except Exception:
            RECONCILE_ERRORS.labels(self.kind).inc()
            RECONCILE_TOTAL.labels(self.kind, "error").inc()
            log.exception("reconcile of %s %s/%s failed; retrying with back-off", self.kind, ns, name)
            self._conflicts.pop(key, None)
            return None, True
        finally:
            RECONCILE_DURATION.labels(self.kind).observe(time.perf_counter() - t0)
        self._conflicts.pop(key, None)
        RECONCILE_TOTAL.labels(
            self.kind, "requeue" if result and result.requeue_after is not None else "success"
        ).inc()
        return result, False

    def _call(self, ref: logs.ObjectRef) -> Result | None:
        with logs.bind(ref):  # in the worker thread: every line it logs names the object
            return self._reconcile(ref.namespace, ref.name)

    def keys_in_flight(self) -> set[Key]:
        """Keys being reconciled now (for tests and debugging)."""
        return set(self._running)

    async def close(self) -> None:
        """Stop accepting work, cancel timers and wait for in-flight runs."""
        self._closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False)


class Queues:
    """The operator's work queues by kind, created on kopf's startup in its event loop."""

    def __init__(self) -> None:
        self._by_kind: dict[str, WorkQueue] = {}
        self._lock = threading.Lock()

    def add(self, queue: WorkQueue) -> None:
        with self._lock:
            self._by_kind[queue.kind] = queue

    def get(self, kind: str) -> WorkQueue | None:
        return self._by_kind.get(kind)

    def all(self) -> list[WorkQueue]:
        return list(self._by_kind.values())

    def clear(self) -> None:
        self._by_kind.clear()

    def pause_all(self) -> None:
        """Pause every queue (this replica stopped leading). Call in the event loop's thread."""
        for q in self.all():
            q.pause()

    def resume_all(self) -> None:
        """Resume every queue (this replica leads). Call in the event loop's thread."""
        for q in self.all():
            q.resume()


QUEUES = Queues()


class WatchCache:
    """Objects as their watch last delivered them, and this process's writes not yet delivered.

    Thread-safe: :meth:`wrote` and :meth:`get` run in reconcile threads, :meth:`observe` in the
    event loop. Objects are stored only for the plurals given to :meth:`cache`.

    Args:
        ttl: seconds a write waits for its echo (see :data:`ECHO_SECONDS`).
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, ttl: float = ECHO_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._cached: set[str] = set()
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self._pending: dict[ObjectKey, dict[str, float]] = {}  # key -> {resourceVersion: deadline}

    def cache(self, plural: str) -> None:
        """Keep the objects of ``plural`` that :meth:`observe` sees."""
        self._cached.add(plural)

    def wrote(self, plural: str, obj: dict[str, Any] | None) -> None:
        """Record a write of ours: ``obj`` as the API server returned it (None: nothing written)."""
        if not obj:
            return
        key, rv = _object_key(plural, obj), obj["metadata"].get("resourceVersion")
        if rv:
            with self._lock:
                self._pending.setdefault(key, {})[rv] = self._clock() + self._ttl

    def observe(self, plural: str, obj: Mapping[str, Any], deleted: bool = False) -> bool:
        """Record a watch event of ``obj``; True when it only echoes a write of ours."""
        key, rv = _object_key(plural, obj), obj["metadata"].get("resourceVersion")
        with self._lock:
            if plural in self._cached:
                if deleted:
                    self._objects.pop(key, None)
                else:
                    self._objects[key] = obj
            pending = self._pending.get(key)
            echo = pending is not None and not deleted and pending.pop(rv, None) is not None
            if deleted or (pending is not None and not pending):
                self._pending.pop(key, None)
            return echo

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A deep copy of the object as last delivered; None when not cached (not seen, deleted,
        or not a cached plural) or when a write of ours to it is not in the watch yet."""
        key = (plural, namespace, name)
        now = self._clock()
        with self._lock:
            pending = self._pending.get(key)
            if pending:
                for rv in [rv for rv, deadline in pending.items() if deadline <= now]:
                    del pending[rv]
                if pending:
                    return None
                del self._pending[key]
            obj = self._objects.get(key)
        return copy.deepcopy(dict(obj)) if obj is not None else None

    def forget(self, plural: str, namespace: str, name: str) -> None:
        """Drop the cached object (it proved stale): :meth:`get` says None until the next event."""
        with self._lock:
            self._objects.pop((plural, namespace, name), None)

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._pending.clear()


def _object_key(plural: str, obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj["metadata"]
    return plural, meta.get("namespace") or "", meta["name"]


CACHE = WatchCache()


def enqueue(kind: str, namespace: str, name: str, delay: float = 0.0) -> None:
    """Enqueue a reconcile of ``kind`` ``namespace/name`` if that kind's queue is running."""
    q = QUEUES.get(kind)
    if q is not None:
        q.enqueue((namespace, name), delay)


def owner_name(body: Any, kind: str) -> str | None:
    """Name of the controlling owner of kind ``kind`` (a kiln.dev kind) of a child object."""
    for ref in body.get("metadata", {}).get("ownerReferences", []) or []:
        if (
            ref.get("kind") == kind
            and ref.get("controller")
            and ref.get("apiVersion", "").startswith("kiln.dev/")
        ):
            return str(ref.get("name"))
    return None


def watch(kind: str, group_version: str, plural: str, *, cached: bool = False) -> None:
    """Enqueue ``kind``'s reconcile on every watch event of its own objects but the echoes of
    its own writes; with ``cached`` keep the objects in :data:`CACHE`."""
    group, _, version = group_version.rpartition("/")
    if cached:
        CACHE.cache(plural)

    @kopf.on.event(group, version, plural, id=f"watch-{plural}")
    async def _on_event(body: kopf.Body, type: str | None, event: kopf.RawEvent, **_: Any) -> None:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        deleted = type == "DELETED"
        q = QUEUES.get(kind)
        if q is not None:
            q.observe(key, body.metadata.uid, deleted=deleted)
        if not CACHE.observe(plural, event["object"], deleted=deleted):
            enqueue(kind, *key)


def watch_children(kind: str, group_version: str, plural: str, parent_label: str) -> None:
    """Enqueue the parent's reconcile on every watch event of a child labelled ``parent_label``
    but the echoes of the parent's controller's own writes (see :class:`WatchCache`).

    Children carry ``<parent_label>: <parent name>`` (see the builders), so no owner lookups.
    """
    group, _, version = group_version.rpartition("/")

    @kopf.on.event(
        group, version, plural, labels={parent_label: kopf.PRESENT}, id=f"watch-{plural}-of-{kind.lower()}"
    )
    async def _on_child_event(body: kopf.Body, type: str | None, event: kopf.RawEvent, **_: Any) -> None:
        parent = body.metadata.labels.get(parent_label)
        echo = CACHE.observe(plural, event["object"], deleted=type == "DELETED")
        if parent and not echo:
            enqueue(kind, body.metadata.namespace or "", parent)
