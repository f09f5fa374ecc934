"""The Argo CD health Lua (charts/kiln/argocd/health.yaml) on synthetic objects, one per row of
docs/argocd.md's table. The integration tests run it on live objects too."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.health import _health_scripts, argocd_health

KINDS = ("TrainingJob", "Model", "InferenceService", "FeatureGroup")


def obj(kind: str, generation: int = 2, **status: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "generation": generation},
    }
    if status:
        out["status"] = status
    return out


def c(type_: str, status: str, reason: str = "R", message: str = "m") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_every_kind_has_a_check() -> None:
    assert {k.rsplit("_", 1)[1] for k in _health_scripts()} == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, "Progressing"),  # not reconciled yet
        ({"observedGeneration": 1, "conditions": [c("Ready", "True")]}, "Progressing"),  # stale
        ({"observedGeneration": 2, "conditions": [c("Ready", "True")]}, "Healthy"),
        ({"observedGeneration": 2, "conditions": [c("Ready", "False")]}, "Progressing"),
        ({"observedGeneration": 2, "conditions": [c("Ready", "False"), c("Stalled", "True")]}, "Degraded"),
    ],
)
def test_common_rules(kind: str, status: dict[str, Any], expected: str) -> None:
    assert argocd_health(obj(kind, **status))["status"] == expected


def test_degraded_says_why() -> None:
    stalled = c("Stalled", "True", "BackoffLimitExceeded", "pod failed 4 times")
    hs = argocd_health(obj("TrainingJob", observedGeneration=2, conditions=[c("Ready", "False"), stalled]))
    assert hs == {"status": "Degraded", "message": "BackoffLimitExceeded: pod failed 4 times"}


def test_suspended_training_job_and_paused_rollout() -> None:
    tj = obj("TrainingJob", observedGeneration=2, conditions=[c("Ready", "False"), c("Suspended", "True")])
    assert argocd_health(tj)["status"] == "Suspended"
    isvc = obj(
        "InferenceService",
        observedGeneration=2,
        rolloutPhase="Paused",
        conditions=[c("Ready", "False", "RolloutPaused")],
    )
    assert argocd_health(isvc)["status"] == "Suspended"
    # a Suspended condition means nothing on other kinds
    assert argocd_health({**tj, "kind": "Model"})["status"] == "Progressing"
