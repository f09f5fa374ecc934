"""Stages and aliases in force: spec declarations, policy picks, refusals, rollbacks.

How ``spec.stages``, ``promotionPolicy`` and ``status`` combine (see docs/registry.md):

1. Each stage that ``spec.stages`` declares is taken from spec, if the declared version is
   registered and its artifact verifies. A refused declaration keeps the previous version of
   that stage in force and is reported (``Ready=False`` naming the stage, version and reason).
2. Each stage that spec does *not* declare holds ``status.policyStages``' pick for it (the last
   version the promotion policy promoted), or nothing. So removing a declaration from spec
   hands the stage back to the policy; with no policy pick, the stage becomes empty.
3. A version holds at most one stage. When two sources name the same version, a valid spec
   declaration wins over a kept previous assignment, which wins over a policy pick; the loser
   becomes empty for now. ``archived`` comes from spec only.
4. Aliases come from ``spec.aliases`` only (same validation, same "previous stays" rule); an
   alias removed from spec is removed from status.

Artifact checks run only for an assignment that would *change* (a version already in force for
that stage or alias is not re-verified on every reconcile); the caller supplies the check, so
this module stays free of I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kiln.api.model import (
    HistoryCause,
    HistoryEntry,
    ModelSpec,
    ModelStatus,
    ModelVersion,
    PromotionRule,
    Stage,
    StageAssignments,
)
from kiln.registry import history

#: (field of StageAssignments, stage), highest rank first: the order of conflict resolution.
STAGE_FIELDS: tuple[tuple[str, Stage], ...] = (
    ("production", Stage.PRODUCTION),
    ("staging", Stage.STAGING),
    ("development", Stage.DEVELOPMENT),
)
FIELD_OF_STAGE = {stage.value: name for name, stage in STAGE_FIELDS}
RANK = {name: len(STAGE_FIELDS) - i for i, (name, _) in enumerate(STAGE_FIELDS)}

VERSION_NOT_FOUND = "VersionNotFound"
ARTIFACT_MISSING = "ArtifactMissing"
DIGEST_MISMATCH = "DigestMismatch"
ARTIFACT_INVALID = "ArtifactInvalid"


@dataclass(frozen=True)
class Problem:
    """Why a version's artifact cannot back a stage or alias (from the caller's check)."""

    reason: str  # ArtifactMissing | DigestMismatch | ArtifactInvalid
    message: str


@dataclass(frozen=True)
class Refusal:
    """A declaration that is not in force: ``target`` names it (``stages.production``,
    ``stages.archived``, ``aliases.champion``, ``import[0]``)."""

    target: str
    version: int | None
    reason: str
    message: str

    def describe(self) -> str:
        """One line for conditions and the CLI."""
        who = f"version {self.version}" if self.version is not None else "entry"
        return f"{self.target}: {who} refused ({self.reason}): {self.message}"


def permanent(refusal: Refusal, latest_version: int) -> bool:
    """Whether ``refusal`` can only be resolved by a person (kstatus ``Stalled``), not by waiting.

    Permanent: a declared version number that was pruned (``<= latestVersion`` and not kept;
    numbers are never reused), and a stage or alias naming a registered version whose stored
    artifact does not match its immutable digest (DigestMismatch) or whose metadata cannot be
    read (ArtifactInvalid). Not permanent: a number not issued yet (a registration may bring
    it), a missing artifact (it may be copied in later), and any problem of a ``spec.import``
    entry (its artifact may still be being copied).
    """
    if refusal.reason == VERSION_NOT_FOUND:
        return refusal.version is not None and refusal.version <= latest_version
    if refusal.target.startswith("import"):
        return False
    return refusal.reason in (DIGEST_MISMATCH, ARTIFACT_INVALID)


#: ``check(version) -> Problem | None``: verifies the artifact behind a version (I/O, by the caller).
Check = Callable[[ModelVersion], Problem | None]


@dataclass
class Resolution:
    """What is in force after :func:`resolve`, what changed, and what was refused."""

    stages: StageAssignments | None
    aliases: dict[str, int] | None
    changes: list[HistoryEntry] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


def stage_field(stage: str) -> str:
    """``"Production"`` -> ``"production"`` (Development, Staging, Production).

    Raises:
        ValueError: for another name (Archived and None are not single-version stages).
    """
    try:
        return FIELD_OF_STAGE[stage]
    except KeyError:
        raise ValueError(f"{stage!r} is not one of Development, Staging, Production") from None


def resolve(
    spec: ModelSpec,
    status: ModelStatus,
    check: Check,
    *,
    now: str,
    spec_cause: HistoryCause = HistoryCause.SPEC_CHANGE,
    registered: int | None = None,
    policy_notes: Mapping[str, str] | None = None,
) -> Resolution:
    """Compute the stages and aliases in force (rules in the module docstring).

    The rules apply in rank order: valid spec declarations (:func:`_declared_stages`, then
    :func:`_archived`), kept previous versions of refused declarations (:func:`_kept_stages`),
    policy picks (:func:`_policy_stages`); aliases (:func:`_aliases`) are independent. Refusals
    are listed in that order; each artifact is checked at most once.

    Args:
        spec: the Model's spec.
        status: the current status (``versions``, ``stages``, ``aliases``, ``policyStages``).
        check: verifies the artifact of a version about to come into force.
        now: RFC 3339 time stamped on history entries.
        spec_cause: cause recorded for changes coming from spec (SpecChange or Rollback).
        registered: a version registered in this same step; a spec declaration naming it that
            comes into force is recorded with cause Registration.
        policy_notes: stage field -> note for the history of policy changes (e.g. the rule).
    Returns:
        The :class:`Resolution`; ``changes`` are history entries stamped ``now``.
    """
    gate = _Gate({v.version: v for v in status.versions or []}, status.latest_version, check)
    cur = status.stages or StageAssignments()
    decl = spec.stages or StageAssignments()
    picks = _Picks()
    _declared_stages(decl, cur, gate, picks)
    archived = _archived(decl, cur, gate, picks)
    _kept_stages(decl, cur, gate.known, picks)
    _policy_stages(decl, status.policy_stages or StageAssignments(), gate.known, picks)
    cur_aliases = dict(status.aliases or {})
    aliases = _aliases(spec.aliases or {}, cur_aliases, gate)

    stamp = _Stamp(now, spec_cause, registered, policy_notes or {})
    changes = [
        *_stage_changes(cur, decl, picks, stamp),
        *_archive_changes(list(cur.archived or []), archived, stamp),
        *_alias_changes(cur_aliases, aliases, stamp),
    ]
    values = {name: v for name, (v, _) in picks.chosen.items()}
    stages = StageAssignments(**values, archived=archived or None) if values or archived else None
    return Resolution(stages=stages, aliases=aliases or None, changes=changes, refusals=gate.refusals)


@dataclass
class _Gate:
    """Admission of a version to a stage or alias during one :func:`resolve`.

    ``known``: the kept versions by number; ``latest``: ``status.latestVersion``. Collects the
    refusals in the order they happen and caches ``check``'s answer per version.
    """

    known: dict[int, ModelVersion]
    latest: int
    check: Check
    checked: dict[int, Problem | None] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)

    def admit(self, target: str, n: int, in_force: bool, *, verify: bool = True) -> bool:
        """Whether version ``n`` may back ``target``; a refusal is recorded when not.

        The version must be kept (VersionNotFound names pruned vs never registered). Its
        artifact is verified only when the assignment would change (``in_force`` False) and
        ``verify`` is set; the check's Problem becomes the refusal.
        """
        if n not in self.known:
            detail = "was pruned" if n <= self.latest else "is not registered"
            message = f"version {n} {detail} (latest is {self.latest})"
            self.refusals.append(Refusal(target, n, VERSION_NOT_FOUND, message))
            return False
        if in_force or not verify:
            return True
        if n not in self.checked:
            self.checked[n] = self.check(self.known[n])
        problem = self.checked[n]
        if problem is not None:
            self.refusals.append(Refusal(target, n, problem.reason, problem.message))
            return False
        return True


@dataclass
class _Picks:
    """The stage picks so far: field -> (version, source: spec | kept | policy), and the
    versions already holding a stage or archived (a version holds at most one)."""

    chosen: dict[str, tuple[int, str]] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)

    def take(self, name: str, n: int, source: str) -> None:
        self.chosen[name] = (n, source)
        self.taken.add(n)


def _declared_stages(decl: StageAssignments, cur: StageAssignments, gate: _Gate, picks: _Picks) -> None:
    """Rule 1: each stage spec declares, if the gate admits the declared version."""
    for name, _ in STAGE_FIELDS:
        n = getattr(decl, name)
        if n is not None and gate.admit(f"stages.{name}", n, getattr(cur, name) == n):
            picks.take(name, n, "spec")


def _archived(decl: StageAssignments, cur: StageAssignments, gate: _Gate, picks: _Picks) -> list[int]:
    """``archived`` from spec only: each declared version that exists (no artifact needed)."""
    archived: list[int] = []
    for n in decl.archived or []:
        # Retiring a version needs no artifact: only that it exists.
        if gate.admit("stages.archived", n, n in (cur.archived or []), verify=False):
            archived.append(n)
            picks.taken.add(n)
    return archived


def _kept_stages(
    decl: StageAssignments, cur: StageAssignments, known: Mapping[int, ModelVersion], picks: _Picks
) -> None:
    """Rule 1's refusals: a declared stage whose declaration was refused keeps its previous
    version, if that is still kept and holds nothing else now."""
    for name, _ in STAGE_FIELDS:
        prev = getattr(cur, name)
        if (
            getattr(decl, name) is not None
            and name not in picks.chosen
            and prev in known
            and prev not in picks.taken
        ):
            picks.take(name, prev, "kept")


def _policy_stages(
    decl: StageAssignments, pol: StageAssignments, known: Mapping[int, ModelVersion], picks: _Picks
) -> None:
    """Rule 2: a stage spec does not declare holds the policy's pick, if kept and not taken."""
    for name, _ in STAGE_FIELDS:
        n = getattr(pol, name)
        if getattr(decl, name) is None and n is not None and n in known and n not in picks.taken:
            picks.take(name, n, "policy")


