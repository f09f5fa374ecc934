"""The Kiln API (group ``kiln.dev``, version ``v1alpha1``): pydantic models of the four kinds.

These models are the only source of the CRD schemas (see :mod:`kiln.api.crd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from kiln import GROUP, VERSION
from kiln.api.featuregroup import FeatureGroup, FeatureGroupSpec, FeatureGroupStatus
from kiln.api.inferenceservice import InferenceService, InferenceServiceSpec, InferenceServiceStatus
from kiln.api.model import Model, ModelSpec, ModelStatus
from kiln.api.trainingjob import TrainingJob, TrainingJobSpec, TrainingJobStatus


@dataclass(frozen=True)
class Kind:
    """Everything needed to register a kind: names, schema models and printer columns."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    resource: type[BaseModel]
    spec: type[BaseModel]
    status: type[BaseModel]
    printer_columns: tuple[dict[str, Any], ...] = field(default=())

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


_READY = {
    "name": "Ready",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
}
_REASON = {
    "name": "Reason",
    "type": "string",
    "priority": 1,
    "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
}
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}

KINDS: tuple[Kind, ...] = (
    Kind(
        "Model",
        "models",
        ("kmodel",),
        Model,
        ModelSpec,
        ModelStatus,
        (
            {"name": "Latest", "type": "integer", "jsonPath": ".status.latestVersion"},
            {"name": "Production", "type": "integer", "jsonPath": ".status.stages.production"},
            {"name": "Staging", "type": "integer", "jsonPath": ".status.stages.staging"},
            _READY,
            _REASON,
            _AGE,
        ),
    ),
    Kind(
        "TrainingJob",
        "trainingjobs",
        ("ktj",),
        TrainingJob,
        TrainingJobSpec,
        TrainingJobStatus,
        (
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.modelRef.name"},
            {"name": "Nodes", "type": "integer", "jsonPath": ".spec.numNodes"},
            {
                "name": "Queue",
                "type": "string",
                "jsonPath": ".metadata.labels.kueue\\.x-k8s\\.io/queue-name",
                "priority": 1,
                "description": "Kueue LocalQueue (kueue.x-k8s.io/queue-name label)",
            },
            {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount"},
            {
                "name": "Disruptions",
                "type": "integer",
                "jsonPath": ".status.disruptionCount",
                "priority": 1,
                "description": "Gang restarts from evictions and preemptions (not counted as failures)",
            },
            {"name": "Version", "type": "integer", "jsonPath": ".status.registeredVersion"},
            _READY,
            _REASON,
            _AGE,
        ),
    ),
    Kind(
        "InferenceService",
        "inferenceservices",
        ("kisvc",),
        InferenceService,
        InferenceServiceSpec,
        InferenceServiceStatus,
        (
            {"name": "Model", "type": "string", "jsonPath": ".spec.modelRef.name"},
            {"name": "Stable", "type": "integer", "jsonPath": ".status.stableVersion"},
            {"name": "Canary", "type": "integer", "jsonPath": ".status.canaryVersion"},
            {"name": "Weight", "type": "integer", "jsonPath": ".status.canaryWeight"},
            {"name": "Rollout", "type": "string", "jsonPath": ".status.rolloutPhase"},
            {"name": "URL", "type": "string", "priority": 1, "jsonPath": ".status.url"},
            _READY,
            _REASON,
            _AGE,
        ),
    ),
    Kind(
        "FeatureGroup",
        "featuregroups",
        ("kfg",),
        FeatureGroup,
        FeatureGroupSpec,
        FeatureGroupStatus,
        (
            {"name": "Entities", "type": "string", "jsonPath": ".spec.entities[*].name"},
            {"name": "Online", "type": "boolean", "jsonPath": ".spec.online.enabled"},
            {"name": "Materialized", "type": "date", "jsonPath": ".status.lastMaterializationTime"},
            {"name": "Rows", "type": "integer", "jsonPath": ".status.materializedRows"},
            {"name": "Last Run", "type": "string", "priority": 1, "jsonPath": ".status.lastRun.phase"},
            {"name": "Running", "type": "string", "priority": 1, "jsonPath": ".status.activeRun.jobName"},
            _READY,
            _REASON,
            _AGE,
        ),
    ),
)

KIND_BY_NAME = {k.kind: k for k in KINDS}

__all__ = [
    "GROUP",
    "KINDS",
    "KIND_BY_NAME",
    "VERSION",
    "FeatureGroup",
    "InferenceService",
    "Kind",
    "Model",
    "TrainingJob",
]
