"""The shared status-write path against the real API server: removed keys are removed, a stale
write gets a real 409, and a 409 from a concurrent writer re-runs the reconcile instead of failing."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from kubernetes import client

from kiln import API_VERSION
from kiln import kube as kb
from kiln.api.trainingjob import TrainingJobStatus
from kiln.conditions import get_condition
from kiln.controllers import trainingjob
from kiln.controllers.runtime import WorkQueue
from kiln.metrics import RECONCILE_ERRORS, RECONCILE_TOTAL, STATUS_WRITES
from kiln.status import write_status

from .test_trainingjob import JOB, get_job, pods

KIND = "TrainingJob"


def _create(api: client.ApiClient, ns: str) -> dict[str, Any]:
    body = copy.deepcopy(JOB)
    body["metadata"]["namespace"] = ns
    created = kb.create(api, body)
    assert created is not None
    return created


def test_removed_keys_are_removed_and_a_stale_write_is_a_conflict(kube, namespace, kiln_crds):
    job = _create(kube, namespace)
    job = write_status(kube, job, TrainingJobStatus(gang=0, start_time="2026-01-01T00:00:00Z"))
    assert job["status"]["startTime"] == "2026-01-01T00:00:00Z"
    stale = copy.deepcopy(job)
    job = write_status(kube, job, TrainingJobStatus(gang=1))
    assert "startTime" not in job["status"] and job["status"]["gang"] == 1
    # unchanged: nothing is sent, the resourceVersion stays
    assert (
        write_status(kube, job, TrainingJobStatus(gang=1))["metadata"]["resourceVersion"]
        == (get_job(kube, namespace)["metadata"]["resourceVersion"])
    )
    conflicts = STATUS_WRITES.labels(KIND, "conflict")._value.get()
    with pytest.raises(kb.Conflict):
        write_status(kube, stale, TrainingJobStatus(gang=5))
    assert STATUS_WRITES.labels(KIND, "conflict")._value.get() == conflicts + 1
    assert get_job(kube, namespace)["status"]["gang"] == 1  # the stale write changed nothing


@pytest.mark.parametrize(
    ("change", "runs_expected"),
    [
        # metadata no decision reads: the same status is written again, in place
        ({"metadata": {"annotations": {"example.com/x": "1"}}}, 1),
        # the spec: the decision may differ, so the reconcile runs again from a fresh read
        ({"spec": {"activeDeadlineSeconds": 3600}}, 2),
    ],
    ids=["other-annotation", "spec"],
)
def test_conflict_from_a_concurrent_writer_requeues_not_errors(
    kube, namespace, kiln_crds, monkeypatch, change, runs_expected
):
    """Another writer changes the job between our read and our status write: the API server
    answers 409. When only metadata outside the decision's inputs changed, write_status writes
    the same status against the new resourceVersion; otherwise the work queue runs the reconcile
    again at once. Either way the end state is the one an undisturbed run gives (one gang of 2
    pods, its start recorded, no error)."""
    _create(kube, namespace)
    real_list = kb.list_objects
    raced: list[bool] = []

    def list_then_race(api: Any, api_version: str, kind: str, *a: Any, **k: Any) -> Any:
        out = real_list(api, api_version, kind, *a, **k)
        if kind == "Pod" and not raced:  # once: a concurrent writer bumps the resourceVersion
            raced.append(True)
            kb.patch(api, API_VERSION, KIND, namespace, "digits", change)
        return out

    monkeypatch.setattr(kb, "list_objects", list_then_race)
    errors = RECONCILE_ERRORS.labels(KIND)._value.get()
    conflicts = RECONCILE_TOTAL.labels(KIND, "conflict")._value.get()
    status_conflicts = STATUS_WRITES.labels(KIND, "conflict")._value.get()
    runs: list[str] = []

    def reconcile(ns: str, name: str) -> Any:
        runs.append(name)
        return trainingjob.reconcile(kube, ns, name)

    async def main() -> None:
        q = WorkQueue(KIND, reconcile, workers=1)
        q.enqueue((namespace, "digits"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(runs) < runs_expected or q.keys_in_flight():
            assert loop.time() < deadline, f"runs: {runs}"
            await asyncio.sleep(0.02)
        await q.close()

    asyncio.run(main())
    assert raced and len(runs) == runs_expected
    assert STATUS_WRITES.labels(KIND, "conflict")._value.get() == status_conflicts + 1
    assert RECONCILE_TOTAL.labels(KIND, "conflict")._value.get() == conflicts + runs_expected - 1
    assert RECONCILE_ERRORS.labels(KIND)._value.get() == errors
    job = get_job(kube, namespace)
    st = job["status"]
    assert st["startTime"] and st["gang"] == 0
    assert get_condition(st["conditions"], "Created")["status"] == "True"
    live = [p for p in pods(kube, namespace) if not p["metadata"].get("deletionTimestamp")]
    assert sorted(p["metadata"]["name"] for p in live) == ["digits-node-0", "digits-node-1"]
