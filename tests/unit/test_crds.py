"""The generated CRDs are structural, documented and in sync with the committed files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.api import KINDS
from kiln.api.crd import all_crds, crd_for
from kiln.cli.crds import check

ROOT = Path(__file__).resolve().parents[2]


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for k, v in node.get("properties", {}).items():
            yield from _walk(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind):
    schema = crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "$defs" not in text
    for path, node in _walk(schema):
        assert "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            # with `additionalProperties: true` the API server prunes below the values: a
            # VolumeSource {hostPath: {path: /x}} was stored as {hostPath: {}}
            assert "additionalProperties" not in node, path
        assert "uniqueItems" not in node, path
        assert (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        ), f"{path} has no type"
        for sub in node.get("anyOf", []):
            assert sub.get("type") != "null", path
        if "properties" in node:
            assert node["type"] == "object", path


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_every_spec_field_is_documented(kind):
    """Field descriptions become `kubectl explain` text: every spec field needs one."""
    schema = crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [
        p
        for p, node in _walk(schema, "spec")
        if p and not p.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert not missing, f"undocumented fields: {missing}"


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.kind)
def test_crd_names(kind):
    crd = crd_for(kind)
    names = crd["spec"]["names"]
    assert names["categories"] == ["kiln"]
    assert names["shortNames"] and names["shortNames"][0].startswith("k")
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    cols = [c["name"] for c in version["additionalPrinterColumns"]]
    assert "Ready" in cols and cols[-1] == "Age"


def test_committed_crds_match_generated():
    for d in (ROOT / "crds", ROOT / "charts/kiln/crds"):
        assert check(d) == [], f"{d} drifted: run hack/gen-crds"


def test_verify_fails_on_hand_edit(tmp_path):
    """hack/verify's check catches a CRD edited by hand (and a stale file)."""
    for name, text in all_crds().items():
        (tmp_path / name).write_text(text)
    assert check(tmp_path) == []
    f = tmp_path / "kiln.dev_trainingjobs.yaml"
    f.write_text(f.read_text().replace("maximum: 256", "maximum: 512"))
    (tmp_path / "kiln.dev_stale.yaml").write_text("x: 1\n")
    problems = check(tmp_path)
    assert len(problems) == 2
    assert "maximum: 512" in problems[0]
    rc = subprocess.run(
        [sys.executable, "-m", "kiln", "crds", "--check", "-o", str(tmp_path)], capture_output=True, text=True
    )
    assert rc.returncode == 1 and "hack/gen-crds" in rc.stderr


def test_spec_error_names_the_field():
    """What the schema admits but the model refuses becomes Ready=False naming the field."""
    from pydantic import ValidationError

    from kiln.api.common import spec_error
    from kiln.api.model import ModelSpec

    try:
        ModelSpec.model_validate({"stages": {"staging": 3, "production": 3}})
    except ValidationError as e:
        assert spec_error(e) == "spec.stages: Value error, a version can hold only one stage"
    else:
        raise AssertionError("a version in two stages must be refused")
