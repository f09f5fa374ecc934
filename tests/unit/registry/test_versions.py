"""Numbering, append, pruning and restore of versions."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kiln.api.model import Lineage, ModelStatus
from kiln.registry import versions

from .util import NOW, add_versions, digest, spec, status_with


def test_numbers_are_consecutive_from_one() -> None:
    s = add_versions(ModelStatus(), 3)
    assert [v.version for v in s.versions or []] == [1, 2, 3]
    assert s.latest_version == 3


def test_append_does_not_modify_its_input() -> None:
    before = add_versions(ModelStatus(), 1)
    after, entry = versions.append(
        before, artifact_uri="file:///a", digest=digest(9), created_at=NOW, lineage=Lineage(source="Import")
    )
    assert entry.version == 2 and after.latest_version == 2
    assert before.latest_version == 1 and len(before.versions or []) == 1


def test_numbers_are_never_reused_after_pruning() -> None:
    s = add_versions(ModelStatus(), 5)
    kept, dropped = versions.prune(s.versions or [], 2, pinned=set())
    s = s.model_copy(update={"versions": kept})
    assert dropped == [1, 2, 3]
    s = add_versions(s, 1)
    assert [v.version for v in s.versions or []] == [4, 5, 6]


def test_append_rejects_a_malformed_digest() -> None:
    with pytest.raises(ValidationError):
        versions.append(
            ModelStatus(),
            artifact_uri="file:///a",
            digest="md5:abc",
            created_at=NOW,
            lineage=Lineage(source="Import"),
        )


def test_metrics_and_hyperparameters_are_capped_for_status() -> None:
    many = {f"m{i:03d}": float(i) for i in range(100)}
    _s, entry = versions.append(
        ModelStatus(),
        artifact_uri="file:///a",
        digest=digest(1),
        created_at=NOW,
        lineage=Lineage(source="Import"),
        metrics=many,
        hyperparameters=many,
    )
    assert entry.metrics is not None and len(entry.metrics) == 64  # maxProperties
    assert entry.hyperparameters is not None and 0 < len(entry.hyperparameters) < 64  # byte budget
    size = sum(len(json.dumps(x, separators=(",", ":"))) for x in (entry.metrics, entry.hyperparameters))
    assert size <= versions.MAX_VERSION_EXTRAS_BYTES
    assert versions.cap_map({}) is None


def test_fit_extras_drops_the_largest_entries_hyperparameters_first() -> None:
    metrics = {"accuracy": 0.9, "loss": 0.1}
    hyper = {"lr": 0.1, "notes": "x" * 2000, "layers": [128, 64]}
    m, h = versions.fit_extras(metrics, hyper)
    assert m == metrics and h == {"lr": 0.1, "layers": [128, 64]}
    m, h = versions.fit_extras({f"k{i}": 1.0 for i in range(10)}, {"a": 1}, budget=40)
    assert h is None and m is not None and len(json.dumps(m, separators=(",", ":"))) <= 40
    assert versions.fit_extras(None, None) == (None, None)


def test_find_by_training_job_and_artifact() -> None:
    s = add_versions(ModelStatus(), 3)
    found = versions.find_by_training_job(s, "digits-train-0002-abcde")
    assert found is not None and found.version == 2
    assert versions.find_by_training_job(s, "other") is None
    assert versions.find_by_artifact(s, found.artifact_uri, found.digest) == found
    assert versions.find_by_artifact(s, found.artifact_uri, digest(99)) is None


def test_prune_keeps_newest_and_pinned_in_order() -> None:
    s = add_versions(ModelStatus(), 10)
    kept, dropped = versions.prune(s.versions or [], 3, pinned={2, 5})
    assert [v.version for v in kept] == [2, 5, 8, 9, 10]
    assert dropped == [1, 3, 4, 6, 7]


def test_pinned_versions_come_from_spec_status_and_policy() -> None:
    sp = spec(stages={"production": 1, "archived": [2]}, aliases={"champion": 3})
    st = status_with(9, stages={"staging": 4}, aliases={"old": 5}, policyStages={"development": 6})
    assert versions.pinned_versions(sp, st) == {1, 2, 3, 4, 5, 6}


def test_merge_restored_keeps_original_numbers_and_existing_entries() -> None:
    full = add_versions(ModelStatus(), 5)
    lost = ModelStatus()
    restored = [v for v in full.versions or [] if v.version != 3]
    merged, added = versions.merge_restored(lost, reversed(restored))
    assert added == [1, 2, 4, 5]
    assert [v.version for v in merged.versions or []] == [1, 2, 4, 5]
    assert merged.latest_version == 5
    # Existing entries win, and latestVersion never goes down.
    partly = add_versions(ModelStatus(), 7)
    merged2, added2 = versions.merge_restored(partly, restored)
    assert added2 == [] and merged2.latest_version == 7
    assert merged2.versions == partly.versions
