"""Artifact format v2 (``kiln.sdk``): metadata validation and verification, without torch.

Files here are plain bytes standing in for ``model.pt2`` / ``model.onnx``: verification only
hashes them. The registry's classification (reasons on ``Ready=False``) is checked through
``kiln.registry.artifacts.verify``, the operator's one entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kiln import storage
from kiln.artifact import (
    METADATA_FILE,
    ArtifactError,
    ArtifactMetadata,
    DigestMismatch,
    MissingFile,
    TensorSpec,
    UnknownFormat,
    artifact_files,
    metadata_problems,
    path_to_uri,
    sha256_file,
    verify_artifact,
)
from kiln.registry import artifacts

NOW = "2026-12-01T00:00:00Z"
SIGNATURE = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}


def write(d: Path, fmt: str = "torch-export", extra: dict[str, bytes] | None = None, **meta: Any) -> str:
    """A schema-2 artifact with a fake model file (and ``extra`` files); returns its digest."""
    model = {"torch-export": "model.pt2", "onnx": "model.onnx"}.get(fmt, "model.bin")
    d.mkdir(parents=True, exist_ok=True)
    (d / model).write_bytes(b"program bytes of " + fmt.encode())
    for name, data in (extra or {}).items():
        (d / name).write_bytes(data)
    files = {f.name: sha256_file(f) for f in d.iterdir() if f.name != METADATA_FILE}
    digest = files[model]
    doc = {
        "schemaVersion": 2,
        "format": fmt,
        "weightsDigest": digest,
        "files": files,
        "createdAt": NOW,
        **SIGNATURE,
        **meta,
    }
    (d / METADATA_FILE).write_text(json.dumps(doc))
    return digest


@pytest.mark.parametrize("fmt", ["torch-export", "onnx"])
def test_v2_artifact_verifies_and_lists_its_files(tmp_path: Path, fmt: str) -> None:
    digest = write(tmp_path, fmt, extra={"model.onnx.data": b"external weights"})
    meta = verify_artifact(tmp_path, digest)
    assert meta.format == fmt and meta.inputs[0] == TensorSpec(
        name="image", datatype="FP32", shape=[-1, 1, 8, 8]
    )
    assert artifact_files(meta)[0] == ("model.pt2" if fmt == "torch-export" else "model.onnx")
    assert "model.onnx.data" in artifact_files(meta)
    assert storage.verify_artifact_at(path_to_uri(tmp_path), digest) == meta
    assert artifacts.verify(path_to_uri(tmp_path), digest) == (meta, None)


def test_schema1_metadata_is_kiln_mlp() -> None:
    meta = ArtifactMetadata.model_validate({"weightsDigest": "sha256:" + "a" * 64, "createdAt": NOW})
    assert meta.format == "kiln-mlp" and meta.schemaVersion == 1
    assert artifact_files(meta) == ["model.safetensors", "config.json"]
    assert metadata_problems(meta) == []


def test_unknown_format_is_refused_naming_it(tmp_path: Path) -> None:
    digest = write(tmp_path, "tensorflow-savedmodel")
    with pytest.raises(UnknownFormat, match="unknown artifact format 'tensorflow-savedmodel'"):
        verify_artifact(tmp_path, digest)
    _, problem = artifacts.verify(path_to_uri(tmp_path), digest)
    assert problem is not None and problem.reason == "ArtifactInvalid"
    assert (
        "tensorflow-savedmodel" in problem.message
        and "known: kiln-mlp, torch-export, onnx" in problem.message
    )


def test_other_file_digest_mismatch_names_the_file(tmp_path: Path) -> None:
    digest = write(tmp_path, "onnx", extra={"model.onnx.data": b"external weights"})
    (tmp_path / "model.onnx.data").write_bytes(b"tampered weights")
    with pytest.raises(DigestMismatch, match=r"digest of model\.onnx\.data") as e:
        verify_artifact(tmp_path, digest)
    assert e.value.file == "model.onnx.data"
    _, problem = artifacts.verify(path_to_uri(tmp_path), digest)
    assert problem is not None and problem.reason == "DigestMismatch" and "model.onnx.data" in problem.message


def test_model_file_mismatch_and_wrong_expected_digest(tmp_path: Path) -> None:
    digest = write(tmp_path)
    _, problem = artifacts.verify(path_to_uri(tmp_path), "sha256:" + "0" * 64)
    assert problem is not None and problem.reason == "DigestMismatch"
    assert "model.pt2" in problem.message and "expected" in problem.message
    (tmp_path / "model.pt2").write_bytes(b"another program")
    with pytest.raises(DigestMismatch, match=r"weights digest of model\.pt2 .* != metadata"):
        verify_artifact(tmp_path, digest)


def test_missing_file_is_named(tmp_path: Path) -> None:
    digest = write(tmp_path, "onnx", extra={"model.onnx.data": b"external weights"})
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(MissingFile, match=r"missing model\.onnx\.data") as e:
        verify_artifact(tmp_path, digest)
    assert e.value.file == "model.onnx.data"
    _, problem = artifacts.verify(path_to_uri(tmp_path), digest)
    assert (
        problem is not None and problem.reason == "ArtifactMissing" and "model.onnx.data" in problem.message
    )


def test_cache_notices_a_replaced_extra_file(tmp_path: Path) -> None:
    digest = write(tmp_path, "onnx", extra={"model.onnx.data": b"external weights"})
    cache = storage.VerificationCache()
    uri = path_to_uri(tmp_path)
    assert cache.verify(uri, digest).format == "onnx"
    assert cache.verify(uri, digest).format == "onnx"  # hit
    (tmp_path / "model.onnx.data").write_bytes(b"tampered weights")
    with pytest.raises(DigestMismatch, match=r"model\.onnx\.data"):
        cache.verify(uri, digest)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"inputs": []}, "needs 'inputs' and 'outputs'"),
        ({"files": {}}, "'files' must list model.pt2"),
        (
            {"outputs": SIGNATURE["outputs"] * 2},
            "'outputs' names a tensor more than once",
        ),
    ],
)
def test_inconsistent_metadata_is_invalid(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    digest = write(tmp_path, **change)
    with pytest.raises(ArtifactError, match=message):
        verify_artifact(tmp_path, digest)
    _, problem = artifacts.verify(path_to_uri(tmp_path), digest)
    assert problem is not None and problem.reason == "ArtifactInvalid" and message in problem.message


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("inputs", [{"name": "x", "datatype": "STRING", "shape": [-1]}], "datatype must be one of"),
        ("inputs", [{"name": "x", "datatype": "FP32", "shape": [4, 3]}], "batch"),
        ("inputs", [{"name": "x", "datatype": "FP32", "shape": [-1, -2]}], "-1 \\(dynamic\\) or >= 0"),
        ("files", {"../evil": "sha256:" + "a" * 64}, "normalised relative path"),
        ("files", {"metadata.json": "sha256:" + "a" * 64}, "normalised relative path"),
        ("files", {"model.pt2": "md5:abc"}, "sha256"),
    ],
)
def test_metadata_schema_refuses(field: str, value: Any, message: str) -> None:
    doc = {"weightsDigest": "sha256:" + "a" * 64, "createdAt": NOW, "format": "torch-export", field: value}
    with pytest.raises(ValidationError, match=message):
        ArtifactMetadata.model_validate(doc)


def test_operator_path_imports_no_torch() -> None:
    """Verification lives in modules the operator imports: none of them may pull in torch."""
    code = (
        "import sys, kiln.artifact, kiln.storage, kiln.registry.artifacts, kiln.resources.trainingjob;"
        "sys.exit('torch' in sys.modules or 'onnx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
