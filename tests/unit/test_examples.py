"""Every manifest under examples/ is valid for its kind's pydantic model (the CRD's source)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.api import KIND_BY_NAME

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_one_example_per_kind():
    kinds = {yaml.safe_load(f.read_text())["kind"] for f in EXAMPLES}
    assert kinds == set(KIND_BY_NAME)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "kiln.dev/v1alpha1"
    KIND_BY_NAME[doc["kind"]].resource.model_validate(doc)
