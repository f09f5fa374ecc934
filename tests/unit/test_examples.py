"""Every manifest under examples/ is valid for its kind's pydantic model (the CRD's source)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.api import KIND_BY_NAME

ROOT = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted(ROOT.rglob("*.yaml"))
#: Where the trainer image puts examples/ (images/trainer/Dockerfile).
IMAGE_EXAMPLES = "/opt/kiln/examples/"


def test_one_example_per_kind():
    kinds = {yaml.safe_load(f.read_text())["kind"] for f in EXAMPLES}
    assert kinds == set(KIND_BY_NAME)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_validates(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "kiln.dev/v1alpha1"
    KIND_BY_NAME[doc["kind"]].resource.model_validate(doc)


def test_cnn_example_runs_the_shipped_script_in_two_pods():
    """examples/cnn: the TrainingJob runs train.py from where the trainer image has it, with
    torchrun, in 2 pods of one process; the InferenceService serves the Model it registers in."""
    job = yaml.safe_load((ROOT / "cnn" / "trainingjob.yaml").read_text())["spec"]
    command = job["command"]
    assert command[0] == "torchrun" and command[1].startswith(IMAGE_EXAMPLES)
    assert (ROOT / command[1].removeprefix(IMAGE_EXAMPLES)).is_file()
    assert (job["numNodes"], job["numProcPerNode"]) == (2, 1)
    model = yaml.safe_load((ROOT / "cnn" / "model.yaml").read_text())["metadata"]["name"]
    isvc = yaml.safe_load((ROOT / "cnn" / "inferenceservice.yaml").read_text())["spec"]
    assert job["modelRef"]["name"] == isvc["modelRef"]["name"] == model
