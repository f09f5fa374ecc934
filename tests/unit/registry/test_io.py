"""The registry's file-side helpers: artifact verification, registration records, CLI helpers.

Local files only (tmp_path); no API server.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kiln import registration as controller
from kiln.api.model import ModelStatus
from kiln.artifact import (
    CONFIG_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactMetadata,
    ModelConfig,
    path_to_uri,
    sha256_file,
)
from kiln.cli.registry import age, declare, scan, table
from kiln.registry import CHANGE_CAUSE_ANNOTATION, artifacts, record, rollback_annotation

from .util import NOW, add_versions


def artifact(root: Path, name: str = "job-1") -> tuple[Path, str]:
    d = root / "digits" / name
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(hashlib.sha256(name.encode()).digest() * 32)
    digest = sha256_file(d / WEIGHTS_FILE)
    (d / CONFIG_FILE).write_text(
        ModelConfig(inputSize=2, numClasses=2, inputMean=[0, 0], inputStd=[1, 1]).model_dump_json()
    )
    (d / METADATA_FILE).write_text(
        ArtifactMetadata(modelName="digits", weightsDigest=digest, createdAt=NOW).model_dump_json()
    )
    return d, digest


def test_verify_classifies_problems(tmp_path: Path) -> None:
    d, digest = artifact(tmp_path)
    meta, problem = artifacts.verify(path_to_uri(d), digest)
    assert problem is None and meta is not None and meta.weightsDigest == digest
    _, problem = artifacts.verify(path_to_uri(d), "sha256:" + "0" * 64)
    assert problem is not None and problem.reason == "DigestMismatch"
    _, problem = artifacts.verify("gs://bucket/x", digest)  # not a scheme Kiln reads
    assert problem is not None and problem.reason == "ArtifactMissing" and "gs" in problem.message
    _, problem = artifacts.verify(path_to_uri(tmp_path / "nope"), digest)
    assert problem is not None and problem.reason == "ArtifactMissing"
    (d / WEIGHTS_FILE).rename(d / "moved")
    _, problem = artifacts.verify(path_to_uri(d), digest)
    assert problem is not None and problem.reason == "ArtifactMissing" and WEIGHTS_FILE in problem.message
    (d / "moved").rename(d / WEIGHTS_FILE)
    (d / METADATA_FILE).write_text("{}")
    _, problem = artifacts.verify(path_to_uri(d), digest)
    assert problem is not None and problem.reason == "ArtifactInvalid"


def test_write_record_then_scan_finds_it(tmp_path: Path) -> None:
    d, digest = artifact(tmp_path)
    artifact(tmp_path, "job-2")  # no record: unregistered
    (tmp_path / "digits" / ".checkpoints").mkdir()
    st = add_versions(ModelStatus(), 1)
    entry = (st.versions or [])[0].model_copy(update={"artifact_uri": path_to_uri(d), "digest": digest})
    assert artifacts.write_record("ml", "digits", entry, model_uid="u1", registered_at=NOW)
    assert artifacts.write_record("ml", "other", entry, registered_at=NOW)  # a second Model, same artifact
    assert artifacts.write_record("ml", "digits", entry, model_uid="u1", registered_at=NOW)  # idempotent
    rec = record.parse((d / record.RECORD_FILE).read_bytes())
    assert [(r.model, r.version.version) for r in rec.registrations] == [("digits", 1), ("other", 1)]
    found, unregistered = scan([str(tmp_path)], "ml", "digits")
    assert [(f.uri, f.registration.version.version if f.registration else None) for f in found] == [
        (path_to_uri(d), 1)
    ]
    assert unregistered == [path_to_uri(tmp_path / "digits" / "job-2")]
    # A restore into another namespace still finds the record.
    found, _ = scan([tmp_path.as_uri()], "elsewhere", "digits")
    assert found and found[0].registration is not None and found[0].registration.namespace == "ml"
    assert not artifacts.write_record(
        "ml", "digits", entry.model_copy(update={"artifact_uri": "file:///nope"}), registered_at=NOW
    )


def test_spec_cause_reads_the_rollback_annotation_of_this_generation_only() -> None:
    meta = {"generation": 7, "annotations": {CHANGE_CAUSE_ANNOTATION: rollback_annotation(7)}}
    assert controller.spec_cause({"metadata": meta}) == "Rollback"
    assert controller.spec_cause({"metadata": {**meta, "generation": 8}}) == "SpecChange"
    assert controller.spec_cause({"metadata": {"generation": 1}}) == "SpecChange"


def test_declare_moves_a_version_between_stages() -> None:
    spec = {"stages": {"production": 2, "staging": 3, "archived": [1]}, "description": "d"}
    assert declare(spec, 3, stage="Production") == {
        "stages": {"production": 3, "archived": [1]},
        "description": "d",
    }
    assert declare(spec, 1, stage="Staging")["stages"] == {"production": 2, "staging": 1}
    assert declare(spec, 3, stage="Production", archive=2)["stages"] == {"production": 3, "archived": [1, 2]}
    assert declare(spec, 2, stage="Archived")["stages"] == {"staging": 3, "archived": [1, 2]}
    assert declare({}, 4, alias="champion") == {"aliases": {"champion": 4}}
    assert spec["stages"]["production"] == 2  # input untouched


def test_table_and_age() -> None:
    assert table([(1, None), ("long-name", "x")], ("A", "B")).splitlines() == [
        "A           B",
        "1           <none>",
        "long-name   x",
    ]
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert [
        age(t, now) for t in ("2026-01-02T03:04:00Z", "2026-01-02T02:00:00Z", "2025-12-01T00:00:00Z")
    ] == ["5s", "1h", "32d"]
    assert age(None) == "<unknown>"


@pytest.mark.parametrize("lineage", [{"trainingJob": "j"}, {"training_job": "j", "image": "i"}])
def test_lineage_accepts_both_spellings_and_defaults_the_source(lineage: dict) -> None:
    lin = controller._lineage({**lineage, "unknownField": 1})
    assert lin.source == "TrainingJob" and lin.training_job == "j"
