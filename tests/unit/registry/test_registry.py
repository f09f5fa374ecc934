"""Composite registry steps: register, settle, rebuild; history bounds; status size at the limit."""

from __future__ import annotations

import json

import pytest

from kiln.api.model import HISTORY_LIMIT, HistoryCause, Lineage, ModelStatus, StageAssignments
from kiln.registry import Problem, history, merge_patch, rebuild, record, register, settle, versions

from .util import NOW, Checks, add_versions, digest, hyperparameters, lineage, metrics, spec, status_with

POLICY = [{"stage": "Production", "metric": "accuracy", "min": 0.9}]


def _register(sp, st, n: int, *, accuracy: float = 0.5, problem: Problem | None = None, checks=None):  # type: ignore[no-untyped-def]
    return register(
        sp,
        st,
        checks or Checks(),
        artifact_uri=f"file:///store/m/job-{n}",
        digest=digest(n),
        created_at=NOW,
        lineage=lineage(n),
        metrics={"accuracy": accuracy},
        hyperparameters={"lr": 0.1},
        artifact_problem=problem,
        now=NOW,
    )


def test_register_numbers_and_policy_promotion() -> None:
    sp = spec(promotionPolicy=POLICY)
    out = _register(sp, ModelStatus(), 1, accuracy=0.5)
    assert out.registered is not None and out.registered.version == 1
    assert out.status.stages is None and out.changes == []
    out = _register(sp, out.status, 2, accuracy=0.95)
    assert out.registered is not None and out.registered.version == 2
    assert out.status.policy_stages == StageAssignments(production=2)
    assert out.status.stages == StageAssignments(production=2)
    [change] = out.changes
    assert (change.cause, change.stage, change.to_version) == ("Policy", "Production", 2)
    assert "accuracy=0.95 >= 0.9" in (change.message or "")


def test_policy_skips_a_version_whose_artifact_does_not_verify() -> None:
    sp = spec(promotionPolicy=POLICY)
    out = _register(sp, ModelStatus(), 1, accuracy=0.99, problem=Problem("ArtifactMissing", "gone"))
    assert out.registered is not None and out.registered.version == 1
    assert out.status.policy_stages is None and out.status.stages is None


def test_spec_wins_over_policy_at_registration() -> None:
    sp = spec(promotionPolicy=POLICY, stages={"production": 1})
    st = _register(sp, ModelStatus(), 1, accuracy=0.5).status
    assert st.stages == StageAssignments(production=1)
    assert [(e.cause, e.to_version) for e in st.history or []] == [("Registration", 1)]
    out = _register(sp, st, 2, accuracy=0.99)
    assert out.status.policy_stages == StageAssignments(production=2)  # recorded...
    assert out.status.stages == StageAssignments(production=1)  # ...but spec declares production
    assert out.changes == []


def test_declaration_ahead_of_registration_comes_into_force_with_cause_registration() -> None:
    sp = spec(stages={"staging": 3})
    st = status_with(2)
    out = settle(sp, st, Checks(), now=NOW)
    assert out.refusals[0].reason == "VersionNotFound"
    out = _register(sp, st, 3)
    assert out.status.stages == StageAssignments(staging=3)
    assert [(e.cause, e.stage, e.to_version) for e in out.changes] == [("Registration", "Staging", 3)]


def test_the_new_versions_check_is_the_one_made_before_the_retry_loop() -> None:
    sp = spec(stages={"staging": 1})
    checks = Checks()
    out = _register(sp, ModelStatus(), 1, problem=Problem("DigestMismatch", "bad"), checks=checks)
    assert checks.asked == []
    assert out.status.stages is None and out.refusals[0].reason == "DigestMismatch"


def test_history_is_bounded_to_the_newest_entries() -> None:
    st = status_with(3)
    for i in range(HISTORY_LIMIT + 30):
        target = 1 + i % 3
        st = settle(
            spec(stages={"production": target}),
            st,
            Checks(),
            now=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z",
        ).status
    assert len(st.history or []) == HISTORY_LIMIT
    assert (st.history or [])[-1].to_version == 1 + (HISTORY_LIMIT + 29) % 3
    assert (st.history or [])[0].time == "2026-01-01T00:00:30Z"


