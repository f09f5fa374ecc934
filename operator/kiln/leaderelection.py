"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

Why a Lease of our own and not kopf's peering: kopf's peering is a different mechanism for a
different purpose. It keeps a ``KopfPeering``/``ClusterKopfPeering`` custom resource (a CRD to
install, RBAC on it) in which every operator writes a heartbeat with a *priority*; the highest
priority runs and the others *freeze their watch streams*. It exists so that a developer's
operator can take over from the deployed one, not for high availability: operators of the same
priority all keep running and only log a warning (two writers, the very thing to avoid), a
frozen follower has no warm view of the cluster to take over with, and nothing in it fences the
writes of a leader that lost its heartbeat. Kiln's reconciles run from its own keyed work queue
(:mod:`kiln.controllers.runtime`), not from kopf's handlers, so what must stop and start with
leadership is that queue and the writes, which kopf's peering knows nothing about. A Lease is
what Kubernetes' own controllers, controller-runtime and every kubectl/kstatus user know
(``kubectl get lease``), needs no CRD, and client-go documents the algorithm; it is short
enough to follow exactly here. The operator keeps running kopf with ``--standalone``.

The algorithm (k8s.io/client-go/tools/leaderelection, ``LeaderElector``):

- Every candidate tries :meth:`LeaderElector.try_acquire_or_renew` every ``retry_period``
  (with client-go's jitter factor 1.2). It reads the Lease; when the record differs from the
  one it saw last, it notes *its own* monotonic time of that observation. The Lease is free
  when it has no holder, or when ``leaseDurationSeconds`` have passed on the candidate's own
  clock since it last saw the record change (so clock skew between nodes does not matter, only
  clock *rates*). It then writes its record with the ``resourceVersion`` it read: of several
  candidates only one update succeeds, the others get 409 Conflict.
- A new holder sets ``acquireTime`` = ``renewTime`` = now and ``leaseTransitions`` + 1; a
  renewal keeps ``acquireTime`` and ``leaseTransitions`` and moves ``renewTime``.
- The leader renews every ``retry_period``. If it cannot renew for ``renew_deadline`` it stops
  leading. ``renew_deadline < lease_duration``, so it stops before any other candidate may take
  the Lease. On top of client-go, :meth:`LeaderElector.is_leader` is itself time-bounded: it
  turns false ``renew_deadline`` after the start of the last successful renewal even if the
  renewing thread is stuck, and the operator's API client refuses writes once it is false
  (:class:`NotLeader`), so a leader that lost the Lease stops writing at once.
- On a graceful stop the leader releases the Lease (client-go's ``ReleaseOnCancel``): empty
  holder, ``leaseDurationSeconds: 1``, so a follower takes over within about a second instead
  of a whole lease duration.

Timing: a leader that dies without releasing is replaced once ``lease_duration`` has passed on
the follower's clock since the follower last saw a renewal, i.e. at most ``lease_duration`` +
2 retry intervals (up to ``2.2 * retry_period`` each) after the death.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

log = logging.getLogger("kiln.leaderelection")

#: client-go's ``JitterFactor``: retries wait ``retry_period * (1 + U[0, 1.2))``.
JITTER_FACTOR = 1.2


class NotLeader(RuntimeError):
    """A write was refused because this replica does not hold the leader Lease."""


class LockConflict(Exception):
    """The Lease changed since it was read (409), or was created by someone else first."""


@dataclass(frozen=True)
class LeaderElectionConfig:
    """Where the Lease is and how long its terms are (client-go's ``LeaderElectionConfig``).

    Args:
        name, namespace: the Lease object.
        identity: this candidate's ``holderIdentity`` (unique per process).
        lease_duration: seconds a follower waits, from the last change it saw, before taking over.
        renew_deadline: seconds the leader keeps retrying a renewal before it stops leading.
        retry_period: seconds between attempts to acquire or renew.

    Raises:
        ValueError: unless ``lease_duration > renew_deadline > 1.2 * retry_period > 0`` and
            ``lease_duration`` is at least 1 s (client-go's checks), or identity is empty.
    """

    name: str
    namespace: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("leader election: identity must not be empty")
        if self.lease_duration < 1:
            raise ValueError("leader election: lease duration must be at least 1 second")
        if self.retry_period <= 0:
            raise ValueError("leader election: retry period must be greater than zero")
        if self.lease_duration <= self.renew_deadline:
            raise ValueError("leader election: lease duration must be greater than the renew deadline")
        if self.renew_deadline <= JITTER_FACTOR * self.retry_period:
            raise ValueError(
                f"leader election: renew deadline must be greater than {JITTER_FACTOR} x retry period"
            )


@dataclass(frozen=True)
class LeaderElectionRecord:
    """The Lease's spec, as client-go's ``LeaderElectionRecord``."""

    holder_identity: str = ""
    lease_duration_seconds: int = 0
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    lease_transitions: int = 0

    @classmethod
    def from_spec(cls, spec: Any) -> LeaderElectionRecord:
        """From a ``V1LeaseSpec`` (or None for a Lease without spec)."""
        if spec is None:
            return cls()
        return cls(
            holder_identity=spec.holder_identity or "",
            lease_duration_seconds=int(spec.lease_duration_seconds or 0),
            acquire_time=spec.acquire_time,
            renew_time=spec.renew_time,
            lease_transitions=int(spec.lease_transitions or 0),
        )

    def to_spec(self) -> dict[str, Any]:
        """The Lease ``spec`` as JSON (MicroTime: RFC 3339 with exactly 6 fractional digits)."""
        spec: dict[str, Any] = {
            "holderIdentity": self.holder_identity,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "leaseTransitions": self.lease_transitions,
        }
        for key, value in (("acquireTime", self.acquire_time), ("renewTime", self.renew_time)):
            if value is not None:
                spec[key] = micro_time(value)
        return spec


def micro_time(t: datetime) -> str:
    """``metav1.MicroTime`` text: ``2006-01-02T15:04:05.000000Z`` (the API server requires 6 digits)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Lock(Protocol):
    """Storage of the election record (client-go's ``resourcelock.Interface``)."""

    def get(self, timeout: float) -> tuple[LeaderElectionRecord, str] | None:
        """The record and its resourceVersion, or None when there is no Lease."""

    def create(self, record: LeaderElectionRecord, timeout: float) -> str:
        """Create the Lease; returns its resourceVersion. Raises LockConflict if it exists."""

    def update(self, record: LeaderElectionRecord, resource_version: str, timeout: float) -> str:
        """Replace the record if the Lease still has ``resource_version``; raises LockConflict."""


class LeaseLock:
    """A ``coordination.k8s.io/v1`` Lease through the client's ``CoordinationV1Api``.

    Updates are replaces carrying the ``resourceVersion`` that was read, so the API server
    refuses (409) a write based on a stale read. Other API errors propagate as ``ApiException``.
    """

    def __init__(self, api: k8s.CoordinationV1Api, namespace: str, name: str) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self._metadata: dict[str, Any] = {}

    def _body(self, record: LeaderElectionRecord, resource_version: str | None) -> Any:
        # A dict, not a V1Lease: the client would write datetimes with isoformat(), which drops
        # the fraction when it is 0, and the API server's MicroTime then refuses the value.
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        for key in ("labels", "annotations"):  # kept as read: a replace would drop them
            if self._metadata.get(key):
                meta[key] = self._metadata[key]
        if resource_version:
            meta["resourceVersion"] = resource_version
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": record.to_spec(),
        }
        return cast(Any, body)

    def get(self, timeout: float) -> tuple[LeaderElectionRecord, str] | None:
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        meta = lease.metadata or k8s.V1ObjectMeta()
        self._metadata = {"labels": meta.labels, "annotations": meta.annotations}
        return LeaderElectionRecord.from_spec(lease.spec), str(meta.resource_version)

    def create(self, record: LeaderElectionRecord, timeout: float) -> str:
        try:
            lease = self._api.create_namespaced_lease(
                self.namespace, self._body(record, None), _request_timeout=timeout
            )
        except ApiException as e:
            if e.status == 409:
                raise LockConflict(f"Lease {self.namespace}/{self.name} already exists") from None
            raise
        return str((lease.metadata or k8s.V1ObjectMeta()).resource_version)

    def update(self, record: LeaderElectionRecord, resource_version: str, timeout: float) -> str:
        try:
            lease = self._api.replace_namespaced_lease(
                self.name, self.namespace, self._body(record, resource_version), _request_timeout=timeout
            )
        except ApiException as e:
            if e.status == 409:
                raise LockConflict(f"Lease {self.namespace}/{self.name} changed since it was read") from None
            raise
        return str((lease.metadata or k8s.V1ObjectMeta()).resource_version)


@dataclass(frozen=True)
class Clock:
    """Time sources: ``monotonic`` for every duration, ``now`` (UTC) only for the record's times."""

    monotonic: Callable[[], float] = time.monotonic
    now: Callable[[], datetime] = lambda: datetime.now(UTC)


def _describe(lock: Any) -> str:
    return f"{getattr(lock, 'namespace', '?')}/{getattr(lock, 'name', '?')}"


class LeaderElector:
    """Runs client-go's leader election loop for one candidate.

    Args:
        config: the Lease and its terms.
        lock: where the record lives (:class:`LeaseLock` in the operator).
        on_started_leading: called (in the elector's thread) once this candidate leads.
        on_stopped_leading: called (in the elector's thread) when it stops leading, for any
            reason, after :meth:`is_leader` has turned false; not called if it never led.
        clock: time sources (tests pass fake ones).
        sleep: ``sleep(seconds, stop) -> None``, returning early when ``stop`` is set.
        jitter: ``jitter() -> float`` in [0, 1) (client-go: ``rand.Float64``).
    """

    def __init__(
        self,
        config: LeaderElectionConfig,
        lock: Lock,
        *,
        on_started_leading: Callable[[], None] = lambda: None,
        on_stopped_leading: Callable[[], None] = lambda: None,
        clock: Clock | None = None,
        sleep: Callable[[float, threading.Event], Any] | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self._lock = lock
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._clock = clock or Clock()
        self._sleep = sleep or (lambda seconds, stop: stop.wait(seconds))
        self._jitter = jitter
        self._observed = LeaderElectionRecord()
        self._observed_at = float("-inf")  # monotonic time the observed record last changed
        self._valid_until = float("-inf")  # monotonic deadline of this leader's write fence
        self._leading = False
        self._reported_leader = ""

    # ------------------------------------------------------------------ state
    def is_leader(self) -> bool:
        """True while this candidate leads and its last renewal started < renew_deadline ago."""
        return self._leading and self._clock.monotonic() < self._valid_until

    def observed_leader(self) -> str:
        """``holderIdentity`` of the last record seen ("" when none)."""
        return self._observed.holder_identity

    def _holds_observed(self) -> bool:
        return self._observed.holder_identity == self.config.identity

    def _lease_valid(self, mono: float) -> bool:
        return self._observed_at + self._observed.lease_duration_seconds > mono

    def _observe(self, record: LeaderElectionRecord, mono: float) -> None:
        if record != self._observed:
            self._observed, self._observed_at = record, mono
        if record.holder_identity != self.config.identity:
            self._leading = False  # someone else holds it: the write fence closes now
        if record.holder_identity != self._reported_leader:
            self._reported_leader = record.holder_identity
            if record.holder_identity and record.holder_identity != self.config.identity:
                log.info("new leader elected: %s", record.holder_identity)

    # ------------------------------------------------------------------ one attempt
    def try_acquire_or_renew(self, timeout: float | None = None) -> bool:
        """One attempt to take or keep the Lease (client-go's ``tryAcquireOrRenew``).

        Returns True when this candidate holds the Lease afterwards. API errors and conflicts
        count as a failed attempt (logged), never raise.
        """
        cfg = self.config
        timeout = cfg.renew_deadline if timeout is None else max(0.1, timeout)
        started = self._clock.monotonic()
        now = self._clock.now()
        desired = LeaderElectionRecord(
            holder_identity=cfg.identity,
            lease_duration_seconds=max(1, round(cfg.lease_duration)),
            acquire_time=now,
            renew_time=now,
            lease_transitions=0,
        )
        try:
            got = self._lock.get(timeout)
            if got is None:
                self._lock.create(desired, timeout)
                self._observe(desired, started)
                return self._renewed(started)
            old, resource_version = got
            self._observe(old, started)
            if old.holder_identity and self._lease_valid(started) and not self._holds_observed():
                return False  # held by someone else whose lease has not run out
            if self._holds_observed():
                desired = replace(
                    desired, acquire_time=old.acquire_time, lease_transitions=old.lease_transitions
                )
            else:
                desired = replace(desired, lease_transitions=old.lease_transitions + 1)
            self._lock.update(desired, resource_version, timeout)
        except LockConflict as e:
            log.debug("lease %s: %s", _describe(self._lock), e)
            return False
        except Exception as e:  # API down, timeout, 403...: a failed attempt, as in client-go
            log.warning("lease %s: error acquiring or renewing: %s", _describe(self._lock), e)
            return False
        self._observe(desired, started)
        return self._renewed(started)

    def _renewed(self, started: float) -> bool:
        self._leading = True
        self._valid_until = started + self.config.renew_deadline
        return True

    # ------------------------------------------------------------------ loops
    def _wait_jittered(self, stop: threading.Event) -> None:
        period = self.config.retry_period
        self._sleep(period + self._jitter() * JITTER_FACTOR * period, stop)

    def acquire(self, stop: threading.Event) -> bool:
        """Try until this candidate leads (True) or ``stop`` is set (False)."""
        log.info("attempting to acquire leader lease %s as %s", _describe(self._lock), self.config.identity)
        while not stop.is_set():
            if self.try_acquire_or_renew():
                log.info("successfully acquired lease %s", _describe(self._lock))
                return True
            self._wait_jittered(stop)
        return False

    def renew(self, stop: threading.Event) -> None:
        """Renew every retry period until a renewal fails for renew_deadline or ``stop`` is set."""
        cfg = self.config
        while not stop.is_set():
            deadline = self._clock.monotonic() + cfg.renew_deadline
            while True:
                remaining = deadline - self._clock.monotonic()
                if remaining <= 0:
                    self._leading = False
                    log.error(
                        "failed to renew lease %s within %.1fs: leadership lost",
                        _describe(self._lock),
                        cfg.renew_deadline,
                    )
                    return
                if self.try_acquire_or_renew(timeout=remaining) and self._holds_observed():
                    break
                if self._observed.holder_identity and not self._holds_observed():
                    log.error(
                        "lease %s taken over by %s", _describe(self._lock), self._observed.holder_identity
                    )
                    return
                self._sleep(min(cfg.retry_period, max(0.0, deadline - self._clock.monotonic())), stop)
                if stop.is_set():
                    return
            self._sleep(cfg.retry_period, stop)

    def release(self, timeout: float = 5.0) -> bool:
        """Give the Lease up if this candidate holds it (holder "", duration 1 s). True if released."""
        if not self._holds_observed():
            return False
        self._leading = False
        try:
            got = self._lock.get(timeout)
            if got is None or got[0].holder_identity != self.config.identity:
                return False
            now = self._clock.now()
            record = LeaderElectionRecord(
                holder_identity="",
                lease_duration_seconds=1,
                acquire_time=now,
                renew_time=now,
                lease_transitions=got[0].lease_transitions,
            )
            self._lock.update(record, got[1], timeout)
        except Exception as e:
            log.warning("lease %s: could not release: %s", _describe(self._lock), e)
            return False
        self._observe(record, self._clock.monotonic())
        log.info("released lease %s", _describe(self._lock))
        return True

    def run(self, stop: threading.Event, *, release_on_stop: bool = True) -> None:
        """Acquire, call ``on_started_leading``, renew; then ``on_stopped_leading``.

        Returns when leadership is lost or ``stop`` is set (then the Lease is released first when
        ``release_on_stop``). Blocks: run it in its own thread.
        """
        if not self.acquire(stop):
            return
        try:
            self._on_started()
            self.renew(stop)
        finally:
            self._leading = False
            if stop.is_set() and release_on_stop:
                self.release()
            self._on_stopped()
