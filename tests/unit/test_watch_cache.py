"""WatchCache: objects as their watch last delivered them, and the echoes of our own writes."""

from __future__ import annotations

from typing import Any

from kiln.controllers.runtime import WatchCache


def obj(name: str, rv: str, ns: str = "ns", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}, **extra}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_cached_plurals_are_kept_and_reads_are_copies() -> None:
    c = WatchCache()
    c.cache("trainingjobs")
    assert not c.observe("trainingjobs", obj("a", "1", spec={"x": 1}))
    assert not c.observe("pods", obj("a", "1"))
    got = c.get("trainingjobs", "ns", "a")
    assert got == obj("a", "1", spec={"x": 1})
    got["spec"]["x"] = 2  # a reconcile mutating its copy never changes the cache
    assert c.get("trainingjobs", "ns", "a") == obj("a", "1", spec={"x": 1})
    assert c.get("pods", "ns", "a") is None
    assert c.get("trainingjobs", "other", "a") is None


def test_a_deleted_object_is_dropped() -> None:
    c = WatchCache()
    c.cache("trainingjobs")
    c.observe("trainingjobs", obj("a", "1"))
    c.observe("trainingjobs", obj("a", "2"), deleted=True)
    assert c.get("trainingjobs", "ns", "a") is None


def test_the_echo_of_our_write_is_recognised_once_and_other_events_are_not() -> None:
    c = WatchCache()
    c.wrote("pods", obj("p", "5"))
    assert not c.observe("pods", obj("p", "4"))  # an older event still in flight
    assert c.observe("pods", obj("p", "5"))  # our create's ADDED event
    assert not c.observe("pods", obj("p", "5"))  # only once
    assert not c.observe("pods", obj("p", "6"))  # the scheduler's binding
    assert not c.observe("pods", obj("q", "5"))  # another object with that version


def test_a_deletion_is_never_an_echo() -> None:
    c = WatchCache()
    c.wrote("pods", obj("p", "5"))
    assert not c.observe("pods", obj("p", "5"), deleted=True)
    assert not c.observe("pods", obj("p", "5"))


def test_nothing_written_records_nothing() -> None:
    c = WatchCache()
    c.wrote("pods", None)
    c.wrote("pods", {"metadata": {"name": "p", "namespace": "ns"}})  # no resourceVersion
    assert not c.observe("pods", {"metadata": {"name": "p", "namespace": "ns"}})


def test_our_write_not_yet_in_the_watch_makes_reads_go_live_until_its_echo() -> None:
    c = WatchCache()
    c.cache("trainingjobs")
    c.observe("trainingjobs", obj("a", "1"))
    c.wrote("trainingjobs", obj("a", "2"))
    assert c.get("trainingjobs", "ns", "a") is None  # the cached version 1 is older than ours
    c.wrote("trainingjobs", obj("a", "3"))
    assert c.observe("trainingjobs", obj("a", "2"))
    assert c.get("trainingjobs", "ns", "a") is None  # version 3 still on its way
    assert c.observe("trainingjobs", obj("a", "3"))
    assert c.get("trainingjobs", "ns", "a") == obj("a", "3")


def test_a_missed_echo_expires_and_reads_use_the_cache_again() -> None:
    clock = Clock()
    c = WatchCache(ttl=30.0, clock=clock)
    c.cache("trainingjobs")
    c.wrote("trainingjobs", obj("a", "2"))
    c.observe("trainingjobs", obj("a", "3"))  # a re-list delivered a later version, not ours
    assert c.get("trainingjobs", "ns", "a") is None
    clock.now += 30.0
    assert c.get("trainingjobs", "ns", "a") == obj("a", "3")


def test_forget_drops_a_stale_copy_until_the_next_event() -> None:
    c = WatchCache()
    c.cache("trainingjobs")
    c.observe("trainingjobs", obj("a", "1"))
    c.forget("trainingjobs", "ns", "a")
    assert c.get("trainingjobs", "ns", "a") is None
    c.observe("trainingjobs", obj("a", "2"))
    assert c.get("trainingjobs", "ns", "a") == obj("a", "2")


def test_cluster_scoped_objects_have_an_empty_namespace() -> None:
    c = WatchCache()
    c.cache("nodes")
    c.observe("nodes", {"metadata": {"name": "n", "resourceVersion": "1"}})
    assert c.get("nodes", "", "n") == {"metadata": {"name": "n", "resourceVersion": "1"}}