def test_settle_prunes_to_the_limit_but_keeps_pinned_versions() -> None:
    st = add_versions(ModelStatus(), 30)
    sp = spec(versionHistoryLimit=5, stages={"production": 2, "archived": [3]}, aliases={"champion": 4})
    out = settle(sp, st, Checks(), now=NOW)
    assert [v.version for v in out.status.versions or []] == [2, 3, 4, 26, 27, 28, 29, 30]
    assert out.pruned == [1, *range(5, 26)]
    assert out.status.latest_version == 30


def _status_bytes(sp, st) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    trail = [  # a full audit trail of realistic entries
        history.entry(
            NOW,
            "Policy" if i % 3 else "SpecChange",
            stage="Production",
            from_version=300 + i,
            to_version=301 + i,
            message="promotionPolicy: accuracy=0.9812 >= 0.95 -> Production"
            if i % 3
            else "spec.stages.production",
        )
        for i in range(HISTORY_LIMIT)
    ]
    st = st.model_copy(update={"history": trail})
    out = settle(sp, st, Checks(), now=NOW)
    body = out.status.to_api()
    body["conditions"] = [
        {
            "type": "Ready",
            "status": "True",
            "reason": "InForce",
            "message": "x" * 200,
            "lastTransitionTime": NOW,
            "observedGeneration": 7,
        }
    ]
    body["observedGeneration"] = 7
    size = len(json.dumps(body, separators=(",", ":")).encode())  # as the API server stores it
    return size, len(out.status.versions or []), len(out.status.history or [])


def test_size_at_the_limit_stays_well_under_256_kib() -> None:
    """200 versions with realistic metrics, hyperparameters and lineage, plus a full history."""
    sp = spec(
        versionHistoryLimit=200,
        stages={"production": 398, "staging": 399},
        aliases={"champion": 398},
        promotionPolicy=POLICY,
    )
    size, kept, entries = _status_bytes(sp, add_versions(ModelStatus(), 400))
    print(
        f"\nstatus at versionHistoryLimit=200: {size} bytes ({size / 1024:.1f} KiB, "
        f"{size / 2621.44:.0f}% of 256 KiB); {kept} versions, {entries} history entries"
    )
    assert (kept, entries) == (200, HISTORY_LIMIT)
    assert size < 200 * 1024, size
    # Plus 25 old versions pinned by stages and aliases (kept beyond the limit).
    pinned = spec(
        versionHistoryLimit=200,
        stages={"production": 3, "staging": 4, "archived": list(range(6, 26))},
        aliases={f"alias-{i}": i for i in range(1, 11)},
    )
    size2, kept2, _ = _status_bytes(pinned, add_versions(ModelStatus(), 400))
    print(f"with 25 extra pinned versions: {size2} bytes ({size2 / 1024:.1f} KiB); {kept2} versions")
    assert kept2 == 225 and size2 < 256 * 1024


def test_a_version_entry_is_bounded_whatever_a_job_reports() -> None:
    huge = {f"param_{i}": "v" * 500 for i in range(64)}
    _st, entry = versions.append(
        ModelStatus(),
        artifact_uri="file:///store/m/j",
        digest=digest(1),
        created_at=NOW,
        lineage=lineage(1),
        metrics={f"metric_{i}": 0.5 for i in range(64)},
        hyperparameters=huge,
    )
    assert len(json.dumps(entry.to_api(), separators=(",", ":"))) < versions.MAX_VERSION_EXTRAS_BYTES + 500


