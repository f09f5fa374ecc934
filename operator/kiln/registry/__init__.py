"""The model registry's logic: pure functions from (spec, status, inputs) to a new status.

Nothing here talks to the API server or touches files; the Model controller
(:mod:`kiln.controllers.model`, :mod:`kiln.registration`) reads, calls these, and writes with a ``resourceVersion``
precondition, and supplies the one piece of I/O the rules need (verifying an artifact) as a
callback. docs/registry.md is the user-facing description.

Where each part of ``status`` comes from:

- ``versions`` / ``latestVersion``: appended by :func:`register` (TrainingJob results and
  ``spec.import`` entries), numbered ``latestVersion + 1``; immutable once written; pruned to
  ``spec.versionHistoryLimit`` newest plus every version a stage, alias or policy pick names.
- ``policyStages``: the last version ``promotionPolicy`` promoted to each stage, decided once at
  registration (a version passes a rule's metric bound and its artifact verifies).
- ``stages``: in force. ``spec.stages`` wins for every stage it declares; every other stage
  holds the policy's pick. A refused declaration (version not found, artifact missing, digest
  mismatch) leaves the previous version in force. Details in :mod:`kiln.registry.stages`.
- ``aliases``: ``spec.aliases`` after the same validation.
- ``history``: every change of ``stages`` or ``aliases`` with its cause (SpecChange, Policy,
  Rollback, Registration), newest 100 kept.

The operator never writes ``spec``: GitOps tools own it, so they never fight the operator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.api.model import (
    HistoryCause,
    HistoryEntry,
    Lineage,
    ModelSpec,
    ModelStatus,
    ModelVersion,
)
from kiln.mergepatch import merge_patch
from kiln.registry import history, versions
from kiln.registry.stages import Check, Problem, Refusal, policy_pick, replay_policy, resolve

#: Annotation set next to a spec change to say why it was made; the Model controller records the
#: changes of generation ``G`` with cause Rollback when it reads ``Rollback:G`` (see
#: :func:`rollback_annotation`). Tied to one generation, a stale value never mislabels a later edit.
CHANGE_CAUSE_ANNOTATION = "kiln.dev/change-cause"


def rollback_annotation(generation: int) -> str:
    """The :data:`CHANGE_CAUSE_ANNOTATION` value marking ``generation``'s spec change as a rollback."""
    return f"{HistoryCause.ROLLBACK.value}:{generation}"


__all__ = [
    "CHANGE_CAUSE_ANNOTATION",
    "Check",
    "Outcome",
    "Problem",
    "Refusal",
    "merge_patch",
    "rebuild",
    "register",
    "rollback_annotation",
    "settle",
]


@dataclass
class Outcome:
    """Result of one registry step: the new status and what happened on the way."""

    status: ModelStatus
    changes: list[HistoryEntry] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    registered: ModelVersion | None = None
    policy_notes: dict[str, str] = field(default_factory=dict)
    added: list[int] = field(default_factory=list)


def settle(
    spec: ModelSpec,
    status: ModelStatus,
    check: Check,
    *,
    now: str,
    spec_cause: HistoryCause = HistoryCause.SPEC_CHANGE,
    registered: int | None = None,
    policy_notes: Mapping[str, str] | None = None,
) -> Outcome:
    """Bring stages and aliases in force, record the changes, prune old versions.

    Args:
        spec, status: the Model's current spec and status (not modified).
        check: verifies the artifact of a version about to come into force.
        now: RFC 3339 timestamp for history entries.
        spec_cause: SpecChange, or Rollback when the spec change was a ``kiln rollback``.
        registered: version registered in this step (spec declarations naming it are
            recorded with cause Registration).
        policy_notes: stage field -> note, for the history of policy changes.
    """
    res = resolve(
        spec, status, check, now=now, spec_cause=spec_cause, registered=registered, policy_notes=policy_notes
    )
    new = status.model_copy(deep=True)
    new.stages = res.stages
    new.aliases = res.aliases
    new.history = history.append(status.history, res.changes)
    kept, dropped = versions.prune(
        versions.versions_of(new), spec.version_history_limit, versions.pinned_versions(spec, new)
    )
    new.versions = kept or None
    return Outcome(status=new, changes=res.changes, refusals=res.refusals, pruned=dropped)


def register(
    spec: ModelSpec,
    status: ModelStatus,
    check: Check,
    *,
    artifact_uri: str,
    digest: str,
    created_at: str,
    lineage: Lineage,
    metrics: Mapping[str, float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    artifact_problem: Problem | None = None,
    now: str,
    spec_cause: HistoryCause = HistoryCause.SPEC_CHANGE,
    format: str | None = None,
) -> Outcome:
    """Append a version numbered ``latestVersion + 1``, apply the policy, settle.

    ``format`` is the artifact's format (its metadata.json), when it could be read.

    The policy promotes the version only when its artifact verified (``artifact_problem`` is
    None; the caller checks it once, before its retry loop). Spec declarations naming the new
    number come into force in the same step (cause Registration).

    Returns:
        The :class:`Outcome`; ``registered`` is the new entry.
    Raises:
        pydantic.ValidationError: a malformed digest or URI.
    """
    appended, entry = versions.append(
        status,
        artifact_uri=artifact_uri,
        digest=digest,
        created_at=created_at,
        lineage=lineage,
        metrics=metrics,
        hyperparameters=hyperparameters,
        format=format,
    )
    notes: dict[str, str] = {}
    if artifact_problem is None:
        appended.policy_stages, notes = policy_pick(spec, appended.policy_stages, entry)

    def checked(v: ModelVersion) -> Problem | None:
        return artifact_problem if v.version == entry.version else check(v)

    out = settle(
        spec, appended, checked, now=now, spec_cause=spec_cause, registered=entry.version, policy_notes=notes
    )
    out.registered = entry
    out.policy_notes = notes
    return out


def rebuild(
    spec: ModelSpec, status: ModelStatus, restored: Iterable[ModelVersion], *, reserved: int = 0
) -> Outcome:
    """Merge versions restored from registration records back into ``status``.

    Original numbers are kept; existing entries win; ``latestVersion`` never decreases and is
    at least ``reserved`` (the highest number any record claims, restored or not: a number once
    issued is never issued again, even when its artifact failed verification). When the
    policy picks were lost too (``policyStages`` absent), they are recomputed by replaying the
    current ``promotionPolicy`` over every version in number order. Stages and aliases are
    left to the controller's next reconcile, which validates them as usual.
    """
    merged, added = versions.merge_restored(status, restored)
    merged.latest_version = max(merged.latest_version, reserved)
    if merged.policy_stages is None and spec.promotion_policy:
        merged.policy_stages = replay_policy(spec, versions.versions_of(merged))
    kept, dropped = versions.prune(
        versions.versions_of(merged), spec.version_history_limit, versions.pinned_versions(spec, merged)
    )
    merged.versions = kept or None
    return Outcome(status=merged, pruned=dropped, added=added)