def _aliases(declared: Mapping[str, int], cur_aliases: Mapping[str, int], gate: _Gate) -> dict[str, int]:
    """Rule 4: aliases from spec only, by name; a refused one keeps its previous version (if kept)."""
    aliases: dict[str, int] = {}
    for a, n in sorted(declared.items()):
        prev_a = cur_aliases.get(a)
        if gate.admit(f"aliases.{a}", n, prev_a == n):
            aliases[a] = n
        elif prev_a is not None and prev_a in gate.known:
            aliases[a] = prev_a
    return aliases


@dataclass(frozen=True)
class _Stamp:
    """How :func:`resolve`'s history entries are stamped: time, causes, policy notes."""

    now: str
    spec_cause: HistoryCause
    registered: int | None
    policy_notes: Mapping[str, str]

    def spec_or_registration(self, to: int | None) -> HistoryCause:
        """Registration for a change to the version registered in this step, else ``spec_cause``."""
        return HistoryCause.REGISTRATION if to is not None and to == self.registered else self.spec_cause


def _stage_changes(
    cur: StageAssignments, decl: StageAssignments, picks: _Picks, stamp: _Stamp
) -> list[HistoryEntry]:
    """One entry per stage whose version changes: cause Policy for a policy pick (noted with its
    rule), else the spec cause with :func:`_spec_note`."""
    changes: list[HistoryEntry] = []
    for name, stage in STAGE_FIELDS:
        old = getattr(cur, name)
        new, source = picks.chosen.get(name, (None, "none"))
        if old == new:
            continue
        if source == "policy":
            cause = HistoryCause.POLICY
            note = stamp.policy_notes.get(name) or "in force from promotionPolicy"
        else:
            cause = stamp.spec_or_registration(new)
            note = _spec_note(name, decl, old, new, picks.taken)
        changes.append(
            history.entry(stamp.now, cause, stage=stage.value, from_version=old, to_version=new, message=note)
        )
    return changes


