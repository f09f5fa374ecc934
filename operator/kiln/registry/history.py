"""The audit trail: ``status.history``, newest last, bounded to the newest 100 entries."""

from __future__ import annotations

from collections.abc import Iterable

from kiln.api.model import HISTORY_LIMIT, HistoryCause, HistoryEntry


def entry(
    time: str,
    cause: HistoryCause | str,
    *,
    stage: str | None = None,
    alias: str | None = None,
    inference_service: str | None = None,
    training_job: str | None = None,
    from_version: int | None = None,
    to_version: int | None = None,
    message: str | None = None,
) -> HistoryEntry:
    """One audit entry: a ``stage`` or an ``alias`` changed from one version to another,
    ``inference_service`` rolled a canary of ``from_version`` back to ``to_version``, or a
    retraining run created ``training_job`` (``message``: its triggers).

    Raises:
        ValueError: not exactly one of ``stage``, ``alias``, ``inference_service``,
            ``training_job`` given.
    """
    if sum(x is not None for x in (stage, alias, inference_service, training_job)) != 1:
        raise ValueError("a history entry names exactly one stage, alias, InferenceService or TrainingJob")
    return HistoryEntry(
        time=time,
        cause=HistoryCause(cause),
        stage=stage,
        alias=alias,
        inference_service=inference_service,
        training_job=training_job,
        from_version=from_version,
        to_version=to_version,
        message=message[:1024] if message else None,
    )


def append(
    history: Iterable[HistoryEntry] | None, new: Iterable[HistoryEntry], limit: int = HISTORY_LIMIT
) -> list[HistoryEntry] | None:
    """``history`` followed by ``new``, keeping the newest ``limit`` entries (None when empty)."""
    out = [*(history or []), *new]
    return out[-limit:] if out else None


def describe(e: HistoryEntry) -> str:
    """One line for events and the CLI, e.g. ``Production: 2 -> 3 (SpecChange)``."""
    if e.training_job is not None:
        line = f"retraining TrainingJob {e.training_job} ({e.cause})"
        return f"{line}: {e.message}" if e.message else line
    if e.inference_service is not None:
        what = f"InferenceService {e.inference_service} canary"
    else:
        what = e.stage if e.stage is not None else f"alias {e.alias}"

    def fmt(v: int | None) -> str:
        return "-" if v is None else str(v)

    line = f"{what}: {fmt(e.from_version)} -> {fmt(e.to_version)} ({e.cause})"
    return f"{line}: {e.message}" if e.message else line
