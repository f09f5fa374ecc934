"""The canary rollout state machine: a pure function of (spec, status, observed, measurement, now).

Everything a rollout needs to resume lives in the InferenceService's status (``stableVersion``,
``canaryVersion``, ``currentStep``, ``stepStartTime``, ``analysis``, ``rolledBackVersion``), so an
operator restart continues at the same step: :func:`decide` reads it, the controller writes back
``Decision.status``.

States (``status.rolloutPhase``) and transitions, with ``R`` the version the Model resolves to
and ``S`` the stable version:

- no stable yet: ``S := R``, ``Healthy`` (the first version is deployed without a canary);
- ``R == S``: ``Healthy`` (or ``Promoted`` after a promotion); a running canary is cancelled;
- ``R == rolledBackVersion``: ``RolledBack``, nothing runs until the resolved version changes;
- otherwise a canary of ``R`` runs ``spec.rollout.steps``: ``Progressing``, or ``Paused`` while
  ``spec.rollout.paused`` is set or more than ``inconclusiveLimit`` measurements in a row were
  inconclusive. For step ``i`` with weight ``w``: the canary is scaled for ``w``; once its pods
  are Ready the weight is *granted* (``stepStartTime`` set, stable reduced / route weight set);
  the step ends when ``pauseSeconds`` have passed since the grant and, with analysis, the last
  measurement, taken after the grant, was Successful. After the last step the stable Deployment
  is rolled to ``R`` (``currentStep == len(steps)``: promoting) and, once it runs ``R``
  everywhere, ``S := R``: ``Promoted``.
- rollback, at once, on ``spec.rollout.abort``, a canary stuck past its progress deadline, or more
  than ``failureLimit`` failed measurements: canary removed, stable restored, ``RolledBack``,
  ``rolledBackVersion := R``, a Warning Event and a Model history action.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from kiln.api.inferenceservice import (
    Analysis,
    AnalysisStatus,
    InferenceServiceSpec,
    InferenceServiceStatus,
    MetricResult,
    RolloutHistoryEntry,
    RolloutPhase,
    RolloutStep,
    TrafficRouting,
)
from kiln.conditions import FALSE, TRUE, UNKNOWN, parse_time, rfc3339
from kiln.rollout.analysis import FAILED, SUCCESSFUL, describe, summarize
from kiln.rollout.replicas import canary_replicas, replica_split

#: Rollout history entries kept in status (oldest dropped first).
HISTORY_LIMIT = 20
#: Requeue while waiting on pods (child watch events normally come first), in seconds.
WAIT_POLL_SECONDS = 15.0

NORMAL, WARNING = "Normal", "Warning"


@dataclass(frozen=True)
class Observed:
    """What the controller saw in the cluster for this reconcile.

    Attributes:
        resolved_version: the Model version ``spec.modelRef`` resolves to now.
        total_replicas: full stable capacity: ``spec.replicas``, or with an HPA the stable
            Deployment's current replica count (at least ``minReplicas``).
        canary_ready_replicas: Ready canary pods running ``status.canaryVersion`` (0 when the
            canary Deployment is absent, runs another version, or is mid-update).
        canary_failure: a message when the canary Deployment reports
            ``Progressing=False/ProgressDeadlineExceeded`` (pods never became Ready), else None.
        stable_rolled_out_version: the version every stable pod runs and is Ready with (the
            Deployment is fully rolled out), or None while it is rolling or absent.
    """

    resolved_version: int
    total_replicas: int
    canary_ready_replicas: int = 0
    canary_failure: str | None = None
    stable_rolled_out_version: int | None = None


@dataclass(frozen=True)
class Measurement:
    """One analysis measurement: every metric's result, taken for canary ``version``."""

    version: int
    results: tuple[MetricResult, ...]


@dataclass(frozen=True)
class Plan:
    """Desired children: which version each Deployment runs, replicas, routing weight.

    ``stable_replicas`` None: an HPA owns it. ``canary_version`` None: no canary Deployment.
    ``canary_weight``: HTTPRoute weight of the canary (GatewayAPI) or its real share of pods
    (ReplicaRatio), 0..100.
    """

    stable_version: int
    stable_replicas: int | None
    canary_version: int | None = None
    canary_replicas: int = 0
    canary_weight: int = 0


@dataclass(frozen=True)
class Action:
    """A side effect for the controller: post an Event, or record a rollback in the Model.

    ``kind`` is ``"Event"`` (``type``, ``reason``, ``message``) or ``"ModelRollback"`` (``version``
    was rolled back to ``stable_version``; ``reason``/``message`` say why).
    """

    kind: str
    reason: str
    message: str
    type: str = NORMAL
    version: int | None = None
    stable_version: int | None = None


