"""Retraining: when a Model's ``spec.retraining`` starts a TrainingJob (a pure decision).

:func:`decide` is a function of (``spec.retraining``, ``status.retraining``, the Model's
retraining TrainingJobs as observed, the trigger observations, now): the controller writes back
``Decision.status`` *before* it creates ``Decision.create`` (an intent record: the run's name
and number are in status first, so a crash between the two is finished by the next reconcile,
and a status write that conflicts creates nothing). Semantics (also in docs/monitoring.md):

Triggers, each *pending* until a run starts after it:

- ``Manual``: the annotation ``kiln.dev/retrain-requested-at`` has a value other than the last
  one acted on (``status.retraining.observedRequest``);
- ``NewData``: the FeatureGroup's ``status.lastMaterializationTime`` is later than the one last
  acted on (``observedMaterializationTime``);
- ``Schedule``: a cron time has passed since the last one acted on (``lastScheduleTime``);
- ``Drift``: the query's largest sample has been above ``threshold`` for ``forSeconds``
  (``drift.aboveSince``; no data, NaN or a failed query resets it, as a Prometheus alert).

When retraining is first seen (or a trigger is first configured) the current annotation value,
materialization time and clock are the baseline: history does not start a run.

Gate, in this order:

1. never more than one run at a time: a run in progress (status or any live retraining
   TrainingJob not Succeeded/Failed) holds every trigger;
2. ``spec.retraining.suspend`` holds every trigger;
3. a ``Manual`` request is a person's decision: it waits only for (1) and (2);
4. after ``maxConsecutiveFailures`` failed runs in a row retraining is *suspended* (condition
   ``RetrainingSuspended=True``) until a manual request, a template change (which resets the
   count) or a success;
5. after a failed run: back-off ``initialSeconds * 2^(failures-1)`` (capped at ``maxSeconds``)
   from its end; after a successful one: ``cooldownSeconds`` from its end.

A run whose TrainingJob disappears before it ends counts as failed, unless the Model
registered a version from it (a TTL deleted it after success); the API server refusing the
TrainingJob counts as failed too (reason ``TemplateRejected``), so no failure loops.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from croniter import croniter

from kiln.api.model import (
    RETRAIN_REQUEST_ANNOTATION,
    DriftObservation,
    DriftTrigger,
    Retraining,
    RetrainingResult,
    RetrainingRun,
    RetrainingStatus,
    RetrainingTriggerKind,
)
from kiln.api.trainingjob import max_name_length
from kiln.conditions import parse_time, rfc3339
from kiln.resources.common import child_name

ACTIVE, SUCCEEDED, FAILED = "Active", "Succeeded", "Failed"
#: A run recorded in status whose TrainingJob is not (yet) listed is created again (idempotent,
#: same name) for this long; after it, the run counts as failed (its job was deleted).
CREATE_GRACE_SECONDS = 60.0
#: Reasons of a failed run (``RetrainingRun.reason``).
JOB_FAILED, TEMPLATE_REJECTED, JOB_MISSING = "TrainingJobFailed", "TemplateRejected", "TrainingJobMissing"
#: Longest requeue while anything is scheduled (a cron time, the end of a cooldown).
MAX_REQUEUE_SECONDS = 3600.0
#: How often a FeatureGroup's lastMaterializationTime is looked at (no watch on FeatureGroups).
NEW_DATA_POLL_SECONDS = 30.0


@dataclass(frozen=True)
class Run:
    """A retraining TrainingJob as listed: ``phase`` Active, Succeeded or Failed."""

    name: str
    number: int
    created: datetime
    phase: str = ACTIVE
    finished: datetime | None = None
    triggers: tuple[str, ...] = ()
    failure: str = ""


@dataclass(frozen=True)
class DriftReading:
    """One evaluation of the drift query: its largest sample (None: no data) or an error."""

    value: float | None
    error: str | None = None


@dataclass(frozen=True)
class Observations:
    """What the controller saw for this decision.

    Attributes:
        request: the ``kiln.dev/retrain-requested-at`` annotation (None when absent).
        materialization_time: the FeatureGroup's ``status.lastMaterializationTime``.
        drift: the drift query's reading, or None when it was not evaluated this time
            (:func:`drift_due` said no, or no drift trigger).
        registered_jobs: TrainingJob names the Model's versions record in their lineage.
        template_hash: :func:`template_hash` of the current template.
    """

    request: str | None = None
    materialization_time: datetime | None = None
    drift: DriftReading | None = None
    registered_jobs: frozenset[str] = frozenset()
    template_hash: str = ""


@dataclass(frozen=True)
class Decision:
    """What to do: write ``status``, then create ``create`` (if any), post ``events``.

    ``state`` is one of ``Idle``, ``Running``, ``Waiting``, ``Suspended``, ``Paused`` and
    ``message`` explains it (for the ``RetrainingSuspended`` condition).
    """

    status: RetrainingStatus
    create: RetrainingRun | None = None
    new_run: bool = False
    events: tuple[tuple[str, str, str], ...] = ()
    state: str = "Idle"
    message: str = ""
    requeue_after: float | None = None
    details: dict[str, str] = field(default_factory=dict)

    @property
    def suspended(self) -> bool:
        return self.state == "Suspended"


def template_hash(spec: Retraining) -> str:
    """A short digest of the template: a change of it resets the failure count."""
    doc = json.dumps(spec.template.to_api(), sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def run_name(model: str, number: int, num_nodes: int) -> str:
    """``<model>-retrain-<n>``: a TrainingJob name (a letter first, no dots, short enough for
    ``<name>-node-<rank>`` hostnames; cut with a hash suffix when longer)."""
    base = model.replace(".", "-")
    if not base[:1].isalpha():
        base = f"m-{base}"
    return child_name(base, "retrain", str(number), max_len=max_name_length(num_nodes))


def drift_due(spec: Retraining, status: RetrainingStatus | None, now: datetime) -> bool:
    """Whether the drift query should run now (every ``intervalSeconds``)."""
    d = spec.triggers.drift
    if d is None:
        return False
    last = parse_time(status.drift.last_evaluation_time) if status and status.drift else None
    return last is None or (now - last).total_seconds() >= d.interval_seconds - 0.5


def backoff_seconds(spec: Retraining, failures: int) -> float:
    """Wait after ``failures`` failed runs in a row: ``initial * 2^(failures-1)``, capped."""
    b = spec.backoff
    return float(min(b.max_seconds, b.initial_seconds * 2 ** max(0, failures - 1)))


def next_run_time(spec: Retraining, st: RetrainingStatus) -> datetime | None:
    """End of the cooldown (after a success) or back-off (after a failure, while the failures
    count: a new template resets them); None: no wait."""
    last = st.last_run
    end = parse_time(last.completion_time) if last else None
    if last is None or end is None:
        return None
    if last.result == RetrainingResult.SUCCEEDED:
        return end + timedelta(seconds=spec.cooldown_seconds)
    if st.consecutive_failures > 0:
        return end + timedelta(seconds=backoff_seconds(spec, st.consecutive_failures))
    return None


def _adopt(st: RetrainingStatus, runs: Sequence[Run]) -> RetrainingStatus:
    """Take in a live run newer than status knows (status lost or restored from a backup)."""
    newest = max(runs, key=lambda r: r.number, default=None)
    known = st.last_run.number if st.last_run else 0
    if newest is None or newest.number <= known:
        return st
    triggers = [
        RetrainingTriggerKind(t) for t in newest.triggers if t in RetrainingTriggerKind._value2member_map_
    ]
    run = RetrainingRun(
        name=newest.name,
        number=newest.number,
        triggers=triggers or [RetrainingTriggerKind.MANUAL],
        message="adopted: found its TrainingJob",
        start_time=rfc3339(newest.created),
    )
    return st.model_copy(update={"last_run": run, "runs": max(st.runs, newest.number)})


def _observe_last_run(
    st: RetrainingStatus, runs: Sequence[Run], obs: Observations, now: datetime
) -> tuple[RetrainingStatus, RetrainingRun | None, list[tuple[str, str, str]]]:
    """Record the end of the run in progress; returns (status, run to (re)create, events)."""
    last = st.last_run
    if last is None or last.result is not None:
        return st, None, []
    live = next((r for r in runs if r.name == last.name), None)
    if live is None and last.name in obs.registered_jobs:
        live = Run(last.name, last.number, now, SUCCEEDED, now)
    if live is None:
        started = parse_time(last.start_time) or now
        if (now - started).total_seconds() < CREATE_GRACE_SECONDS:
            return st, last, []  # recorded, not created yet (or not listed yet): create it (idempotent)
        live = Run(last.name, last.number, started, FAILED, now)
        reason, message = JOB_MISSING, f"TrainingJob {last.name} disappeared before it finished"
    else:
        reason, message = (
            JOB_FAILED,
            f"TrainingJob {last.name} failed" + (f": {live.failure}" if live.failure else ""),
        )
    if live.phase == ACTIVE:
        return st, None, []
    end = rfc3339(live.finished or now)
    if live.phase == SUCCEEDED:
        done = last.model_copy(update={"result": RetrainingResult.SUCCEEDED, "completion_time": end})
        event = ("Normal", "RetrainingSucceeded", f"retraining run {last.number} ({last.name}) succeeded")
        return st.model_copy(update={"last_run": done, "consecutive_failures": 0}), None, [event]
    done = last.model_copy(
        update={
            "result": RetrainingResult.FAILED,
            "completion_time": end,
            "reason": reason,
            "message": message[:1024],
        }
    )
    failures = st.consecutive_failures + 1
    event = ("Warning", "RetrainingFailed", f"retraining run {last.number}: {message} ({failures} in a row)")
    return st.model_copy(update={"last_run": done, "consecutive_failures": failures}), None, [event]


def rejected(st: RetrainingStatus, message: str, now: datetime) -> RetrainingStatus:
    """``st`` with its run in progress failed because the API server refused its TrainingJob."""
    assert st.last_run is not None
    done = st.last_run.model_copy(
        update={
            "result": RetrainingResult.FAILED,
            "completion_time": rfc3339(now),
            "reason": TEMPLATE_REJECTED,
            "message": f"TrainingJob refused by the API server: {message}"[:1024],
        }
    )
    return st.model_copy(update={"last_run": done, "consecutive_failures": st.consecutive_failures + 1})


def _drift(
    d: DriftTrigger, st: RetrainingStatus, reading: DriftReading | None, now: datetime
) -> DriftObservation:
    """The drift observation after ``reading`` (unchanged when the query did not run)."""
    obs = st.drift or DriftObservation()
    if reading is None:
        return obs
    value = reading.value if reading.value is not None and math.isfinite(reading.value) else None
    above = reading.error is None and value is not None and value > d.threshold
    since = (obs.above_since or rfc3339(now)) if above else None
    return DriftObservation(
        value=value, above_since=since, last_evaluation_time=rfc3339(now), error=reading.error
    )


def _triggers(
    spec: Retraining, st: RetrainingStatus, obs: Observations, now: datetime, first: bool
) -> tuple[RetrainingStatus, dict[RetrainingTriggerKind, str]]:
    """Baselines and trigger state; returns (status, pending trigger -> detail)."""
    t = spec.triggers
    pending: dict[RetrainingTriggerKind, str] = {}
    upd: dict[str, object] = {}
    request = obs.request or ""
    if first:
        upd["observed_request"] = request
    elif request and request != (st.observed_request or ""):
        pending[RetrainingTriggerKind.MANUAL] = f"requested ({request})"
    if t.new_data is None:
        upd |= {"observed_feature_group": None, "observed_materialization_time": None}
    elif st.observed_feature_group != t.new_data.feature_group_ref.name:
        mt = obs.materialization_time
        upd |= {
            "observed_feature_group": t.new_data.feature_group_ref.name,
            "observed_materialization_time": rfc3339(mt) if mt else None,
        }
    elif obs.materialization_time is not None:
        seen = parse_time(st.observed_materialization_time)
        if seen is None or obs.materialization_time > seen:
            pending[RetrainingTriggerKind.NEW_DATA] = (
                f"FeatureGroup {t.new_data.feature_group_ref.name} materialized at {rfc3339(obs.materialization_time)}"
            )
    if t.schedule is None:
        upd["last_schedule_time"] = None
    elif st.last_schedule_time is None:
        upd["last_schedule_time"] = rfc3339(now)
    else:
        tick = croniter(t.schedule.cron, parse_time(st.last_schedule_time)).get_next(datetime)
        if tick <= now:
            pending[RetrainingTriggerKind.SCHEDULE] = f"schedule {t.schedule.cron!r} at {rfc3339(tick)}"
    if t.drift is None:
        upd["drift"] = None
    else:
        d = _drift(t.drift, st, obs.drift, now)
        upd["drift"] = d
        since = parse_time(d.above_since)
        if since is not None and (now - since).total_seconds() >= t.drift.for_seconds:
            pending[RetrainingTriggerKind.DRIFT] = (
                f"drift {d.value:g} > {t.drift.threshold:g} since {d.above_since}"
                if d.value is not None
                else f"drift above {t.drift.threshold:g} since {d.above_since}"
            )
    return st.model_copy(update=upd), pending


def _consume(
    st: RetrainingStatus, pending: dict[RetrainingTriggerKind, str], obs: Observations, now: datetime
) -> RetrainingStatus:
    """Mark the pending triggers acted on (the drift level is not an event: it stays observed)."""
    upd: dict[str, object] = {}
    if RetrainingTriggerKind.MANUAL in pending:
        upd["observed_request"] = obs.request or ""
    if RetrainingTriggerKind.NEW_DATA in pending and obs.materialization_time is not None:
        upd["observed_materialization_time"] = rfc3339(obs.materialization_time)
    if RetrainingTriggerKind.SCHEDULE in pending:
        upd["last_schedule_time"] = rfc3339(now)
    return st.model_copy(update=upd)


def _requeue(spec: Retraining, st: RetrainingStatus, now: datetime, *times: datetime | None) -> float | None:
    """Seconds until the next thing to look at: a drift evaluation, a cron time, a gate opening."""
    out: list[float] = [(t - now).total_seconds() for t in times if t is not None]
    if spec.triggers.drift is not None:
        out.append(float(spec.triggers.drift.interval_seconds))
    if spec.triggers.new_data is not None:
        out.append(NEW_DATA_POLL_SECONDS)
    if spec.triggers.schedule is not None and st.last_schedule_time:
        tick = croniter(spec.triggers.schedule.cron, parse_time(st.last_schedule_time)).get_next(datetime)
        out.append((tick - now).total_seconds())
    return min(MAX_REQUEUE_SECONDS, max(1.0, min(out))) if out else None


def decide(
    model: str,
    spec: Retraining,
    status: RetrainingStatus | None,
    runs: Sequence[Run],
    obs: Observations,
    now: datetime,
) -> Decision:
    """The retraining decision for Model ``model`` (see the module docstring).

    Args:
        runs: the Model's retraining TrainingJobs (owned by it, labelled), as listed now.
        now: the clock (UTC); the only source of time.
    """
    st = _adopt(status or RetrainingStatus(), runs)
    st, ensure, events = _observe_last_run(st, runs, obs, now)
    if st.consecutive_failures and st.last_run and st.last_run.template_hash not in (None, obs.template_hash):
        st = st.model_copy(update={"consecutive_failures": 0})  # a new template: a fresh start
    st, pending = _triggers(spec, st, obs, now, first=status is None)
    st = st.model_copy(update={"pending": sorted(pending) or None})
    gate = next_run_time(spec, st)
    st = st.model_copy(update={"next_run_time": rfc3339(gate) if gate else None})
    details = {str(k): v for k, v in pending.items()}

    def out(state: str, message: str, *, create: RetrainingRun | None = None, new: bool = False) -> Decision:
        requeue = _requeue(spec, st, now, gate if pending else None)
        if create is not None and not new:
            requeue = CREATE_GRACE_SECONDS
        return Decision(st, create, new, tuple(events), state, message, requeue, details)

    active = [r.name for r in runs if r.phase == ACTIVE]
    if st.last_run is not None and st.last_run.result is None:
        active = sorted({*active, st.last_run.name})
    waiting = "; pending: " + ", ".join(f"{k}: {v}" for k, v in details.items()) if pending else ""
    if active:
        return out("Running", f"run {', '.join(active)} in progress{waiting}", create=ensure)
    if spec.suspend:
        return out("Paused", f"spec.retraining.suspend is set{waiting}")
    manual = RetrainingTriggerKind.MANUAL in pending
    if not manual and st.consecutive_failures >= spec.max_consecutive_failures:
        last = st.last_run.message if st.last_run else ""
        return out(
            "Suspended",
            f"{st.consecutive_failures} retraining runs failed in a row (last: {last}); annotate "
            f"{RETRAIN_REQUEST_ANNOTATION} or change the template to try again{waiting}",
        )
    if not pending:
        return out("Idle", "no trigger pending")
    if not manual and gate is not None and gate > now:
        why = "cooldown" if st.consecutive_failures == 0 else "back-off"
        return out("Waiting", f"{why} until {rfc3339(gate)}{waiting}")
    return _start(model, spec, st, pending, obs, now, events)


def _start(
    model: str,
    spec: Retraining,
    st: RetrainingStatus,
    pending: dict[RetrainingTriggerKind, str],
    obs: Observations,
    now: datetime,
    events: list[tuple[str, str, str]],
) -> Decision:
    """A new run for the ``pending`` triggers: number ``runs + 1``, recorded as in progress."""
    number = st.runs + 1
    message = "; ".join(f"{k}: {v}" for k, v in pending.items())
    run = RetrainingRun(
        name=run_name(model, number, spec.template.spec.num_nodes),
        number=number,
        triggers=sorted(pending),
        message=message[:1024],
        start_time=rfc3339(now),
        template_hash=obs.template_hash,
    )
    st = _consume(st, pending, obs, now).model_copy(
        update={"runs": number, "last_run": run, "pending": None, "next_run_time": None}
    )
    events = [*events, ("Normal", "RetrainingStarted", f"retraining run {number} ({run.name}): {message}")]
    return Decision(
        st,
        run,
        True,
        tuple(events),
        "Running",
        f"run {run.name} started ({message})",
        CREATE_GRACE_SECONDS,
        {str(k): v for k, v in pending.items()},
    )
