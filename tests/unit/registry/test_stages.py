"""Stages and aliases in force: spec declarations, refusals, policy picks, rollback targets."""

from __future__ import annotations

import math

import pytest

from kiln.api.model import HistoryCause, HistoryEntry, ModelStatus, PromotionRule, StageAssignments
from kiln.registry import Problem
from kiln.registry.stages import (
    policy_pick,
    replay_policy,
    resolve,
    rollback_target,
    rule_passes,
    stage_field,
)

from .util import NOW, Checks, add_versions, spec, status_with

MISSING = Problem("ArtifactMissing", "artifact directory /x not found")
MISMATCH = Problem("DigestMismatch", "weights digest sha256:aa != expected sha256:bb")


def test_declared_stages_come_into_force_with_history() -> None:
    checks = Checks()
    r = resolve(spec(stages={"production": 2, "staging": 3}), status_with(3), checks, now=NOW)
    assert r.stages == StageAssignments(production=2, staging=3)
    assert r.refusals == []
    assert sorted(checks.asked) == [2, 3]
    assert [(e.stage, e.from_version, e.to_version, e.cause) for e in r.changes] == [
        ("Production", None, 2, "SpecChange"),
        ("Staging", None, 3, "SpecChange"),
    ]
    assert all(e.time == NOW for e in r.changes)


def test_assignments_already_in_force_are_not_rechecked() -> None:
    checks = Checks()
    r = resolve(spec(stages={"production": 2}), status_with(3, stages={"production": 2}), checks, now=NOW)
    assert checks.asked == [] and r.changes == [] and r.stages == StageAssignments(production=2)


@pytest.mark.parametrize(
    ("declared", "problems", "reason"),
    [
        (9, {}, "VersionNotFound"),
        (3, {3: MISSING}, "ArtifactMissing"),
        (3, {3: MISMATCH}, "DigestMismatch"),
    ],
)
def test_refused_declaration_keeps_the_previous_version(declared: int, problems: dict, reason: str) -> None:
    st = status_with(3, stages={"production": 2})
    r = resolve(spec(stages={"production": declared}), st, Checks(problems), now=NOW)
    assert r.stages == StageAssignments(production=2)
    assert r.changes == []
    assert len(r.refusals) == 1
    refusal = r.refusals[0]
    assert (refusal.target, refusal.version, refusal.reason) == ("stages.production", declared, reason)
    assert f"version {declared}" in refusal.describe() and reason in refusal.describe()


def test_pruned_version_is_reported_as_pruned() -> None:
    st = status_with(3)
    st = st.model_copy(update={"versions": (st.versions or [])[1:]})
    r = resolve(spec(stages={"production": 1}), st, Checks(), now=NOW)
    assert r.refusals[0].reason == "VersionNotFound" and "pruned" in r.refusals[0].message


def test_undeclared_stage_holds_the_policy_pick() -> None:
    st = status_with(5, policyStages={"production": 4, "staging": 5})
    r = resolve(spec(stages={"staging": 3}), st, Checks(), now=NOW)
    assert r.stages == StageAssignments(production=4, staging=3)
    causes = {e.stage: e.cause for e in r.changes}
    assert causes == {"Production": "Policy", "Staging": "SpecChange"}


def test_removing_a_declaration_hands_the_stage_back_to_the_policy_or_empties_it() -> None:
    st = status_with(5, stages={"production": 2, "staging": 3}, policyStages={"production": 4})
    r = resolve(spec(), st, Checks(), now=NOW)
    assert r.stages == StageAssignments(production=4)
    by_stage = {e.stage: e for e in r.changes}
    assert (by_stage["Production"].from_version, by_stage["Production"].to_version) == (2, 4)
    assert by_stage["Production"].cause == "Policy"
    assert (by_stage["Staging"].from_version, by_stage["Staging"].to_version) == (3, None)
    assert by_stage["Staging"].cause == "SpecChange"


def test_spec_wins_over_a_policy_pick_of_the_same_version() -> None:
    st = status_with(5, stages={"production": 5}, policyStages={"production": 5})
    r = resolve(spec(stages={"staging": 5}), st, Checks(), now=NOW)
    assert r.stages == StageAssignments(staging=5)
    prod = next(e for e in r.changes if e.stage == "Production")
    assert prod.to_version is None and "another stage" in (prod.message or "")


def test_archived_needs_only_existence() -> None:
    checks = Checks({1: MISSING})
    r = resolve(spec(stages={"archived": [1, 7]}), status_with(3), checks, now=NOW)
    assert r.stages == StageAssignments(archived=[1])
    assert checks.asked == []
    assert [(x.target, x.version, x.reason) for x in r.refusals] == [
        ("stages.archived", 7, "VersionNotFound")
    ]
    assert [(e.stage, e.to_version) for e in r.changes] == [("Archived", 1)]
    r2 = resolve(spec(), status_with(3, stages={"archived": [1]}), checks, now=NOW)
    assert r2.stages is None and [(e.stage, e.from_version) for e in r2.changes] == [("Archived", 1)]


def test_aliases_validate_like_stages_and_follow_spec() -> None:
    st = status_with(4, aliases={"champion": 2, "old": 1})
    r = resolve(spec(aliases={"champion": 3, "challenger": 9}), st, Checks({3: MISMATCH}), now=NOW)
    assert r.aliases == {"champion": 2}  # refused change keeps 2; challenger refused; old removed
    assert sorted((x.target, x.reason) for x in r.refusals) == [
        ("aliases.challenger", "VersionNotFound"),
        ("aliases.champion", "DigestMismatch"),
    ]
    assert [(e.alias, e.from_version, e.to_version) for e in r.changes] == [("old", 1, None)]
    ok = resolve(spec(aliases={"champion": 3}), st, Checks(), now=NOW)
    assert ok.aliases == {"champion": 3}
    assert {(e.alias, e.from_version, e.to_version) for e in ok.changes} == {
        ("champion", 2, 3),
        ("old", 1, None),
    }