@dataclass(frozen=True)
class ConditionValue:
    status: str
    reason: str
    message: str


@dataclass
class Decision:
    """Output of :func:`decide`: the new status, the children plan, side effects, next run."""

    status: InferenceServiceStatus
    plan: Plan
    actions: list[Action] = field(default_factory=list)
    requeue_after: float | None = None
    canary_ready: ConditionValue = field(
        default_factory=lambda: ConditionValue(FALSE, "NoCanary", "no canary")
    )
    rollout_healthy: ConditionValue = field(default_factory=lambda: ConditionValue(TRUE, "Healthy", ""))


def _granted_weight(steps: list[RolloutStep], step: int, started: bool) -> int:
    """Weight traffic is shifted to at step index ``step`` (``len(steps)``: promoting)."""
    if step >= len(steps):
        return steps[-1].weight if steps else 0
    if started:
        return steps[step].weight
    return steps[step - 1].weight if step > 0 else 0


def _seconds_since(now: datetime, ts: str | None) -> float | None:
    t = parse_time(ts)
    return None if t is None else (now - t).total_seconds()


def analysis_due(spec: InferenceServiceSpec, status: InferenceServiceStatus, now: datetime) -> bool:
    """Whether the controller should take a measurement before calling :func:`decide`.

    Due when analysis is configured, a canary is in its steps (not promoting) with a granted
    weight above 0 (a canary with no traffic has nothing to measure), and ``intervalSeconds``
    have passed since the last measurement (or there was none in this rollout).
    """
    analysis = spec.rollout.analysis
    if analysis is None or status.canary_version is None or status.current_step is None:
        return False
    if status.rollout_phase not in (RolloutPhase.PROGRESSING, RolloutPhase.PAUSED):
        return False
    steps = spec.rollout.steps
    if status.current_step >= len(steps):
        return False
    if _granted_weight(steps, status.current_step, status.step_start_time is not None) <= 0:
        return False
    since = _seconds_since(now, status.analysis.last_run_time if status.analysis else None)
    return since is None or since >= analysis.interval_seconds


def _history(st: InferenceServiceStatus, entry: RolloutHistoryEntry) -> None:
    st.history = [*(st.history or []), entry][-HISTORY_LIMIT:]


def _clear_canary(st: InferenceServiceStatus) -> None:
    st.canary_version = None
    st.canary_weight = 0
    st.current_step = None
    st.step_start_time = None


# --------------------------------------------------------------------------------------------
# decide: one function per state. Each reads the reconcile's inputs (:class:`_Rollout`) and
# works on ``st``, the deep copy of the status that :func:`decide` owns; none reads the clock or
# the cluster, so the whole machine stays a pure function of its arguments.


@dataclass(frozen=True)
class _Rollout:
    """The inputs of one reconcile, as the state functions read them.

    ``stable`` is the stable version (the resolved one when there is none yet); ``previous_phase``
    is ``status.rolloutPhase`` before this reconcile (Paused/Resumed Events fire on a change).
    """

    spec: InferenceServiceSpec
    observed: Observed
    now: datetime
    stable: int
    previous_phase: RolloutPhase | None

    @property
    def ts(self) -> str:
        return rfc3339(self.now)

    @property
    def version(self) -> int:
        """The version the Model resolves to now (the canary's, while one runs)."""
        return self.observed.resolved_version

    @property
    def total(self) -> int:
        return max(0, self.observed.total_replicas)

    @property
    def steps(self) -> list[RolloutStep]:
        return list(self.spec.rollout.steps)

    @property
    def analysis(self) -> Analysis | None:
        return self.spec.rollout.analysis

    def steady(self, version: int) -> Plan:
        """``version`` on the stable Deployment at full size (or the HPA's), no canary."""
        autoscaled = self.spec.autoscaling is not None
        return Plan(stable_version=version, stable_replicas=None if autoscaled else self.total)

    def inconclusive_paused(self, a: AnalysisStatus) -> bool:
        """More than ``inconclusiveLimit`` inconclusive measurements in a row."""
        return self.analysis is not None and a.inconclusive > self.analysis.inconclusive_limit

    def held(self, a: AnalysisStatus) -> bool:
        """Paused by the spec or by inconclusive analysis: no step is granted or passed."""
        return self.spec.rollout.paused or self.inconclusive_paused(a)


