"""The shared status-write path (kiln.status): the diff removes what disappeared, and nothing is
sent when nothing changed. What the API server does with the patch is tested in
tests/integration/test_status.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiln import kube
from kiln.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from kiln.conditions import get_condition, rfc3339, set_condition, set_stalled
from kiln.gang import plan
from kiln.metrics import STATUS_WRITES
from kiln.resources import trainingjob as build
from kiln.status import diff, write_status

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = {
    "image": "kiln-trainer:dev",
    "dataset": {"builtin": "sklearn-digits"},
    "numNodes": 2,
    "maxRestarts": 3,
}


def _job(status: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "7"},
        "spec": {**SPEC, **spec},
        "status": status,
    }


def _pod(job: dict[str, Any], rank: int, phase: str, exit_code: int | None = None) -> dict[str, Any]:
    p = build.pod(job, TrainingJobSpec.model_validate(job["spec"]), rank, 0)
    p["metadata"]["uid"] = f"p{rank}"
    p["status"] = {"phase": phase}
    if exit_code is not None:
        term = {"exitCode": exit_code, "reason": "Error", "message": "boom"}
        p["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": term}}]
    return p


def _running() -> dict[str, Any]:
    job = _job({})
    first = plan(job, TrainingJobSpec.model_validate(job["spec"]), [], T0)
    return first.status


def test_diff_nulls_removed_keys_recurses_and_replaces_lists() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2], "gone": "x"}
    new = {"a": 1, "b": {"c": 2}, "l": [1]}
    assert diff(old, new) == {"b": {"d": None}, "l": [1], "gone": None}
    assert diff(new, new) == {}
    assert diff(None, {"x": 1}) == {"x": 1}


def test_diff_of_a_typed_model_drops_unset_fields() -> None:
    old = {"gang": 1, "startTime": rfc3339(T0), "restartCount": 0, "disruptionCount": 0}
    new = TrainingJobStatus(gang=1)
    assert diff(old, new) == {"startTime": None}


def test_suspend_patch_removes_start_time() -> None:
    st = _running()
    assert st["startTime"]
    job = _job(st, suspend=True)
    p = plan(job, TrainingJobSpec.model_validate(job["spec"]), [], T0 + timedelta(seconds=5))
    patch = diff(st, TrainingJobStatus.model_validate(p.status))
    assert "startTime" in patch and patch["startTime"] is None


def test_gang_restart_then_recreate_patch_removes_next_restart_time() -> None:
    st = _running()
    job = _job(st)
    spec = TrainingJobSpec.model_validate(job["spec"])
    failed = plan(job, spec, [_pod(job, 0, "Running"), _pod(job, 1, "Failed", 1)], T0)
    assert failed.status["nextRestartTime"]
    later = T0 + timedelta(seconds=60)  # past the back-off; the old gang's pods are gone
    recreated = plan(_job(failed.status), spec, [], later)
    assert recreated.create_gang
    patch = diff(failed.status, TrainingJobStatus.model_validate(recreated.status))
    assert "nextRestartTime" in patch and patch["nextRestartTime"] is None


def test_unchanged_conditions_keep_last_transition_time_so_the_diff_is_empty() -> None:
    conds = set_condition(None, "Ready", "False", "Running", "in progress", generation=1, now=T0)
    again = set_condition(
        conds, "Ready", "False", "Running", "in progress", generation=1, now=T0 + timedelta(hours=1)
    )
    assert diff({"conditions": conds}, {"conditions": again}) == {}


def test_stalled_is_present_only_while_true() -> None:
    conds = set_stalled(None, True, "BackoffLimitExceeded", "too many restarts", generation=2, now=T0)
    c = get_condition(conds, "Stalled")
    assert (
        c and c["status"] == "True" and c["reason"] == "BackoffLimitExceeded" and c["observedGeneration"] == 2
    )
    assert get_condition(set_stalled(conds, False), "Stalled") is None


class _NoRequests:
    """An ApiClient stand-in that fails the test if anything is sent."""

    def param_serialize(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("a request was sent although nothing changed")


def test_no_request_when_nothing_changed() -> None:
    st = _running()
    job = _job(st)
    skipped = STATUS_WRITES.labels("TrainingJob", "skipped")._value.get()
    out = write_status(_NoRequests(), job, TrainingJobStatus.model_validate(st))  # type: ignore[arg-type]
    assert out == job
    assert STATUS_WRITES.labels("TrainingJob", "skipped")._value.get() == skipped + 1


def test_write_sends_the_diff_with_the_resource_version(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[dict[str, Any], str | None]] = []

    def fake(api: Any, obj: Any, patch: dict[str, Any], *, resource_version: str | None = None) -> Any:
        sent.append((patch, resource_version))
        return obj

    monkeypatch.setattr(kube, "patch_status", fake)
    st = _running()
    write_status(object(), _job(st), TrainingJobStatus.model_validate({**st, "gang": 1}))  # type: ignore[arg-type]
    assert sent == [({"gang": 1}, "7")]