def _archive_changes(old_archived: list[int], archived: list[int], stamp: _Stamp) -> list[HistoryEntry]:
    """Archived versions added (in spec order), then those no longer archived (in status order)."""
    added = [
        history.entry(
            stamp.now,
            stamp.spec_or_registration(n),
            stage=Stage.ARCHIVED.value,
            to_version=n,
            message="spec.stages.archived",
        )
        for n in archived
        if n not in old_archived
    ]
    removed = [
        history.entry(
            stamp.now,
            stamp.spec_cause,
            stage=Stage.ARCHIVED.value,
            from_version=n,
            message="removed from spec.stages.archived",
        )
        for n in old_archived
        if n not in archived
    ]
    return added + removed


def _alias_changes(
    cur_aliases: Mapping[str, int], aliases: Mapping[str, int], stamp: _Stamp
) -> list[HistoryEntry]:
    """One entry per alias (by name) set, moved or removed."""
    changes: list[HistoryEntry] = []
    for a in sorted(set(cur_aliases) | set(aliases)):
        old_v, new_v = cur_aliases.get(a), aliases.get(a)
        if old_v != new_v:
            changes.append(
                history.entry(
                    stamp.now,
                    stamp.spec_or_registration(new_v),
                    alias=a,
                    from_version=old_v,
                    to_version=new_v,
                    message=f"spec.aliases.{a}",
                )
            )
    return changes