def decide(
    spec: InferenceServiceSpec,
    status: InferenceServiceStatus,
    observed: Observed,
    measurement: Measurement | None,
    now: datetime,
) -> Decision:
    """Advance the rollout by one reconcile.

    Dispatches on the state (module docstring): :func:`_first_version`, :func:`_at_stable`,
    :func:`_rolled_back`, else :func:`_canary` (start, rollback triggers, analysis, steps,
    promotion).

    Args:
        spec: the InferenceService's spec (steps, analysis, paused, abort, routing, autoscaling).
        status: its current status (not modified; a deep copy is returned in the decision).
        observed: versions and pod readiness seen in the cluster.
        measurement: the analysis measurement taken for this reconcile (see
            :func:`analysis_due`), or None. A measurement of another version than the running
            canary is ignored.
        now: the current time (timezone-aware).
    Returns:
        The new status (rollout fields only; conditions are the controller's), the desired
        children, actions (Events, Model rollback record), the requeue delay and the values of
        the ``CanaryReady`` and ``RolloutHealthy`` conditions.
    """
    st = status.model_copy(deep=True)
    r = observed.resolved_version
    stable = r if st.stable_version is None else st.stable_version
    ro = _Rollout(spec, observed, now, stable, status.rollout_phase)
    if st.stable_version is None:
        return _first_version(ro, st)
    if r == st.stable_version:
        return _at_stable(ro, st)
    if st.rolled_back_version == r and st.canary_version is None:
        return _rolled_back(ro, st)
    return _canary(ro, st, measurement)


def _healthy_condition(st: InferenceServiceStatus) -> ConditionValue:
    """``RolloutHealthy`` outside a canary: False after a rollback, else True with the phase."""
    phase = st.rollout_phase or RolloutPhase.HEALTHY
    if phase == RolloutPhase.ROLLED_BACK:
        last = (st.history or [])[-1].message if st.history else ""
        return ConditionValue(
            FALSE, "RolledBack", last or f"version {st.rolled_back_version} was rolled back"
        )
    msg = f"serving version {st.stable_version}"
    return ConditionValue(TRUE, str(phase), msg)


def _first_version(ro: _Rollout, st: InferenceServiceStatus) -> Decision:
    """No stable version yet: the resolved version becomes stable at once, no canary (Healthy)."""
    r = ro.version
    st.stable_version = r
    _clear_canary(st)
    st.rollout_phase = RolloutPhase.HEALTHY
    _history(
        st,
        RolloutHistoryEntry(
            time=ro.ts, to_version=r, phase=RolloutPhase.HEALTHY, message=f"first version {r} deployed"
        ),
    )
    actions = [Action("Event", "Deployed", f"serving model version {r}")]
    return Decision(st, ro.steady(r), actions, None, rollout_healthy=_healthy_condition(st))


def _at_stable(ro: _Rollout, st: InferenceServiceStatus) -> Decision:
    """The Model resolves to the stable version: a running canary is cancelled; Healthy/Promoted.

    A rollback marker is forgotten (the version to refuse is no longer asked for); Promoted stays
    Promoted, every other phase becomes Healthy.
    """
    s = ro.stable
    actions: list[Action] = []
    if st.canary_version is not None:
        c = st.canary_version
        msg = f"rollout of version {c} cancelled: the model resolves to the stable version {s} again"
        _history(
            st,
            RolloutHistoryEntry(
                time=ro.ts, from_version=s, to_version=c, phase=RolloutPhase.HEALTHY, message=msg
            ),
        )
        actions.append(Action("Event", "RolloutCancelled", msg))
        st.rollout_phase = RolloutPhase.HEALTHY
    _clear_canary(st)
    st.rolled_back_version = None
    if st.rollout_phase not in (RolloutPhase.HEALTHY, RolloutPhase.PROMOTED):
        st.rollout_phase = RolloutPhase.HEALTHY
    return Decision(st, ro.steady(s), actions, None, rollout_healthy=_healthy_condition(st))


def _rolled_back(ro: _Rollout, st: InferenceServiceStatus) -> Decision:
    """RolledBack: the version that was rolled back is not retried until the resolved one changes."""
    st.rollout_phase = RolloutPhase.ROLLED_BACK
    _clear_canary(st)
    return Decision(st, ro.steady(ro.stable), [], None, rollout_healthy=_healthy_condition(st))


