"""Leader election (client-go's algorithm) with a fixed, hand-driven clock and an in-memory lock.

The lock stands in for the Lease's storage only (a record and a resourceVersion, 409 on a stale
one); tests/integration/test_leader_election.py runs the same elector against the API server.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from kiln.leaderelection import (
    Clock,
    LeaderElectionConfig,
    LeaderElectionRecord,
    LeaderElector,
    LockConflict,
    micro_time,
)

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def advance(self, seconds: float) -> None:
        self.t += seconds

    @property
    def clock(self) -> Clock:
        return Clock(monotonic=lambda: self.t, now=lambda: EPOCH + timedelta(seconds=self.t))


class MemoryLock:
    """A Lease record with a resourceVersion; ``down`` makes every call fail like an unreachable API."""

    name, namespace = "kiln", "kiln-system"

    def __init__(self) -> None:
        self.record: LeaderElectionRecord | None = None
        self.rv = 0
        self.down = False
        self.writes = 0
        self.before_update: list = []  # callables run once, between a read and the update

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("API server unreachable")

    def get(self, timeout):
        self._check()
        return None if self.record is None else (self.record, str(self.rv))

    def create(self, record, timeout):
        self._check()
        if self.record is not None:
            raise LockConflict("exists")
        self.record, self.rv, self.writes = record, self.rv + 1, self.writes + 1
        return str(self.rv)

    def update(self, record, resource_version, timeout):
        self._check()
        while self.before_update:
            self.before_update.pop(0)()
        if resource_version != str(self.rv):
            raise LockConflict("stale resourceVersion")
        self.record, self.rv, self.writes = record, self.rv + 1, self.writes + 1
        return str(self.rv)


def config(identity: str, **kw) -> LeaderElectionConfig:
    return LeaderElectionConfig(name="kiln", namespace="kiln-system", identity=identity, **kw)


def elector(identity: str, lock: MemoryLock, fc: FakeClock, **kw) -> LeaderElector:
    return LeaderElector(config(identity), lock, clock=fc.clock, **kw)


def test_config_follows_client_go_checks():
    config("a")  # 15 / 10 / 2, client-go's and controller-runtime's defaults
    for bad in (
        {"lease_duration": 10, "renew_deadline": 10},
        {"renew_deadline": 2.4, "retry_period": 2},  # must exceed 1.2 x retry period
        {"lease_duration": 0.5, "renew_deadline": 0.4, "retry_period": 0.1},
        {"retry_period": 0},
    ):
        with pytest.raises(ValueError):
            config("a", **bad)
    with pytest.raises(ValueError):
        config("")


def test_micro_time_always_has_six_fraction_digits():
    assert micro_time(EPOCH) == "2026-01-01T00:00:00.000000Z"
    plus2 = datetime(2026, 1, 1, 2, 0, 0, 123, tzinfo=UTC).astimezone(UTC)
    assert micro_time(plus2) == "2026-01-01T02:00:00.000123Z"


def test_first_candidate_creates_the_lease():
    fc, lock = FakeClock(), MemoryLock()
    a = elector("a", lock, fc)
    assert a.try_acquire_or_renew() and a.is_leader()
    assert lock.record == LeaderElectionRecord("a", 15, EPOCH, EPOCH, 0)


def test_a_held_lease_expires_on_the_observers_clock():
    fc, lock = FakeClock(), MemoryLock()
    a, b = elector("a", lock, fc), elector("b", lock, fc)
    assert a.try_acquire_or_renew()
    fc.advance(10)  # b sees the record for the first time at t=10: its lease runs to t=25
    assert not b.try_acquire_or_renew() and not b.is_leader()
    fc.advance(14.9)
    assert not b.try_acquire_or_renew()  # the record's renewTime (t=0) does not matter
    fc.advance(0.1)
    assert b.try_acquire_or_renew() and b.is_leader()
    now = EPOCH + timedelta(seconds=25)
    assert lock.record == LeaderElectionRecord("b", 15, now, now, 1)
    assert b.observed_leader() == "b"


def test_renewals_keep_the_lease_and_its_acquire_time():
    fc, lock = FakeClock(), MemoryLock()
    a, b = elector("a", lock, fc), elector("b", lock, fc)
    assert a.try_acquire_or_renew()
    for _ in range(20):  # 40 s of renewals every 2 s, b trying in between
        fc.advance(1)
        assert not b.try_acquire_or_renew()
        fc.advance(1)
        assert a.try_acquire_or_renew() and a.is_leader()
    assert lock.record.acquire_time == EPOCH and lock.record.lease_transitions == 0
    assert lock.record.renew_time == EPOCH + timedelta(seconds=40)


def test_a_lost_race_is_a_failed_attempt():
    fc, lock = FakeClock(), MemoryLock()
    a, b, c = elector("a", lock, fc), elector("b", lock, fc), elector("c", lock, fc)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew() and not c.try_acquire_or_renew()
    fc.advance(15)
    # b and c both see an expired lease; c's update lands between b's read and b's update
    lock.before_update.append(lambda: c.try_acquire_or_renew())
    assert not b.try_acquire_or_renew() and not b.is_leader()
    assert lock.record.holder_identity == "c" and lock.record.lease_transitions == 1


def test_the_write_fence_closes_at_the_renew_deadline_without_the_loop():
    fc, lock = FakeClock(), MemoryLock()
    a = elector("a", lock, fc)
    assert a.try_acquire_or_renew()
    fc.advance(9.99)
    assert a.is_leader()
    fc.advance(0.01)
    assert not a.is_leader()  # no renewal for renew_deadline: no more writes, even if stuck


def test_a_partitioned_leader_stops_writing_before_anyone_else_can_lead():
    """Safety: at no instant do two candidates both pass their write fence."""
    fc, lock = FakeClock(), MemoryLock()
    a, b = elector("a", lock, fc), elector("b", lock, fc)
    a_lock_down_at, step = 20.0, 0.25
    taken_at = None
    while fc.t < 60:
        if fc.t % 2 == 0:  # both try every retry period
            lock.down = fc.t >= a_lock_down_at  # only a's calls fail: a cannot reach the API
            a.try_acquire_or_renew()
            lock.down = False
            if b.try_acquire_or_renew() and taken_at is None:
                taken_at = fc.t
        assert not (a.is_leader() and b.is_leader()), f"two leaders at t={fc.t}"
        fc.advance(step)
    assert taken_at is not None
    # a renewed last at t=18; b saw that at t=18 and took over 15 s later
    assert taken_at == 34.0 and not a.is_leader()


def test_a_released_lease_is_taken_within_a_second():
    fc, lock = FakeClock(), MemoryLock()
    a, b = elector("a", lock, fc), elector("b", lock, fc)
    assert a.try_acquire_or_renew()
    fc.advance(1)
    assert not b.try_acquire_or_renew()
    assert a.release() and not a.is_leader()
    assert lock.record.holder_identity == "" and lock.record.lease_duration_seconds == 1
    assert not b.release()  # not the holder: nothing to release
    assert b.try_acquire_or_renew()  # an empty holder is free at once
    assert lock.record.holder_identity == "b" and lock.record.lease_transitions == 1


def test_a_leader_that_sees_another_holder_stops_at_once():
    fc, lock = FakeClock(), MemoryLock()
    a = elector("a", lock, fc)
    assert a.try_acquire_or_renew()
    lock.record = LeaderElectionRecord("intruder", 15, EPOCH, EPOCH, 1)  # e.g. edited by hand
    lock.rv += 1
    fc.advance(2)
    assert not a.try_acquire_or_renew()
    assert not a.is_leader()


class Script:
    """A fake ``sleep``: advances the clock and runs scheduled actions at given times."""

    def __init__(self, fc: FakeClock, actions: dict[float, object]) -> None:
        self.fc, self.actions = fc, dict(sorted(actions.items()))

    def __call__(self, seconds: float, stop: threading.Event) -> None:
        target = self.fc.t + seconds
        for at in list(self.actions):
            if at <= target:
                self.fc.t = max(self.fc.t, at)
                self.actions.pop(at)()
        self.fc.t = target
        if self.fc.t > 600:
            raise AssertionError("the elector never returned")


def test_run_leads_then_stops_when_renewals_fail_for_the_renew_deadline():
    fc, lock = FakeClock(), MemoryLock()
    calls: list[tuple[str, float]] = []
    stop = threading.Event()

    def down() -> None:
        lock.down = True

    a = LeaderElector(
        config("a"),
        lock,
        clock=fc.clock,
        sleep=Script(fc, {30.0: down}),
        jitter=lambda: 0.5,
        on_started_leading=lambda: calls.append(("started", fc.t)),
        on_stopped_leading=lambda: calls.append(("stopped", fc.t)),
    )
    a.run(stop)
    assert calls[0] == ("started", 0.0)
    # the last renewal started at t=30 (the API went down during it) or just before; the loop
    # gives up once renew_deadline has passed since its round began
    assert calls[1][0] == "stopped" and 30 < calls[1][1] <= 30 + 10 + 2
    assert not a.is_leader() and lock.record.holder_identity == "a"  # not released: unreachable


def test_run_releases_the_lease_on_stop():
    fc, lock = FakeClock(), MemoryLock()
    stop = threading.Event()
    events: list[str] = []
    a = LeaderElector(
        config("a"),
        lock,
        clock=fc.clock,
        sleep=Script(fc, {7.0: stop.set}),
        on_started_leading=lambda: events.append("started"),
        on_stopped_leading=lambda: events.append(f"stopped leader={a.is_leader()}"),
    )
    a.run(stop)
    assert events == ["started", "stopped leader=False"]
    assert lock.record.holder_identity == "" and lock.record.lease_duration_seconds == 1


def test_run_waits_as_a_follower_with_client_go_jitter():
    fc, lock = FakeClock(), MemoryLock()
    holder = elector("holder", lock, fc)
    assert holder.try_acquire_or_renew()
    stop = threading.Event()
    waits: list[float] = []
    renewed: list[float] = []

    def sleep(seconds: float, _stop: threading.Event) -> None:
        waits.append(seconds)
        fc.advance(seconds)
        if fc.t < 30:
            assert holder.try_acquire_or_renew()  # the holder keeps renewing until it dies
            renewed.append(fc.t)
        elif len(waits) > 100:
            stop.set()

    started = []
    b = LeaderElector(
        config("b"),
        lock,
        clock=fc.clock,
        sleep=sleep,
        jitter=lambda: 1.0,
        on_started_leading=lambda: started.append(fc.t),
    )
    b.run(stop)
    assert set(waits[:3]) == {2.0 + 1.0 * 1.2 * 2.0}  # retry period x (1 + jitter x 1.2)
    # b saw the holder's last renewal when it happened; it took over 15 s later, within a retry
    assert started and 15 <= started[0] - renewed[-1] <= 15 + 4.4