def _spec_note(name: str, decl: StageAssignments, old: int | None, new: int | None, taken: set[int]) -> str:
    if new is not None:
        return f"spec.stages.{name}"
    if old is not None and old in taken:
        return f"version {old} now holds another stage declared in spec.stages"
    if getattr(decl, name) is None:
        return f"spec.stages.{name} is no longer declared and promotionPolicy has no pick for it"
    return f"spec.stages.{name} is refused and version {old} no longer holds the stage"


def rule_passes(rule: PromotionRule, metrics: Mapping[str, float] | None) -> bool:
    """Whether ``metrics[rule.metric]`` is present, a number, and within ``[min, max]``."""
    value = (metrics or {}).get(rule.metric)
    if value is None or isinstance(value, bool) or math.isnan(float(value)):
        return False
    if rule.min is not None and float(value) < rule.min:
        return False
    return not (rule.max is not None and float(value) > rule.max)


def describe_rule(rule: PromotionRule, value: float | None) -> str:
    """e.g. ``promotionPolicy: accuracy=0.97 >= 0.95 -> Production``."""
    bounds = []
    if rule.min is not None:
        bounds.append(f">= {rule.min:g}")
    if rule.max is not None:
        bounds.append(f"<= {rule.max:g}")
    return f"promotionPolicy: {rule.metric}={value:g} {' and '.join(bounds)} -> {rule.stage}"


def policy_pick(
    spec: ModelSpec, policy_stages: StageAssignments | None, version: ModelVersion
) -> tuple[StageAssignments | None, dict[str, str]]:
    """Apply ``promotionPolicy`` to a newly registered version.

    Every rule whose metric bound the version passes is a match; the version goes to the
    highest-ranked matched stage (Production > Staging > Development), as one version holds one
    stage. The pick is recorded even when spec declares that stage (spec wins while it does).

    Returns:
        ``(new policyStages, {stage field: note})``; unchanged and ``{}`` when no rule matches.
    """
    matches = [r for r in spec.promotion_policy or [] if rule_passes(r, version.metrics)]
    if not matches:
        return policy_stages, {}
    best = max(matches, key=lambda r: RANK[stage_field(r.stage)])
    name = stage_field(best.stage)
    values = {n: getattr(policy_stages, n) if policy_stages else None for n, _ in STAGE_FIELDS}
    for n in values:
        if values[n] == version.version:
            values[n] = None
    values[name] = version.version
    note = describe_rule(best, (version.metrics or {}).get(best.metric))
    return StageAssignments(**values), {name: note}


def replay_policy(spec: ModelSpec, versions: Iterable[ModelVersion]) -> StageAssignments | None:
    """The policy picks a registration-ordered replay of ``versions`` would have made.

    Used by ``kiln registry rebuild`` when a restore dropped ``status.policyStages``: with the
    same policy and the same versions it gives the same picks as the original registrations.
    """
    picks: StageAssignments | None = None
    for v in sorted(versions, key=lambda v: v.version):
        picks, _ = policy_pick(spec, picks, v)
    return picks


def rollback_target(
    entries: Iterable[HistoryEntry] | None, current: int | None, stage: str = Stage.PRODUCTION.value
) -> int | None:
    """The version ``kiln rollback`` returns ``stage`` to, from the audit trail.

    The stage's history is replayed as a stack: a change pushes its new version, a Rollback
    pops the version it undid. So repeated rollbacks walk further back (3 -> 2 -> 1) instead of
    toggling between the last two versions, and a rollback after a new promotion returns to
    the version before that promotion.

    Returns:
        The version below ``current`` on the stack, or None when history knows none.
    """
    if current is None:
        return None
    stack: list[int] = []
    for e in entries or []:
        if e.stage != stage:
            continue
        if e.cause == HistoryCause.ROLLBACK:
            if stack:
                stack.pop()
        elif not stack and e.from_version is not None:
            stack.append(e.from_version)
        if e.to_version is not None and (not stack or stack[-1] != e.to_version):
            stack.append(e.to_version)
    if stack and stack[-1] == current:
        stack.pop()
    while stack:
        candidate = stack.pop()
        if candidate != current:
            return candidate
    return None