def _canary(ro: _Rollout, st: InferenceServiceStatus, measurement: Measurement | None) -> Decision:
    """A canary of the resolved version: start it, roll it back, walk its steps, promote it.

    Order matters: a new canary starts at step 0 and discards what was observed or measured for
    the previous one; abort and a stuck canary roll back before the measurement is counted; a
    failed analysis rolls back before any step moves.
    """
    actions: list[Action] = []
    if st.canary_version != ro.version:
        actions.append(_start_canary(ro, st))
        measurement = None
        # What was observed belongs to the previous canary (if any), not to this one.
        ro = replace(ro, observed=replace(ro.observed, canary_ready_replicas=0, canary_failure=None))
    st.current_step = st.current_step or 0
    trigger = _rollback_trigger(ro)
    if trigger is not None:
        return _roll_back(ro, st, actions, *trigger)
    a = st.analysis or AnalysisStatus()
    if ro.analysis is not None:
        st.analysis = a
    trigger = _analyse(ro, st.current_step, a, measurement)
    if trigger is not None:
        return _roll_back(ro, st, actions, *trigger)
    actions += _walk_steps(ro, st, a)
    if (st.current_step or 0) >= len(ro.steps) and ro.observed.stable_rolled_out_version == ro.version:
        return _promoted(ro, st, actions)
    return _in_flight(ro, st, a, actions)


def _start_canary(ro: _Rollout, st: InferenceServiceStatus) -> Action:
    """Starting: the resolved version becomes the canary at step 0, nothing granted, fresh analysis.

    A running canary of another version is superseded (its history entry says so).
    """
    s, r = ro.stable, ro.version
    note = f" (canary version {st.canary_version} superseded)" if st.canary_version is not None else ""
    st.canary_version = r
    st.current_step = 0
    st.step_start_time = None
    st.canary_weight = 0
    st.analysis = AnalysisStatus() if ro.spec.rollout.analysis else None
    st.rolled_back_version = None
    st.rollout_phase = RolloutPhase.PROGRESSING
    msg = f"canary rollout {s} -> {r} started{note}"
    _history(
        st,
        RolloutHistoryEntry(
            time=ro.ts, from_version=s, to_version=r, phase=RolloutPhase.PROGRESSING, message=msg
        ),
    )
    return Action("Event", "RolloutStarted", msg)


def _rollback_trigger(ro: _Rollout) -> tuple[str, str] | None:
    """Aborting: ``spec.rollout.abort``, or a canary stuck past its progress deadline.

    Returns the rollback's ``(reason, message)``, or None.
    """
    if ro.spec.rollout.abort:
        return "Aborted", "spec.rollout.abort is set"
    if ro.observed.canary_failure:
        return "ProgressDeadlineExceeded", ro.observed.canary_failure
    return None


def _analyse(ro: _Rollout, step: int, a: AnalysisStatus, m: Measurement | None) -> tuple[str, str] | None:
    """Analysing: count a measurement of the running canary into ``a`` (the status's analysis).

    Only a measurement of the canary's version taken during its steps (not while promoting)
    counts. Successful and Failed reset the inconclusive run; Inconclusive (and Error) extend it.
    Returns the rollback's ``(reason, message)`` once failures exceed ``failureLimit``, else None.
    """
    analysis = ro.analysis
    if analysis is None or m is None or m.version != ro.version or step >= len(ro.steps):
        return None
    results = list(m.results)
    phase = summarize(results)
    a.last_run_time = ro.ts
    a.results = results
    a.phase = phase  # type: ignore[assignment]
    if phase == SUCCESSFUL:
        a.successes += 1
        a.inconclusive = 0
    elif phase == FAILED:
        a.failures += 1
        a.inconclusive = 0
    else:
        a.inconclusive += 1
    if phase == FAILED and a.failures > analysis.failure_limit:
        return (
            "AnalysisFailed",
            f"{a.failures} failed measurement(s) > failureLimit {analysis.failure_limit}: {describe(results)}",
        )
    return None


