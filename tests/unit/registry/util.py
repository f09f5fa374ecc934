"""Builders of registry inputs for the unit tests (realistic shapes, no I/O)."""

from __future__ import annotations

import hashlib
from typing import Any

from kiln.api.model import Lineage, ModelSpec, ModelStatus, ModelVersion
from kiln.registry import Problem, versions

NOW = "2026-01-02T03:04:05Z"


def digest(n: int) -> str:
    """A well-formed, distinct sha256 digest per number."""
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def metrics(n: int) -> dict[str, float]:
    """Evaluation metrics like the trainer's (accuracy grows with n)."""
    return {
        "accuracy": round(0.80 + n / 1000, 6),
        "loss": round(0.5 - n / 1000, 6),
        "val_accuracy": round(0.79 + n / 1000, 6),
        "val_loss": round(0.52 - n / 1000, 6),
        "f1_macro": round(0.78 + n / 1000, 6),
        "precision_macro": 0.812345,
        "recall_macro": 0.801234,
        "epochs_run": 20.0,
        "train_seconds": 123.456789,
        "samples_per_second": 5321.987654,
    }


def hyperparameters(n: int) -> dict[str, Any]:
    """Hyperparameters like a TrainingJob's (a dozen keys, mixed types)."""
    return {
        "learning_rate": 0.001,
        "batch_size": 64,
        "epochs": 20,
        "optimizer": "adamw",
        "weight_decay": 0.0001,
        "hidden_sizes": [128, 64],
        "dropout": 0.1,
        "seed": n,
        "scheduler": "cosine",
        "warmup_steps": 100,
        "grad_clip": 1.0,
        "label_smoothing": 0.05,
    }


def lineage(n: int) -> Lineage:
    return Lineage(
        source="TrainingJob",
        training_job=f"digits-train-{n:04d}-abcde",
        dataset="builtin:digits",
        dataset_digest=digest(10_000),
        image="ghcr.io/kiln-dev/kiln-trainer:0.1.0",
    )


def add_versions(status: ModelStatus, count: int, *, realistic: bool = True) -> ModelStatus:
    """``status`` with ``count`` more versions appended through :func:`versions.append`."""
    for _ in range(count):
        n = status.latest_version + 1
        status, _ = versions.append(
            status,
            artifact_uri=f"file:///var/lib/kiln/artifacts/digits/digits-train-{n:04d}-abcde",
            digest=digest(n),
            created_at=NOW,
            lineage=lineage(n) if realistic else Lineage(source="Import"),
            metrics=metrics(n) if realistic else None,
            hyperparameters=hyperparameters(n) if realistic else None,
        )
    return status


def spec(**fields: Any) -> ModelSpec:
    """A ModelSpec from API-shaped (camelCase) fields, validated like the API server's input."""
    return ModelSpec.model_validate(fields)


def status_with(count: int, **api_fields: Any) -> ModelStatus:
    """A status holding versions 1..count plus the given API-shaped (camelCase) fields."""
    base = add_versions(ModelStatus(), count, realistic=False).to_api()
    base.update(api_fields)
    return ModelStatus.model_validate(base)


class Checks:
    """A ``registry.Check`` answering from a table, recording what it was asked."""

    def __init__(self, problems: dict[int, Problem] | None = None) -> None:
        self.problems = problems or {}
        self.asked: list[int] = []

    def __call__(self, v: ModelVersion) -> Problem | None:
        self.asked.append(v.version)
        return self.problems.get(v.version)
