"""The TrainingJob of a retraining run (kiln.resources.retraining)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.api.model import HistoryCause, Retraining, RetrainingRun
from kiln.api.trainingjob import TrainingJobSpec
from kiln.registry import history
from kiln.resources import retraining as build
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden"
MODEL: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "Model",
    "metadata": {"name": "digits", "namespace": "ml", "uid": "6f1c0a2e-1111-2222-3333-444455556666"},
}
RETRAINING = Retraining.model_validate(
    {
        "template": {
            "metadata": {"labels": {"team": "vision"}, "annotations": {"owner": "ml-platform"}},
            "spec": {
                "image": "kiln/trainer:dev",
                "dataset": {"builtin": "sklearn-digits"},
                "hyperparameters": {"epochs": 5},
                "numNodes": 2,
                "ttlSecondsAfterFinished": 3600,
            },
        }
    }
)
RUN = RetrainingRun(
    name="digits-retrain-3",
    number=3,
    triggers=["Drift", "Manual"],
    message="Drift: drift 0.41 > 0.2 since 2026-03-01T12:00:00Z; Manual: requested (now)",
    start_time="2026-03-01T12:05:00Z",
)


def test_training_job_golden():
    job = build.training_job(MODEL, RETRAINING.template, RUN)
    assert_golden(GOLDEN, "retraining-trainingjob", job)
    assert job["spec"]["modelRef"] == {"name": "digits"}
    assert job["metadata"]["labels"][build.LABEL_MODEL] == "digits"
    assert job["metadata"]["labels"][build.LABEL_RUN] == "3" and job["metadata"]["labels"]["team"] == "vision"
    assert job["metadata"]["annotations"][build.ANNOTATION_TRIGGER] == "Drift,Manual"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Model"
    TrainingJobSpec.model_validate(job["spec"])  # a valid TrainingJob spec


def test_selector_and_history_entry():
    assert build.run_selector("digits") == "kiln.dev/model=digits,kiln.dev/retraining-run"
    e = history.entry(
        "2026-03-01T12:05:00Z", HistoryCause.RETRAINING, training_job=RUN.name, message="Drift: x"
    )
    assert history.describe(e) == "retraining TrainingJob digits-retrain-3 (Retraining): Drift: x"