def _roll_back(
    ro: _Rollout, st: InferenceServiceStatus, actions: list[Action], reason: str, message: str
) -> Decision:
    """RolledBack, at once: canary removed, stable restored, ``rolledBackVersion`` := the canary.

    Adds a Warning Event and the Model's rollback record to ``actions``.
    """
    s, c = ro.stable, st.canary_version
    _history(
        st,
        RolloutHistoryEntry(
            time=ro.ts,
            from_version=s,
            to_version=c,
            phase=RolloutPhase.ROLLED_BACK,
            message=f"{reason}: {message}"[:1024],
        ),
    )
    _clear_canary(st)
    st.rolled_back_version = c
    st.rollout_phase = RolloutPhase.ROLLED_BACK
    text = f"canary version {c} rolled back to stable version {s} ({reason}): {message}"
    actions.append(Action("Event", "RolledBack", text, type=WARNING))
    actions.append(Action("ModelRollback", reason, message, version=c, stable_version=s))
    return Decision(
        st,
        ro.steady(s),
        actions,
        None,
        canary_ready=ConditionValue(FALSE, "NoCanary", "canary removed by rollback"),
        rollout_healthy=ConditionValue(FALSE, "RolledBack", text[:32768]),
    )


def _walk_steps(ro: _Rollout, st: InferenceServiceStatus, a: AnalysisStatus) -> list[Action]:
    """Progressing: grant and pass steps as far as readiness, time and analysis allow.

    A held rollout (:meth:`_Rollout.held`) neither grants nor passes a step. Zero-pause steps
    without analysis pass in the same reconcile. Returns the StepStarted/Promoting Events.
    """
    actions: list[Action] = []
    if ro.held(a):
        return actions
    steps, n = ro.steps, len(ro.steps)
    step = st.current_step or 0
    while step < n:
        if st.step_start_time is None:
            if ro.observed.canary_ready_replicas < canary_replicas(ro.total, steps[step].weight):
                break
            st.step_start_time = ro.ts
            msg = f"step {step + 1}/{n}: canary version {ro.version} at weight {steps[step].weight}%"
            actions.append(Action("Event", "StepStarted", msg))
        if not _step_done(ro, st, a, steps[step]):
            break
        step += 1
        st.current_step = step
        st.step_start_time = None
        if step >= n:
            msg = f"all {n} steps passed: rolling the stable Deployment to version {ro.version}"
            actions.append(Action("Event", "Promoting", msg))
    return actions


def _step_done(ro: _Rollout, st: InferenceServiceStatus, a: AnalysisStatus, step: RolloutStep) -> bool:
    """A granted step is over: ``pauseSeconds`` since the grant and, with analysis and traffic,
    the last measurement was Successful and taken after the grant."""
    elapsed = _seconds_since(ro.now, st.step_start_time) or 0.0
    if elapsed < step.pause_seconds:
        return False
    if ro.analysis is not None and step.weight > 0:
        last = parse_time(a.last_run_time)
        began = parse_time(st.step_start_time)
        if a.phase != SUCCESSFUL or last is None or began is None or last <= began:
            return False
    return True


def _promoted(ro: _Rollout, st: InferenceServiceStatus, actions: list[Action]) -> Decision:
    """Promoted: every step passed and the stable Deployment runs the canary's version everywhere."""
    s, r, n = ro.stable, ro.version, len(ro.steps)
    _history(
        st,
        RolloutHistoryEntry(
            time=ro.ts,
            from_version=s,
            to_version=r,
            phase=RolloutPhase.PROMOTED,
            message=f"version {r} promoted after {n} step(s)",
        ),
    )
    actions.append(Action("Event", "Promoted", f"version {r} promoted to stable (was {s})"))
    st.stable_version = r
    _clear_canary(st)
    st.rollout_phase = RolloutPhase.PROMOTED
    return Decision(st, ro.steady(r), actions, None, rollout_healthy=_healthy_condition(st))


def _in_flight(
    ro: _Rollout, st: InferenceServiceStatus, a: AnalysisStatus, actions: list[Action]
) -> Decision:
    """A canary still running (in its steps, or promoting): phase, children, conditions, next run."""
    st.rollout_phase, health = _phase(ro, st, a)
    actions += _phase_events(ro, st, health)
    plan, granted = _children(ro, st, a)
    need = plan.canary_replicas
    ready = ro.observed.canary_ready_replicas
    if ready >= need:
        canary_cond = ConditionValue(TRUE, "CanaryReady", f"{ready}/{need} canary pods Ready")
    else:
        canary_cond = ConditionValue(FALSE, "CanaryNotReady", f"{ready}/{need} canary pods Ready")
    requeue = _requeue(ro, st, a, granted)
    return Decision(st, plan, actions, requeue, canary_ready=canary_cond, rollout_healthy=health)


