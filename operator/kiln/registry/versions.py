"""Version numbering, append, lookup and pruning (pure functions on ``ModelStatus``).

Numbers come from ``status.latestVersion``, a monotonic counter: the next version is always
``latestVersion + 1``, whether or not older versions were pruned, so a number is never reused.
Callers make the read -> :func:`append` -> write cycle atomic with the object's
``resourceVersion`` (see :func:`kiln.registration.register_version`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from kiln.api.model import (
    MAX_VERSION_MAP_KEYS,
    Lineage,
    ModelSpec,
    ModelStatus,
    ModelVersion,
    StageAssignments,
)


def cap_map(values: Mapping[str, Any] | None, limit: int = MAX_VERSION_MAP_KEYS) -> dict[str, Any] | None:
    """The first ``limit`` entries of ``values`` in key order (None for empty or None).

    Status keeps at most :data:`~kiln.api.model.MAX_VERSION_MAP_KEYS` metrics and
    hyperparameters per version (the CRD schema's ``maxProperties``); the artifact's
    ``metadata.json`` keeps them all.
    """
    if not values:
        return None
    return {k: values[k] for k in sorted(values)[:limit]}


#: Serialised bytes of one version's metrics plus hyperparameters kept in status. A dozen metrics
#: and a dozen hyperparameters take about 450 bytes; beyond the budget the largest entries are
#: dropped (hyperparameters first), so 200 versions stay well under 256 KiB whatever jobs report.
MAX_VERSION_EXTRAS_BYTES = 1024


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))


def fit_extras(
    metrics: dict[str, Any] | None,
    hyperparameters: dict[str, Any] | None,
    budget: int = MAX_VERSION_EXTRAS_BYTES,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Trim metrics and hyperparameters to ``budget`` serialised bytes together.

    The largest entries (key plus value) go first, hyperparameters before metrics, so the
    small scalar ones people compare versions by survive. Inputs are not modified.
    """
    m, h = dict(metrics or {}), dict(hyperparameters or {})
    while _size(m) + _size(h) > budget and (m or h):
        pool = h if h else m
        pool.pop(max(sorted(pool), key=lambda k: _size({k: pool[k]})))
    return m or None, h or None


def make_version(
    number: int,
    *,
    artifact_uri: str,
    digest: str,
    created_at: str,
    lineage: Lineage,
    metrics: Mapping[str, float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    format: str | None = None,
) -> ModelVersion:
    """A :class:`ModelVersion` entry with metrics and hyperparameters capped for status
    (:func:`cap_map`, then :func:`fit_extras`).

    Raises:
        pydantic.ValidationError: a malformed digest, URI or number.
    """
    capped_metrics = cap_map(metrics)
    kept_metrics, kept_hyperparameters = fit_extras(
        {k: float(v) for k, v in capped_metrics.items()} if capped_metrics else None, cap_map(hyperparameters)
    )
    return ModelVersion(
        version=number,
        artifact_uri=artifact_uri,
        digest=digest,
        metrics=kept_metrics,
        hyperparameters=kept_hyperparameters,
        lineage=lineage,
        created_at=created_at,
        format=format,
    )


def versions_of(status: ModelStatus) -> list[ModelVersion]:
    """The kept versions, oldest first (empty list when none)."""
    return list(status.versions or [])


def get_version(status: ModelStatus, number: int) -> ModelVersion | None:
    """The kept version ``number``, or None (never registered, or pruned)."""
    for v in status.versions or []:
        if v.version == number:
            return v
    return None


def find_by_training_job(status: ModelStatus, job: str) -> ModelVersion | None:
    """The kept version registered by TrainingJob ``job`` (the idempotency key), or None."""
    for v in status.versions or []:
        if v.lineage is not None and v.lineage.training_job == job:
            return v
    return None


def find_by_artifact(status: ModelStatus, artifact_uri: str, digest: str) -> ModelVersion | None:
    """The kept version with this artifact URI and digest, or None."""
    for v in status.versions or []:
        if v.artifact_uri == artifact_uri and v.digest == digest:
            return v
    return None


def append(
    status: ModelStatus, entry_without_number: ModelVersion | None = None, **fields: Any
) -> tuple[ModelStatus, ModelVersion]:
    """Append a new version numbered ``latestVersion + 1``; the input is not modified.

    Either pass the keyword arguments of :func:`make_version` (without ``number``), or a
    prepared entry whose ``version`` is ignored and replaced by the new number.

    Returns:
        ``(new status, the new entry)``.
    """
    number = status.latest_version + 1
    if entry_without_number is not None:
        entry = entry_without_number.model_copy(update={"version": number}, deep=True)
    else:
        entry = make_version(number, **fields)
    # Entries are immutable by contract, so the new status may share them with the old one.
    new = status.model_copy(update={"versions": [*versions_of(status), entry], "latest_version": number})
    return new, entry


def pinned_versions(spec: ModelSpec, status: ModelStatus) -> set[int]:
    """Versions that must never be pruned: every version a stage, alias or policy pick names,
    in spec (declared) or in status (in force)."""
    out: set[int] = set()
    for stages in (spec.stages, status.stages, status.policy_stages):
        out |= stage_members(stages)
    for aliases in (spec.aliases, status.aliases):
        out |= set((aliases or {}).values())
    return out


def stage_members(stages: StageAssignments | None) -> set[int]:
    """Every version number an assignment names (including archived ones)."""
    if stages is None:
        return set()
    out = {v for v in (stages.development, stages.staging, stages.production) if v is not None}
    return out | set(stages.archived or [])


def prune(
    versions: Iterable[ModelVersion], limit: int, pinned: set[int]
) -> tuple[list[ModelVersion], list[int]]:
    """Keep the ``limit`` newest versions plus every pinned one, in their original order.

    Returns:
        ``(kept versions, pruned version numbers ascending)``.
    """
    all_versions = list(versions)
    newest = {v.version for v in sorted(all_versions, key=lambda v: v.version, reverse=True)[: max(0, limit)]}
    kept = [v for v in all_versions if v.version in newest or v.version in pinned]
    dropped = sorted(v.version for v in all_versions if v.version not in newest and v.version not in pinned)
    return kept, dropped


def merge_restored(status: ModelStatus, restored: Iterable[ModelVersion]) -> tuple[ModelStatus, list[int]]:
    """Put restored versions (from registration records) back under their original numbers.

    Versions already in status are kept as they are (they are immutable); ``latestVersion``
    becomes at least the highest restored number, so new registrations never reuse one.

    Returns:
        ``(new status, numbers added ascending)``.
    """
    have = {v.version: v for v in versions_of(status)}
    added: list[int] = []
    for v in restored:
        if v.version not in have:
            have[v.version] = v.model_copy(deep=True)
            added.append(v.version)
    new = status.model_copy(deep=True)
    new.versions = [have[n] for n in sorted(have)] or None
    new.latest_version = max([status.latest_version, *have.keys()])
    return new, sorted(added)