def test_rebuild_restores_numbers_and_replays_the_policy() -> None:
    sp = spec(promotionPolicy=POLICY, versionHistoryLimit=3)
    full = ModelStatus()
    for n, acc in enumerate([0.5, 0.95, 0.7, 0.92, 0.6], start=1):
        full = _register(sp, full, n, accuracy=acc).status
    lost = ModelStatus()
    out = rebuild(sp, lost, full.versions or [])
    assert [v.version for v in out.status.versions or []] == [v.version for v in full.versions or []]
    assert out.status.latest_version == 5
    assert out.status.policy_stages == full.policy_stages == StageAssignments(production=4)
    assert out.added == [v.version for v in full.versions or []]
    again = rebuild(sp, out.status, full.versions or [])
    assert again.added == [] and again.status == out.status


def test_merge_patch_deletes_with_null_and_replaces_lists() -> None:
    old = {"a": 1, "stages": {"production": 2, "staging": 3}, "versions": [1, 2], "gone": True}
    new = {"a": 1, "stages": {"production": 4}, "versions": [1, 2, 3]}
    assert merge_patch(old, new) == {
        "gone": None,
        "stages": {"production": 4, "staging": None},
        "versions": [1, 2, 3],
    }
    assert merge_patch(new, new) == {}
    assert merge_patch(None, {"x": {"y": 1}}) == {"x": {"y": 1}}


def test_registration_record_round_trip_and_upsert() -> None:
    st = add_versions(ModelStatus(), 2)
    v1, v2 = st.versions or []
    reg = record.Registration(namespace="ml", model="digits", registered_at=NOW, version=v1)
    rec = record.upsert(None, reg)
    rec = record.upsert(
        rec, record.Registration(namespace="ml", model="other", registered_at=NOW, version=v2)
    )
    rec = record.upsert(rec, reg.model_copy(update={"version": v2}))
    back = record.parse(record.dumps(rec))
    assert back == rec and len(back.registrations) == 2
    found = back.find("ml", "digits")
    assert found is not None and found.version == v2
    assert back.find(None, "other") is not None and back.find("x", "digits") is None
    assert json.loads(record.dumps(rec))["kind"] == "RegistrationRecord"
    try:
        record.parse(b"{not json")
    except record.RecordError:
        pass
    else:  # pragma: no cover
        raise AssertionError("expected RecordError")


def test_versions_helpers_are_pure() -> None:
    st = status_with(2)
    snapshot = st.model_dump()
    versions.append(
        st, artifact_uri="file:///x", digest=digest(3), created_at=NOW, lineage=Lineage(source="Import")
    )
    settle(spec(stages={"production": 1}), st, Checks(), now=NOW)
    rebuild(spec(), st, [])
    assert st.model_dump() == snapshot
    assert HistoryCause.ROLLBACK == "Rollback"
    assert metrics(1)["accuracy"] > 0.8 and hyperparameters(1)["batch_size"] == 64


def test_rebuild_never_reissues_a_number_a_record_claims() -> None:
    full = add_versions(ModelStatus(), 3)
    restored = [v for v in full.versions or [] if v.version != 3]  # v3's artifact failed verification
    out = rebuild(spec(), ModelStatus(), restored, reserved=3)
    assert out.status.latest_version == 3 and out.added == [1, 2]
    _nxt, entry = versions.append(
        out.status,
        artifact_uri="file:///x",
        digest=digest(4),
        created_at=NOW,
        lineage=Lineage(source="Rebuild"),
    )
    assert entry.version == 4


def test_history_entry_for_a_canary_rollback() -> None:
    e = history.entry(
        "2026-11-22T10:00:00Z",
        "CanaryRollback",
        inference_service="digits",
        from_version=3,
        to_version=2,
        message="AnalysisFailed: error-ratio=1 > 0.01",
    )
    assert (
        history.describe(e)
        == "InferenceService digits canary: 3 -> 2 (CanaryRollback): AnalysisFailed: error-ratio=1 > 0.01"
    )
    with pytest.raises(ValueError):
        history.entry(
            "2026-11-22T10:00:00Z", "CanaryRollback", stage="Production", inference_service="digits"
        )