def _phase(
    ro: _Rollout, st: InferenceServiceStatus, a: AnalysisStatus
) -> tuple[RolloutPhase, ConditionValue]:
    """The running canary's phase and ``RolloutHealthy``: Promoting (Progressing), ManualPause or
    AnalysisInconclusive (Paused, the latter Unknown), else Progressing at its step."""
    step, n = st.current_step or 0, len(ro.steps)
    if step >= n:
        msg = f"rolling the stable Deployment to version {ro.version}"
        return RolloutPhase.PROGRESSING, ConditionValue(TRUE, "Promoting", msg)
    if ro.spec.rollout.paused:
        msg = f"paused by spec.rollout.paused at step {step + 1}/{n}"
        return RolloutPhase.PAUSED, ConditionValue(TRUE, "ManualPause", msg)
    if ro.analysis is not None and ro.inconclusive_paused(a):
        msg = (
            f"{a.inconclusive} inconclusive measurement(s) in a row > inconclusiveLimit "
            f"{ro.analysis.inconclusive_limit}; holding step {step + 1}/{n} until a measurement succeeds "
            f"(or abort): {describe(a.results or [])}"
        )
        return RolloutPhase.PAUSED, ConditionValue(UNKNOWN, "AnalysisInconclusive", msg)
    waiting = " (waiting for canary pods)" if st.step_start_time is None else ""
    return RolloutPhase.PROGRESSING, ConditionValue(TRUE, "Progressing", f"step {step + 1}/{n}{waiting}")


def _phase_events(ro: _Rollout, st: InferenceServiceStatus, health: ConditionValue) -> list[Action]:
    """An Event when the rollout enters Paused (Warning unless paused by hand) or resumes from it."""
    step, n = st.current_step or 0, len(ro.steps)
    if st.rollout_phase == RolloutPhase.PAUSED and ro.previous_phase != RolloutPhase.PAUSED:
        kind = WARNING if health.status != TRUE else NORMAL
        return [Action("Event", health.reason, health.message, type=kind)]
    if st.rollout_phase == RolloutPhase.PROGRESSING and ro.previous_phase == RolloutPhase.PAUSED:
        return [Action("Event", "Resumed", f"rollout of version {ro.version} resumed at step {step + 1}/{n}")]
    return []


def _children(ro: _Rollout, st: InferenceServiceStatus, a: AnalysisStatus) -> tuple[Plan, int]:
    """Deployments and weight for the running canary; sets ``st.canaryWeight`` to the real share.

    The canary is sized for the current step's weight (a held rollout whose step is not granted
    yet starts no new canary pods: they would take traffic); the stable is reduced only for the
    granted weight (:func:`kiln.rollout.replicas.replica_split`). While promoting the stable
    Deployment runs the canary's version. Returns the plan and the granted weight.
    """
    steps, step = ro.steps, st.current_step or 0
    promoting = step >= len(steps)
    started = st.step_start_time is not None
    granted = _granted_weight(steps, step, started)
    target = steps[step].weight if not promoting else granted
    if not started and ro.held(a):
        target = granted
    split = replica_split(
        ro.total,
        target,
        granted,
        replica_ratio=ro.spec.rollout.traffic_routing == TrafficRouting.REPLICA_RATIO,
        autoscaled=ro.spec.autoscaling is not None,
        promoting=promoting,
        canary_ready=ro.observed.canary_ready_replicas,
    )
    st.canary_weight = split.canary_share
    plan = Plan(
        stable_version=ro.version if promoting else ro.stable,
        stable_replicas=split.stable,
        canary_version=ro.version,
        canary_replicas=split.canary,
        canary_weight=split.canary_share,
    )
    return plan, granted


def _requeue(ro: _Rollout, st: InferenceServiceStatus, a: AnalysisStatus, granted: int) -> float | None:
    """Seconds until the next reconcile of a running canary: the soonest of these, at least 0.5.

    The poll interval while waiting on pods (not granted yet, or promoting); else the rest of the
    step's pause unless held; and, with analysis and traffic, the time to the next measurement.
    None (no timed wake-up) for a held, granted step without analysis.
    """
    promoting = (st.current_step or 0) >= len(ro.steps)
    waits: list[float] = []
    if promoting or st.step_start_time is None:
        waits.append(WAIT_POLL_SECONDS)
    elif not ro.held(a):
        pause = ro.steps[st.current_step or 0].pause_seconds
        waits.append(max(0.0, pause - (_seconds_since(ro.now, st.step_start_time) or 0.0)))
    if ro.analysis is not None and not promoting and granted > 0:
        since = _seconds_since(ro.now, a.last_run_time)
        waits.append(0.0 if since is None else max(0.0, ro.analysis.interval_seconds - since))
    return max(0.5, min(waits)) if waits else None