def test_rollback_and_registration_causes() -> None:
    st = status_with(3, stages={"production": 3})
    r = resolve(spec(stages={"production": 2}), st, Checks(), now=NOW, spec_cause=HistoryCause.ROLLBACK)
    assert [(e.cause, e.from_version, e.to_version) for e in r.changes] == [("Rollback", 3, 2)]
    r2 = resolve(
        spec(stages={"staging": 3}, aliases={"next": 3}), status_with(3), Checks(), now=NOW, registered=3
    )
    assert {e.cause for e in r2.changes} == {"Registration"}


def test_conflict_between_kept_and_new_spec_declaration() -> None:
    # production refused (9 missing) would keep 3, but spec now puts 3 in staging: spec wins.
    st = status_with(3, stages={"production": 3})
    r = resolve(spec(stages={"production": 9, "staging": 3}), st, Checks(), now=NOW)
    assert r.stages == StageAssignments(staging=3)
    assert r.refusals[0].target == "stages.production"


@pytest.mark.parametrize(
    ("rule", "value", "ok"),
    [
        ({"min": 0.9}, 0.95, True),
        ({"min": 0.9}, 0.9, True),
        ({"min": 0.9}, 0.89, False),
        ({"max": 0.2}, 0.1, True),
        ({"max": 0.2}, 0.3, False),
        ({"min": 0.1, "max": 0.2}, 0.15, True),
        ({"min": 0.9}, math.nan, False),
        ({"min": 0.9}, None, False),
    ],
)
def test_rule_bounds(rule: dict, value: float | None, ok: bool) -> None:
    r = PromotionRule.model_validate({"stage": "Staging", "metric": "accuracy", **rule})
    assert rule_passes(r, {} if value is None else {"accuracy": value}) is ok


def test_policy_picks_the_highest_matching_stage() -> None:
    sp = spec(
        promotionPolicy=[
            {"stage": "Staging", "metric": "accuracy", "min": 0.8},
            {"stage": "Production", "metric": "accuracy", "min": 0.95},
            {"stage": "Development", "metric": "loss", "max": 1.0},
        ]
    )
    st = add_versions(ModelStatus(), 200)
    low = (st.versions or [])[0]  # accuracy 0.801
    high = (st.versions or [])[-1]  # accuracy 1.0
    picks, notes = policy_pick(sp, None, low)
    assert picks == StageAssignments(staging=1) and "accuracy=0.801 >= 0.8 -> Staging" in notes["staging"]
    picks, notes = policy_pick(sp, picks, high)
    assert picks == StageAssignments(staging=1, production=200) and list(notes) == ["production"]
    assert policy_pick(spec(), picks, high) == (picks, {})


def test_replay_policy_reproduces_the_picks() -> None:
    sp = spec(promotionPolicy=[{"stage": "Production", "metric": "accuracy", "min": 0.9}])
    st = add_versions(ModelStatus(), 150)
    assert replay_policy(sp, reversed(st.versions or [])) == StageAssignments(production=150)
    assert replay_policy(sp, (st.versions or [])[:90]) is None


def _h(cause: str, frm: int | None, to: int | None, stage: str = "Production") -> HistoryEntry:
    return HistoryEntry(time=NOW, cause=cause, stage=stage, from_version=frm, to_version=to)


def test_rollback_target_walks_back_like_a_stack() -> None:
    h = [
        _h("SpecChange", None, 1),
        _h("SpecChange", 1, 2),
        _h("Policy", 2, 3),
        _h("SpecChange", None, 5, "Staging"),
    ]
    assert rollback_target(h, 3) == 2
    h.append(_h("Rollback", 3, 2))
    assert rollback_target(h, 2) == 1  # not back to 3
    h.append(_h("Rollback", 2, 1))
    assert rollback_target(h, 1) is None
    h.append(_h("SpecChange", 1, 4))
    assert rollback_target(h, 4) == 1
    assert rollback_target(h, None) is None
    assert rollback_target([], 3) is None


def test_rollback_target_with_truncated_history_and_gaps() -> None:
    # The oldest entries were dropped: the first kept one still names where it came from.
    assert rollback_target([_h("SpecChange", 7, 8)], 8) == 7
    # A truncated trail starting with a rollback does not resurrect the undone version.
    assert rollback_target([_h("Rollback", 9, 8), _h("SpecChange", 8, 10)], 10) == 8
    # Production was emptied in between: the last version that held it is the target.
    assert (
        rollback_target([_h("SpecChange", None, 3), _h("SpecChange", 3, None), _h("Policy", None, 5)], 5) == 3
    )


def test_stage_field_names() -> None:
    assert stage_field("Production") == "production"
    with pytest.raises(ValueError):
        stage_field("Archived")


@pytest.mark.parametrize(
    ("target", "version", "reason", "expected"),
    [
        ("stages.production", 2, "VersionNotFound", True),  # pruned: numbers are never reused
        ("stages.production", 9, "VersionNotFound", False),  # not issued yet
        ("stages.production", 3, "DigestMismatch", True),
        ("aliases.champion", 3, "ArtifactInvalid", True),
        ("stages.staging", 3, "ArtifactMissing", False),  # may be copied in later
        ("import[0]", None, "DigestMismatch", False),  # the import may still be being copied
    ],
)
def test_only_refusals_a_person_must_resolve_are_permanent(target, version, reason, expected):
    from kiln.registry.stages import Refusal, permanent

    assert permanent(Refusal(target, version, reason, "m"), latest_version=5) is expected
