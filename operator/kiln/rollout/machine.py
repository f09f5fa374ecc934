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


def decide(
    spec: InferenceServiceSpec,
    status: InferenceServiceStatus,
    observed: Observed,
    measurement: Measurement | None,
    now: datetime,
) -> Decision:
    """Advance the rollout by one reconcile.

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
    ts = rfc3339(now)
    r = observed.resolved_version
    total = max(0, observed.total_replicas)
    autoscaled = spec.autoscaling is not None
    ratio = spec.rollout.traffic_routing == TrafficRouting.REPLICA_RATIO
    steps = list(spec.rollout.steps)
    n = len(steps)
    actions: list[Action] = []

    def steady(version: int) -> Plan:
        return Plan(stable_version=version, stable_replicas=None if autoscaled else total)

    def healthy_condition() -> ConditionValue:
        phase = st.rollout_phase or RolloutPhase.HEALTHY
        if phase == RolloutPhase.ROLLED_BACK:
            last = (st.history or [])[-1].message if st.history else ""
            return ConditionValue(
                FALSE, "RolledBack", last or f"version {st.rolled_back_version} was rolled back"
            )
        msg = f"serving version {st.stable_version}"
        return ConditionValue(TRUE, str(phase), msg)

    # 1. First version: deploy it, no canary.
    if st.stable_version is None:
        st.stable_version = r
        _clear_canary(st)
        st.rollout_phase = RolloutPhase.HEALTHY
        _history(
            st,
            RolloutHistoryEntry(
                time=ts, to_version=r, phase=RolloutPhase.HEALTHY, message=f"first version {r} deployed"
            ),
        )
        actions.append(Action("Event", "Deployed", f"serving model version {r}"))
        return Decision(st, steady(r), actions, None, rollout_healthy=healthy_condition())

    s = st.stable_version

    # 2. The resolved version is the stable one: cancel any canary.
    if r == s:
        if st.canary_version is not None:
            c = st.canary_version
            msg = f"rollout of version {c} cancelled: the model resolves to the stable version {s} again"
            _history(
                st,
                RolloutHistoryEntry(
                    time=ts, from_version=s, to_version=c, phase=RolloutPhase.HEALTHY, message=msg
                ),
            )
            actions.append(Action("Event", "RolloutCancelled", msg))
            st.rollout_phase = RolloutPhase.HEALTHY
        _clear_canary(st)
        st.rolled_back_version = None
        if st.rollout_phase not in (RolloutPhase.HEALTHY, RolloutPhase.PROMOTED):
            st.rollout_phase = RolloutPhase.HEALTHY
        return Decision(st, steady(s), actions, None, rollout_healthy=healthy_condition())

    # 3. A version that was rolled back is not retried until the resolved version changes.
    if st.rolled_back_version == r and st.canary_version is None:
        st.rollout_phase = RolloutPhase.ROLLED_BACK
        _clear_canary(st)
        return Decision(st, steady(s), actions, None, rollout_healthy=healthy_condition())

    def rollback(reason: str, message: str) -> Decision:
        c = st.canary_version
        _history(
            st,
            RolloutHistoryEntry(
                time=ts,
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
            steady(s),
            actions,
            None,
            canary_ready=ConditionValue(FALSE, "NoCanary", "canary removed by rollback"),
            rollout_healthy=ConditionValue(FALSE, "RolledBack", text[:32768]),
        )

    # 4. A new (or different) canary starts at step 0.
    if st.canary_version != r:
        note = f" (canary version {st.canary_version} superseded)" if st.canary_version is not None else ""
        st.canary_version = r
        st.current_step = 0
        st.step_start_time = None
        st.canary_weight = 0
        st.analysis = AnalysisStatus() if spec.rollout.analysis else None
        st.rolled_back_version = None
        st.rollout_phase = RolloutPhase.PROGRESSING
        msg = f"canary rollout {s} -> {r} started{note}"
        _history(
            st,
            RolloutHistoryEntry(
                time=ts, from_version=s, to_version=r, phase=RolloutPhase.PROGRESSING, message=msg
            ),
        )
        actions.append(Action("Event", "RolloutStarted", msg))
        measurement = None
        # What was observed belongs to the previous canary (if any), not to this one.
        observed = replace(observed, canary_ready_replicas=0, canary_failure=None)
    step = st.current_step or 0
    st.current_step = step

    # 5. Rollback triggers: abort, stuck canary, failed analysis.
    if spec.rollout.abort:
        return rollback("Aborted", "spec.rollout.abort is set")
    if observed.canary_failure:
        return rollback("ProgressDeadlineExceeded", observed.canary_failure)
    analysis = spec.rollout.analysis
    a = st.analysis or AnalysisStatus()
    if analysis is not None:
        st.analysis = a
    if analysis is not None and measurement is not None and measurement.version == r and step < n:
        results = list(measurement.results)
        phase = summarize(results)
        a.last_run_time = ts
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
            return rollback(
                "AnalysisFailed",
                f"{a.failures} failed measurement(s) > failureLimit {analysis.failure_limit}: "
                f"{describe(results)}",
            )

    def inconclusive_paused() -> bool:
        return analysis is not None and a.inconclusive > analysis.inconclusive_limit

    def held() -> bool:
        return spec.rollout.paused or inconclusive_paused()

    # 6. Walk the steps as far as time, readiness and analysis allow.
    for _ in range(n + 1):
        step = st.current_step or 0
        if step >= n:
            break
        w = steps[step].weight
        if st.step_start_time is None:
            if held() or observed.canary_ready_replicas < canary_replicas(total, w):
                break
            st.step_start_time = ts
            actions.append(
                Action("Event", "StepStarted", f"step {step + 1}/{n}: canary version {r} at weight {w}%")
            )
        if held():
            break
        elapsed = _seconds_since(now, st.step_start_time) or 0.0
        if elapsed < steps[step].pause_seconds:
            break
        if analysis is not None and w > 0:
            last = parse_time(a.last_run_time)
            began = parse_time(st.step_start_time)
            if a.phase != SUCCESSFUL or last is None or began is None or last <= began:
                break
        st.current_step = step + 1
        st.step_start_time = None
        if step + 1 >= n:
            actions.append(
                Action(
                    "Event",
                    "Promoting",
                    f"all {n} steps passed: rolling the stable Deployment to version {r}",
                )
            )

    step = st.current_step or 0
    promoting = step >= n

    # 7. Promotion completes once the stable Deployment runs the new version everywhere.
    if promoting and observed.stable_rolled_out_version == r:
        _history(
            st,
            RolloutHistoryEntry(
                time=ts,
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
        return Decision(st, steady(r), actions, None, rollout_healthy=healthy_condition())

    # 8. Phase, plan, conditions, next run.
    old_phase = status.rollout_phase
    if promoting:
        st.rollout_phase = RolloutPhase.PROGRESSING
        health = ConditionValue(TRUE, "Promoting", f"rolling the stable Deployment to version {r}")
    elif spec.rollout.paused:
        st.rollout_phase = RolloutPhase.PAUSED
        health = ConditionValue(TRUE, "ManualPause", f"paused by spec.rollout.paused at step {step + 1}/{n}")
    elif inconclusive_paused():
        st.rollout_phase = RolloutPhase.PAUSED
        assert analysis is not None
        health = ConditionValue(
            UNKNOWN,
            "AnalysisInconclusive",
            f"{a.inconclusive} inconclusive measurement(s) in a row > inconclusiveLimit "
            f"{analysis.inconclusive_limit}; holding step {step + 1}/{n} until a measurement succeeds "
            f"(or abort): {describe(a.results or [])}",
        )
    else:
        st.rollout_phase = RolloutPhase.PROGRESSING
        waiting = " (waiting for canary pods)" if st.step_start_time is None else ""
        health = ConditionValue(TRUE, "Progressing", f"step {step + 1}/{n}{waiting}")
    if st.rollout_phase == RolloutPhase.PAUSED and old_phase != RolloutPhase.PAUSED:
        actions.append(
            Action("Event", health.reason, health.message, type=WARNING if health.status != TRUE else NORMAL)
        )
    if st.rollout_phase == RolloutPhase.PROGRESSING and old_phase == RolloutPhase.PAUSED:
        actions.append(Action("Event", "Resumed", f"rollout of version {r} resumed at step {step + 1}/{n}"))

    started = st.step_start_time is not None
    granted = _granted_weight(steps, step, started)
    target = steps[step].weight if step < n else granted
    if not started and held():
        target = granted  # a held rollout starts no new canary pods (they would take traffic)
    split = replica_split(
        total,
        target,
        granted,
        replica_ratio=ratio,
        autoscaled=autoscaled,
        promoting=promoting,
        canary_ready=observed.canary_ready_replicas,
    )
    st.canary_weight = split.canary_share
    plan = Plan(
        stable_version=r if promoting else s,
        stable_replicas=split.stable,
        canary_version=r,
        canary_replicas=split.canary,
        canary_weight=split.canary_share,
    )

    need = split.canary
    if observed.canary_ready_replicas >= need:
        canary_cond = ConditionValue(
            TRUE, "CanaryReady", f"{observed.canary_ready_replicas}/{need} canary pods Ready"
        )
    else:
        canary_cond = ConditionValue(
            FALSE, "CanaryNotReady", f"{observed.canary_ready_replicas}/{need} canary pods Ready"
        )

    waits: list[float] = []
    if promoting or not started:
        waits.append(WAIT_POLL_SECONDS)
    elif not held():
        waits.append(max(0.0, steps[step].pause_seconds - (_seconds_since(now, st.step_start_time) or 0.0)))
    if analysis is not None and not promoting and granted > 0:
        since = _seconds_since(now, a.last_run_time)
        waits.append(0.0 if since is None else max(0.0, analysis.interval_seconds - since))
    requeue = max(0.5, min(waits)) if waits else None
    return Decision(st, plan, actions, requeue, canary_ready=canary_cond, rollout_healthy=health)
