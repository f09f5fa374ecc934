"""Pure builder of a retraining TrainingJob: a Model's ``spec.retraining.template``, one run.

The TrainingJob (name and number from :mod:`kiln.registry.retraining`) is owned by the Model
(deleting the Model deletes its retraining jobs), has ``spec.modelRef`` forced to the Model, and
carries:

- labels ``kiln.dev/model: <model>`` and ``kiln.dev/retraining-run: <n>`` (the Model controller
  lists its runs by them and is woken by their events), plus the template's labels;
- annotations ``kiln.dev/retraining-trigger`` (e.g. ``Drift`` or ``Manual,Schedule``: the
  TrainingJob controller records it in the registered version's ``lineage.retrainingTrigger``)
  and ``kiln.dev/retraining-message`` (the trigger details), plus the template's annotations.
"""

from __future__ import annotations

from typing import Any

from kiln import API_VERSION
from kiln.api.model import RetrainingRun, TrainingJobTemplate
from kiln.resources.common import owner_reference, standard_labels

LABEL_MODEL = "kiln.dev/model"
LABEL_RUN = "kiln.dev/retraining-run"
ANNOTATION_TRIGGER = "kiln.dev/retraining-trigger"
ANNOTATION_MESSAGE = "kiln.dev/retraining-message"


def run_selector(model: str) -> str:
    """The label selector of a Model's retraining TrainingJobs."""
    return f"{LABEL_MODEL}={model},{LABEL_RUN}"


def training_job(model: dict[str, Any], template: TrainingJobTemplate, run: RetrainingRun) -> dict[str, Any]:
    """The TrainingJob of retraining ``run`` of ``model`` (a Model object with metadata.uid)."""
    meta = model["metadata"]
    tmeta = template.metadata
    spec = template.spec.to_api()
    spec["modelRef"] = {"name": meta["name"]}
    labels = (
        dict((tmeta.labels if tmeta else None) or {})
        | standard_labels(model, "retraining")
        | {LABEL_MODEL: meta["name"], LABEL_RUN: str(run.number)}
    )
    annotations = dict((tmeta.annotations if tmeta else None) or {}) | {
        ANNOTATION_TRIGGER: ",".join(run.triggers),
        ANNOTATION_MESSAGE: run.message,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingJob",
        "metadata": {
            "name": run.name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(model)],
        },
        "spec": spec,
    }
