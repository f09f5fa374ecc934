"""Kueue for TrainingJobs, without a cluster: the Workload builder, what Kiln reads from a
Workload (kiln.queueing.observe), the gang plan of a queued job (kiln.gang.plan with a
QueueView) and the Workload status writes, on a fixed clock."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiln import queueing
from kiln.api.trainingjob import TrainingJobSpec
from kiln.conditions import get_condition, is_true, rfc3339
from kiln.gang import plan
from kiln.resources import trainingjob as build
from kiln.resources import workload as wl

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
SPEC = {
    "image": "kiln/trainer:dev",
    "dataset": {"builtin": "sklearn-digits"},
    "numNodes": 2,
    "resourcesPerNode": {"limits": {"nvidia.com/gpu": 4, "cpu": "8"}},
    "nodeSelector": {"kiln.dev/pool": "gpu"},
}
QUEUE = "team-a"


def job(status: dict | None = None, labels: dict | None = None, **spec: Any) -> dict:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {
            "name": "digits",
            "namespace": "ml",
            "uid": "uid-1",
            "generation": 1,
            "labels": {wl.QUEUE_LABEL: QUEUE} if labels is None else labels,
        },
        "spec": {**SPEC, **spec},
        "status": status or {},
    }


def spec_of(j: dict) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(j["spec"])


def cond(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": "x"}


PENDING = [cond("QuotaReserved", "False", "Pending", "couldn't assign flavors: insufficient quota")]
ADMITTED = [
    cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue gpus"),
    cond("Admitted", "True", "Admitted", "The workload is admitted"),
]
EVICTED = [
    *ADMITTED,
    cond("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority Workload"),
]
ADMISSION = {
    "clusterQueue": "gpus",
    "podSetAssignments": [{"name": "main", "flavors": {"nvidia.com/gpu": "a100", "cpu": "a100"}, "count": 2}],
}


def live(j: dict, conditions: list[dict] | None = None, admission: dict | None = None) -> dict:
    """The Workload as the API server would return it: Kiln's manifest plus Kueue's status."""
    w = copy.deepcopy(wl.workload(j, spec_of(j)))
    w["metadata"] |= {"uid": "wl-uid", "resourceVersion": "7", "generation": 1}
    w["status"] = {"conditions": conditions or []}
    if admission:
        w["status"]["admission"] = admission
    return w


def view(j: dict, w: dict | None) -> queueing.QueueView:
    return queueing.observe(QUEUE, wl.workload_name(j), w, wl.workload(j, spec_of(j)))


def pod(j: dict, rank: int, phase: str = "Running", gang: int = 0, deleting: bool = False) -> dict:
    p = build.pod(j, spec_of(j), rank, gang)
    p["metadata"]["uid"] = f"pod-{gang}-{rank}"
    p["status"] = {"phase": phase}
    if deleting:
        p["metadata"]["deletionTimestamp"] = rfc3339(T0)
    return p


def run(j: dict, w: dict | None, pods: list[dict], now: datetime = T0):
    return plan(j, spec_of(j), pods, now, view(j, w))


# --- the Workload ------------------------------------------------------------------------------


def test_workload_is_one_pod_set_of_the_whole_gang():
    j = job()
    w = wl.workload(j, spec_of(j))
    assert w["apiVersion"] == "kueue.x-k8s.io/v1beta2" and w["kind"] == "Workload"
    assert w["metadata"]["name"] == wl.workload_name(j) and w["metadata"]["namespace"] == "ml"
    assert w["metadata"]["labels"][build.LABEL_JOB] == "digits"
    owner = w["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "TrainingJob" and owner["uid"] == "uid-1" and owner["controller"] is True
    assert "finalizers" not in w["metadata"]
    assert w["spec"]["queueName"] == QUEUE and "priorityClassRef" not in w["spec"]
    [ps] = w["spec"]["podSets"]
    assert ps["name"] == "main" and ps["count"] == 2
    tpl = ps["template"]["spec"]
    assert tpl["containers"] == [
        {
            "name": "trainer",
            "image": "kiln/trainer:dev",
            "resources": {"limits": {"nvidia.com/gpu": 4, "cpu": "8"}},
        }
    ]
    assert tpl["restartPolicy"] == "Never"
    assert tpl["nodeSelector"] == {"kiln.dev/pool": "gpu"}
    assert any(t["key"] == "nvidia.com/gpu" for t in tpl["tolerations"])  # as the pods will have
    assert "env" not in tpl["containers"][0]  # only what admission reads


def test_workload_name_follows_the_job_incarnation():
    a, b = job(), job()
    b["metadata"]["uid"] = "uid-2"
    assert wl.workload_name(a) == wl.workload_name(job()) != wl.workload_name(b)
    assert wl.workload_name(a).startswith("trainingjob-digits-")


def test_priority_from_workload_priority_class_label_then_pod_priority_class():
    j = job(labels={wl.QUEUE_LABEL: QUEUE, wl.PRIORITY_CLASS_LABEL: "urgent"}, priorityClassName="high")
    assert wl.priority_class(j, spec_of(j)) == ("WorkloadPriorityClass", "urgent")
    j2 = job(priorityClassName="high")
    assert wl.priority_class(j2, spec_of(j2)) == ("PriorityClass", "high")
    assert wl.priority_class(job(), spec_of(job())) is None
    w = wl.workload(j, spec_of(j), wl.Priority("WorkloadPriorityClass", "urgent", 1000))
    assert w["spec"]["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "urgent",
    }
    assert w["spec"]["priority"] == 1000


def test_workload_needs_a_queue():
    j = job(labels={})
    assert wl.queue_name(j) is None
    with pytest.raises(ValueError):
        wl.workload(j, spec_of(j))


# --- observe -----------------------------------------------------------------------------------


def test_observe_states():
    j = job()
    assert not view(j, None).exists
    pending = view(j, live(j, PENDING))
    assert pending.exists and pending.matches and not pending.quota_reserved and not pending.admitted
    assert pending.reason == "Pending" and "insufficient quota" in pending.message
    admitted = view(j, live(j, ADMITTED, ADMISSION))
    assert admitted.admitted and admitted.cluster_queue == "gpus"
    assert admitted.flavors == {"nvidia.com/gpu": "a100", "cpu": "a100"}
    evicted = view(j, live(j, EVICTED, ADMISSION))
    assert evicted.must_release and evicted.reason == "Preempted"
    released = view(j, live(j, [*EVICTED[2:], *PENDING]))
    assert not released.must_release and released.reason == "Pending"
    assert view(j, live(j, [cond("Finished", "True", "Succeeded")])).finished


def test_observe_stale_when_the_job_asks_for_something_else():
    j = job()
    w = live(j, PENDING)
    more = job(resourcesPerNode={"limits": {"nvidia.com/gpu": 8}})
    assert not view(more, w).matches
    moved = job(labels={wl.QUEUE_LABEL: "team-b"})
    assert not queueing.observe(
        "team-b", wl.workload_name(moved), w, wl.workload(moved, spec_of(moved))
    ).matches


# --- the gang plan of a queued job -------------------------------------------------------------


def test_new_queued_job_creates_its_workload_and_no_pods():
    j = job()
    p = run(j, None, [])
    assert p.create_workload and not p.create_gang and not p.delete_pods
    assert p.status["phase"] == "Queued" and p.status["workload"] == wl.workload_name(j)
    c = p.status["conditions"]
    assert get_condition(c, "Suspended")["reason"] == "Queued" and is_true(c, "Suspended")
    assert get_condition(c, "Admitted")["status"] == "False"
    assert get_condition(c, "Ready")["reason"] == "Queued"
    assert [e[1] for e in p.events] == ["Queued"] and "startTime" not in p.status


def test_pending_workload_keeps_the_job_queued_and_says_why():
    j = job()
    first = run(j, None, [])
    p = run(job(status=first.status), live(j, PENDING), [], T0 + timedelta(seconds=3))
    assert not p.create_workload and not p.create_gang and p.status["phase"] == "Queued"
    admitted = get_condition(p.status["conditions"], "Admitted")
    assert admitted["reason"] == "Pending" and "insufficient quota" in admitted["message"]
    assert p.events == []  # already Queued: no second Event
    again = run(job(status=p.status), live(j, PENDING), [], T0 + timedelta(seconds=9))
    assert again.status == p.status and not again.events


def test_admission_creates_the_whole_gang():
    j = job()
    queued = run(job(status=run(j, None, []).status), live(j, PENDING), [])
    p = run(job(status=queued.status), live(j, ADMITTED, ADMISSION), [], T0 + timedelta(seconds=10))
    assert p.create_gang and p.status["gang"] == 0 and p.status["phase"] == "Pending"
    c = p.status["conditions"]
    assert is_true(c, "Admitted") and "gpus" in get_condition(c, "Admitted")["message"]
    assert get_condition(c, "Suspended") == {
        **get_condition(c, "Suspended"),
        "status": "False",
        "reason": "Admitted",
    }
    assert [e[1] for e in p.events] == ["Admitted", "GangCreated"]  # no "Resumed"
    assert p.status["startTime"] == rfc3339(T0 + timedelta(seconds=10))  # the deadline clock starts now


def test_deadline_clock_does_not_run_while_queued():
    j = job(activeDeadlineSeconds=60)
    p = run(job(status={"gang": 0}, activeDeadlineSeconds=60), live(j, PENDING), [], T0 + timedelta(hours=2))
    assert p.status["phase"] == "Queued" and not is_true(p.status.get("conditions"), "Failed")


def test_preemption_stops_the_whole_gang_then_gives_the_quota_back():
    j = job()
    st = {"gang": 0, "startTime": rfc3339(T0), "workload": wl.workload_name(j)}
    running = [pod(j, 0), pod(j, 1)]
    ok = run(job(status=st), live(j, ADMITTED, ADMISSION), running)
    assert ok.status["phase"] == "Running"
    # Kueue evicts: every pod goes, the gang moves on, counted as a disruption, not a failure
    p = run(job(status=ok.status), live(j, EVICTED, ADMISSION), running, T0 + timedelta(seconds=5))
    assert sorted(n for n, _ in p.delete_pods) == ["digits-node-0", "digits-node-1"]
    assert p.status["gang"] == 1 and p.status["disruptionCount"] == 1 and p.status["restartCount"] == 0
    assert not p.release_workload and p.requeue_after == 1.0  # its pods still run
    assert (
        p.status["phase"] == "Queued"
        and get_condition(p.status["conditions"], "Admitted")["reason"] == "Preempted"
    )
    assert {"GangStopped", "Queued"} <= {e[1] for e in p.events}
    # pods terminating: no second count, still holding the quota
    terminating = [pod(j, 0, deleting=True), pod(j, 1, deleting=True)]
    p2 = run(job(status=p.status), live(j, EVICTED, ADMISSION), terminating, T0 + timedelta(seconds=6))
    assert p2.status["disruptionCount"] == 1 and not p2.release_workload and not p2.delete_pods
    # gone: give the quota back
    p3 = run(job(status=p2.status), live(j, EVICTED, ADMISSION), [], T0 + timedelta(seconds=7))
    assert p3.release_workload and not p3.create_gang and p3.status["phase"] == "Queued"
    # requeued, waiting; then admitted again: a new gang
    waiting = live(j, [*EVICTED[2:], *PENDING])
    p4 = run(job(status=p3.status), waiting, [], T0 + timedelta(seconds=8))
    assert not p4.release_workload and not p4.create_gang
    p5 = run(job(status=p4.status), live(j, ADMITTED, ADMISSION), [], T0 + timedelta(seconds=30))
    assert p5.create_gang and p5.status["gang"] == 1 and p5.status["disruptionCount"] == 1


def test_partial_eviction_is_impossible_a_finished_rank_goes_too():
    j = job()
    st = {"gang": 0, "startTime": rfc3339(T0), "workload": wl.workload_name(j)}
    pods = [pod(j, 0), pod(j, 1, "Failed")]
    p = run(job(status=st), live(j, EVICTED, ADMISSION), pods)
    assert len(p.delete_pods) == 2 and not p.release_workload  # rank 0 still runs


def test_job_end_finishes_the_workload():
    j = job()
    st = {"gang": 0, "startTime": rfc3339(T0), "workload": wl.workload_name(j)}
    failed = job(status=st, maxRestarts=0)
    p = run(failed, live(j, ADMITTED, ADMISSION), [pod(j, 0), pod(j, 1, "Failed")])
    assert p.status["phase"] == "Failed" and p.finish_workload and p.finish_workload[0] is False
    done = run(
        job(status=p.status, maxRestarts=0), live(j, [*ADMITTED, cond("Finished", "True", "Failed")]), []
    )
    assert done.finish_workload is None


def test_suspend_deletes_the_workload_once_the_pods_are_gone_and_resume_queues_again():
    j = job()
    st = {"gang": 0, "startTime": rfc3339(T0), "workload": wl.workload_name(j)}
    w = live(j, ADMITTED, ADMISSION)
    p = run(job(status=st, suspend=True), w, [pod(j, 0), pod(j, 1)])
    assert len(p.delete_pods) == 2 and p.delete_workload is None and p.status["phase"] == "Suspended"
    p2 = run(job(status=p.status, suspend=True), w, [])
    assert p2.delete_workload == (wl.workload_name(j), "wl-uid") and "workload" not in p2.status
    resumed = run(job(status=p2.status), None, [], T0 + timedelta(seconds=20))
    assert resumed.create_workload and not resumed.create_gang and resumed.status["phase"] == "Queued"


def test_removing_the_queue_label_deletes_the_workload_and_runs_unqueued():
    j = job(labels={})
    st = {"gang": 0, "workload": "trainingjob-digits-abcde"}
    p = plan(job(status=st, labels={}), spec_of(j), [], T0, None)
    assert p.delete_workload == ("trainingjob-digits-abcde", "") and "workload" not in p.status
    assert p.create_gang and get_condition(p.status["conditions"], "Admitted")["reason"] == "Unqueued"


def test_stale_workload_is_replaced():
    j = job()
    old = live(j, PENDING)
    changed = job(
        status={"gang": 0, "workload": wl.workload_name(j)},
        resourcesPerNode={"limits": {"nvidia.com/gpu": 2}},
    )
    p = run(changed, old, [])
    assert p.delete_workload == (wl.workload_name(j), "wl-uid") and not p.create_workload
    assert not p.create_gang and p.status["phase"] == "Queued"
    p2 = run(job(status=p.status, resourcesPerNode={"limits": {"nvidia.com/gpu": 2}}), None, [])
    assert p2.create_workload


def test_unqueued_jobs_are_untouched_by_kueue():
    j = job(labels={})
    p = plan(j, spec_of(j), [], T0)
    assert p.create_gang and not p.create_workload and "workload" not in p.status
    assert get_condition(p.status["conditions"], "Admitted") is None


# --- the Workload status writes and the admitted placement --------------------------------------


def test_unreserve_is_what_kueue_jobframework_writes_after_an_eviction():
    j = job()
    w = live(j, EVICTED, ADMISSION)
    new = queueing.unreserve(w, T0)
    assert "admission" not in new  # write_status sends it as null: removed
    c = new["conditions"]
    assert get_condition(c, "QuotaReserved") | {} == {
        **get_condition(c, "QuotaReserved"),
        "status": "False",
        "reason": "Pending",
    }
    assert get_condition(c, "Admitted")["reason"] == "NoReservation" and not is_true(c, "Admitted")
    assert is_true(c, "Requeued") and get_condition(c, "Requeued")["reason"] == "Preempted"
    assert is_true(c, "Evicted")  # Kueue resets it on the next admission
    assert get_condition(c, "QuotaReserved")["lastTransitionTime"] == rfc3339(T0)
    deactivated = live(
        j, [*ADMITTED, cond("Evicted", "True", "Deactivated", "spec.active is false")], ADMISSION
    )
    assert not is_true(queueing.unreserve(deactivated, T0)["conditions"], "Requeued")


def test_finish_marks_the_workload_finished():
    j = job()
    c = queueing.finish(live(j, ADMITTED, ADMISSION), True, "rank 0 finished", T0)["conditions"]
    assert is_true(c, "Finished") and get_condition(c, "Finished")["reason"] == "Succeeded"
    assert is_true(c, "Admitted")  # the rest is Kueue's


def test_admitted_flavors_place_the_pods():
    flavors = [
        {
            "spec": {
                "nodeLabels": {"gpu.product": "a100"},
                "tolerations": [{"key": "pool", "operator": "Exists"}],
            }
        },
        {"spec": {"nodeLabels": {"zone": "a"}}},
    ]
    extra = queueing.flavor_placement(flavors)
    assert extra == {
        "nodeSelector": {"gpu.product": "a100", "zone": "a"},
        "tolerations": [{"key": "pool", "operator": "Exists"}],
    }
    j = job()
    [p0, p1] = build.pods(j, spec_of(j), 0, admitted=extra)
    for p in (p0, p1):
        assert p["spec"]["nodeSelector"] == {"kiln.dev/pool": "gpu", "gpu.product": "a100", "zone": "a"}
        assert {"key": "pool", "operator": "Exists"} in p["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in p["spec"]["tolerations"])
    assert queueing.flavor_placement([{"spec": {}}]) == {}
    assert build.pods(j, spec_of(j), 0) == build.pods(j, spec_of(j), 0, admitted={})
