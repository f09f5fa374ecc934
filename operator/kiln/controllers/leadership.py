"""Leader election wired into the operator: elector thread, paused queues and the write fence.

The election itself is :mod:`kiln.leaderelection` (client-go's algorithm on a Lease; the module
says why not kopf's peering). Here:

- every replica runs kopf's watches, so a follower has the same view as the leader and its
  ``/healthz`` answers as usual (ready but idle); its work queues are paused, so it never
  reconciles;
- becoming the leader resumes the queues: every known object is reconciled once;
- the operator's API client refuses writes unless :meth:`Leadership.may_write` (the Lease is
  held and was renewed less than ``renew_deadline`` ago), so a leader that loses the Lease
  stops writing at once, even in the middle of a reconcile;
- losing the Lease pauses the queues and stops the operator (as kube-controller-manager and
  controller-runtime exit on "leader election lost"); the process exits non-zero and Kubernetes
  restarts it as a follower with a fresh view. A graceful stop releases the Lease instead, so a
  follower takes over within about a second (a rolling update, a drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kubernetes import client as k8s

from kiln.controllers.runtime import QUEUES
from kiln.leaderelection import LeaderElectionConfig, LeaderElector, LeaseLock
from kiln.metrics import LEADER

log = logging.getLogger("kiln.leadership")


@dataclass
class OperatorOptions:
    """How ``kiln operator`` configured this run (passed to the startup handler in kopf's memo).

    Attributes:
        leader_election: the Lease and its terms; None: this replica always reconciles.
        namespaced: the operator watches a list of namespaces (no cluster-wide RBAC): kopf's
            cluster scanning (namespaces, CRDs) is turned off.
        stop: set to stop the operator (kopf's ``stop_flag``; an asyncio.Event, set in the
            operator's loop: kopf waits for a threading.Event in an executor thread that would
            then never end when the operator stops for another reason, e.g. SIGTERM).
        lost: set when leadership was lost (the command then exits non-zero).
    """

    leader_election: LeaderElectionConfig | None = None
    namespaced: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    lost: threading.Event = field(default_factory=threading.Event)


class Leadership:
    """The elector of one operator process, driving the queues from its own thread.

    Args:
        config: the Lease and its terms.
        api: an *unfenced* client for the Lease itself.
        loop: the operator's event loop (the queues live there).
        on_lost: called once when leadership is lost (not on a graceful stop).
    """

    def __init__(
        self,
        config: LeaderElectionConfig,
        api: k8s.ApiClient,
        loop: asyncio.AbstractEventLoop,
        on_lost: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._on_lost = on_lost
        self._stop = threading.Event()
        self.elector = LeaderElector(
            config,
            LeaseLock(k8s.CoordinationV1Api(api), config.namespace, config.name),
            on_started_leading=self._started,
            on_stopped_leading=self._stopped,
        )
        self._thread = threading.Thread(target=self._run, name="kiln-leader-election", daemon=True)
        LEADER.set(0)

    def may_write(self) -> bool:
        """True while this replica holds the Lease within its renew deadline."""
        return self.elector.is_leader()

    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop electing; release the Lease if held (after the queues have stopped)."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, timeout)

    def _run(self) -> None:
        try:
            self.elector.run(self._stop)
        except Exception:  # pragma: no cover - a bug; never leave a leader that cannot renew
            log.exception("leader election failed")
            self._on_lost()

    def _call_in_loop(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the operator is gone already
            self._loop.call_soon_threadsafe(fn)

    def _started(self) -> None:
        log.info("became the leader: reconciling")
        LEADER.set(1)
        self._call_in_loop(QUEUES.resume_all)

    def _stopped(self) -> None:
        LEADER.set(0)
        self._call_in_loop(QUEUES.pause_all)
        if not self._stop.is_set():
            log.error("leadership lost: writes refused from now on; stopping the operator")
            self._on_lost()
