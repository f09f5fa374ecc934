"""Whole-gang semantics of a TrainingJob, as a pure function of what the operator observes.

:func:`plan` takes the job, its parsed spec, its current status, its pods and the time, and
returns a :class:`Plan`: the new status and the actions to take (create the gang, delete pods,
delete the job, post events, register the result, requeue). The controller only executes it, so
everything here is unit-tested without a cluster.

Semantics (what Kubeflow Trainer users ask for, and Kubernetes Job's names where it has them):

- All ``numNodes`` pods of a gang are created together, named ``<job>-node-<rank>`` and labelled
  with the gang number ``status.gang``.
- A pod that fails (phase Failed) restarts the whole gang: every pod is deleted, ``gang`` is bumped
  and, after an exponential back-off (``initialSeconds * 2^(n-1)``, capped at ``maxSeconds``),
  the gang is recreated. ``restartCount`` counts these against ``maxRestarts``; past it the job
  fails with reason ``BackoffLimitExceeded`` (Kubernetes Job's reason).
- ``podFailurePolicy`` (batch/v1 Job's, on exit codes) can make a failure fatal at once
  (``FailJob``, reason ``PodFailurePolicy``) or restart without counting (``Ignore``).
- A disruption (pod evicted or preempted: ``DisruptionTarget`` condition or reason ``Evicted``;
  a started gang losing a pod, e.g. to node loss) restarts the gang at once without counting.
- The job succeeds when rank 0 succeeds and its termination message parses as a result; a
  missing or malformed result fails the job (reason ``ResultMissing`` / ``ResultMalformed`` /
  ``ResultTooLarge``).
- ``suspend`` deletes the pods and keeps the job; resuming creates a new gang and restarts the
  ``activeDeadlineSeconds`` clock (as Kubernetes Jobs do).
- A terminal job (Succeeded or Failed) deletes its pods that still run, so GPUs are freed, and
  never creates pods again; finished pods are kept (their logs explain the outcome) until
  ``ttlSecondsAfterFinished`` deletes the job and, through ownerReferences, them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kiln.api.trainingjob import PodFailurePolicyAction, TrainingJobSpec
from kiln.artifact import TerminationMessageError, TrainingResult, parse_termination_message
from kiln.conditions import FALSE, TRUE, is_true, parse_time, rfc3339, set_condition, set_stalled
from kiln.resources.trainingjob import CONTAINER, LABEL_GANG, LABEL_RANK

NORMAL, WARNING = "Normal", "Warning"
DISRUPTION_REASONS = {"Evicted", "Preempting", "NodeLost", "Shutdown", "NodeShutdown", "Terminated"}
#: How often to look again while waiting for the previous gang's pods to go away.
TERMINATING_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class PodView:
    """What the gang logic needs from a pod."""

    name: str
    uid: str
    rank: int
    gang: int
    phase: str
    deleting: bool
    disrupted: bool
    exit_code: int | None
    reason: str
    message: str

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def view(pod: dict[str, Any]) -> PodView:
    """Extract a :class:`PodView` from a core/v1 Pod (dict). Unlabelled pods get rank/gang -1."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    status = pod.get("status") or {}
    terminated: dict[str, Any] = {}
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == CONTAINER:
            terminated = (cs.get("state") or {}).get("terminated") or {}
    conditions = status.get("conditions") or []
    disrupted = status.get("reason") in DISRUPTION_REASONS or any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in conditions
    )

    def _int(v: Any) -> int:
        try:
            return int(v)
        except (TypeError, ValueError):
            return -1

    return PodView(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        rank=_int(labels.get(LABEL_RANK)),
        gang=_int(labels.get(LABEL_GANG)),
        phase=status.get("phase") or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
        disrupted=disrupted,
        exit_code=terminated.get("exitCode"),
        reason=terminated.get("reason") or status.get("reason") or "",
        message=terminated.get("message") or status.get("message") or "",
    )


@dataclass
class Plan:
    """What the controller should do after :func:`plan`."""

    status: dict[str, Any]
    create_gang: bool = False
    delete_pods: list[tuple[str, str]] = field(default_factory=list)  # (name, uid)
    delete_job: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    register: TrainingResult | None = None
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        """Ask for another reconcile in ``seconds`` (the earliest request wins)."""
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def failure_action(spec: TrainingJobSpec, exit_code: int | None) -> PodFailurePolicyAction:
    """The ``podFailurePolicy`` action for a failed pod's exit code: the first matching rule's,
    else ``Count`` (as batch/v1 Job evaluates ``onExitCodes`` rules). No exit code (the container
    never ran) always counts."""
    if spec.pod_failure_policy is None or exit_code is None:
        return PodFailurePolicyAction.COUNT
    for rule in spec.pod_failure_policy.rules:
        hit = exit_code in rule.on_exit_codes.values
        if hit == (rule.on_exit_codes.operator == "In"):
            return PodFailurePolicyAction(rule.action)
    return PodFailurePolicyAction.COUNT


def backoff_seconds(spec: TrainingJobSpec, restart: int) -> float:
    """Delay before gang restart number ``restart`` (1-based): initial * 2^(restart-1), capped."""
    initial = spec.restart_backoff.initial_seconds if spec.restart_backoff else 10
    cap = spec.restart_backoff.max_seconds if spec.restart_backoff else 300
    return float(min(cap, initial * 2 ** max(0, restart - 1)))


def plan(job: dict[str, Any], spec: TrainingJobSpec, pods: list[dict[str, Any]], now: datetime) -> Plan:
    """Decide the next step of a TrainingJob from its current state (see the module docstring)."""
    status: dict[str, Any] = copy.deepcopy(job.get("status") or {})
    gen = job.get("metadata", {}).get("generation")
    p = Plan(status=status)
    views = [view(x) for x in pods]
    gang = int(status.get("gang", 0))
    current = sorted((v for v in views if v.gang == gang), key=lambda v: v.rank)
    stale = [v for v in views if v.gang != gang]
    status["gang"] = gang
    status.setdefault("restartCount", 0)
    status.setdefault("disruptionCount", 0)
    status["nodes"] = {
        "pending": sum(v.phase == "Pending" for v in current),
        "running": sum(v.phase == "Running" for v in current),
        "succeeded": sum(v.phase == "Succeeded" for v in current),
        "failed": sum(v.phase == "Failed" for v in current),
    }
    status["observedGeneration"] = gen

    def cond(type_: str, value: str, reason: str, message: str = "") -> None:
        status["conditions"] = set_condition(
            status.get("conditions"), type_, value, reason, message, generation=gen, now=now
        )

    def event(type_: str, reason: str, message: str) -> None:
        p.events.append((type_, reason, message))

    def delete(vs: list[PodView]) -> None:
        p.delete_pods.extend((v.name, v.uid) for v in vs if not v.deleting)

    def finish(succeeded: bool, reason: str, message: str) -> None:
        cond("Succeeded" if succeeded else "Failed", TRUE, reason, message)
        cond("Running", FALSE, reason, message)
        cond("Restarting", FALSE, reason, message)
        status["phase"] = "Succeeded" if succeeded else "Failed"
        status["completionTime"] = rfc3339(now)
        status.pop("nextRestartTime", None)
        event(NORMAL if succeeded else WARNING, reason, message)

    conditions = status.get("conditions")
    # 1. Terminal: free the GPUs, never recreate, honour the TTL.
    if is_true(conditions, "Succeeded") or is_true(conditions, "Failed"):
        delete([v for v in views if not v.finished])
        _terminal_tail(job, spec, p, now)
        return p

    # 2. Suspended: no pods; resume makes a fresh gang with a fresh deadline clock.
    if spec.suspend:
        delete(views)
        if not is_true(conditions, "Suspended"):
            cond("Suspended", TRUE, "Suspended", "spec.suspend is true: pods deleted, job kept")
            cond("Running", FALSE, "Suspended", "")
            event(NORMAL, "Suspended", "job suspended; pods deleted")
            if current:
                status["gang"] = gang + 1
        status["phase"] = "Suspended"
        status.pop("startTime", None)
        _ready(p, now, gen)
        return p
    if is_true(conditions, "Suspended"):
        cond("Suspended", FALSE, "Resumed", "spec.suspend is false")
        event(NORMAL, "Resumed", "job resumed")

    # The gang exists but its creation is not recorded: the status write after creating it lost
    # a 409 to another writer. Record it now (the deadline clock starts from this reconcile).
    if current and not status.get("startTime"):
        status["startTime"] = rfc3339(now)
        cond("Created", TRUE, "PodsCreated", f"gang {gang}: {len(current)} pod(s)")

    # 3. Deadline.
    start = parse_time(status.get("startTime"))
    if start and spec.active_deadline_seconds:
        left = (start + timedelta(seconds=spec.active_deadline_seconds) - now).total_seconds()
        if left <= 0:
            delete([v for v in views if not v.finished])
            finish(
                False,
                "DeadlineExceeded",
                f"job ran longer than activeDeadlineSeconds={spec.active_deadline_seconds}",
            )
            _terminal_tail(job, spec, p, now)
            return p
        p.requeue(left)

    # 4. Success of rank 0.
    rank0 = next((v for v in current if v.rank == 0), None)
    if rank0 and rank0.phase == "Succeeded":
        delete([v for v in views if not v.finished])
        try:
            result = parse_termination_message(rank0.message)
        except TerminationMessageError as e:
            status["lastFailure"] = _failure(rank0, now, e.reason, str(e))
            finish(False, e.reason, f"rank 0 exited 0 but its result is unusable: {e}")
        else:
            status["result"] = {
                "artifactUri": result.artifactUri,
                "digest": result.digest,
                "metrics": result.metrics,
            }
            finish(True, "Succeeded", f"rank 0 finished; artifact {result.artifactUri}")
            if spec.model_ref and status.get("registeredVersion") is None:
                p.register = result
        _terminal_tail(job, spec, p, now)
        return p

    # 5. Failures and disruptions restart the whole gang.
    failed = [v for v in current if v.phase == "Failed"]
    started = any(v.phase in ("Running", "Succeeded", "Failed") for v in current)
    vanished = started and len(current) < spec.num_nodes
    disrupted = [v for v in current if v.disrupted or (v.deleting and not v.finished)]
    if disrupted or vanished:
        first = disrupted[0] if disrupted else None
        msg = (
            f"pod {first.name} disrupted ({first.reason or 'deleted'})"
            if first
            else f"{spec.num_nodes - len(current)} pod(s) of a running gang vanished"
        )
        status["disruptionCount"] = int(status["disruptionCount"]) + 1
        if first:
            status["lastFailure"] = _failure(first, now, first.reason or "Disrupted", msg)
        _restart(p, spec, current, status, now, delay=0.0, reason="Disruption", message=msg + "; not counted")
        cond("Restarting", TRUE, "Disruption", msg)
        return p
    if failed:
        first = failed[0]
        status["lastFailure"] = _failure(first, now, first.reason or "Error", first.message)
        code = f"exit code {first.exit_code}" if first.exit_code is not None else "no exit code"
        action = failure_action(spec, first.exit_code)
        if action == PodFailurePolicyAction.FAIL_JOB:
            delete([v for v in views if not v.finished])
            finish(
                False,
                "PodFailurePolicy",
                f"pod {first.name} failed ({code}), which podFailurePolicy makes fatal",
            )
            _terminal_tail(job, spec, p, now)
            return p
        if action == PodFailurePolicyAction.IGNORE:
            msg = f"pod {first.name} failed ({code}); podFailurePolicy ignores it: restarting the gang, not counted"
            _restart(p, spec, current, status, now, delay=0.0, reason="PodFailureIgnored", message=msg)
            cond("Restarting", TRUE, "PodFailureIgnored", msg)
            return p
        if int(status["restartCount"]) >= spec.max_restarts:
            delete([v for v in views if not v.finished])  # finished pods keep their logs
            finish(
                False,
                "BackoffLimitExceeded",
                f"pod {first.name} failed ({code}) after {status['restartCount']} gang restart(s); maxRestarts={spec.max_restarts}",
            )
            _terminal_tail(job, spec, p, now)
            return p
        status["restartCount"] = int(status["restartCount"]) + 1
        delay = backoff_seconds(spec, int(status["restartCount"]))
        msg = f"pod {first.name} failed ({code}); restarting the gang in {delay:g}s"
        _restart(p, spec, current, status, now, delay=delay, reason="PodFailed", message=msg)
        cond("Restarting", TRUE, "PodFailed", msg)
        return p

    # 6. Create the gang when it has no pods (after the previous gang is gone and the back-off).
    if len(current) < spec.num_nodes:
        next_restart = parse_time(status.get("nextRestartTime"))
        if stale:
            delete(stale)
            p.requeue(TERMINATING_POLL_SECONDS)
            status["phase"] = (
                "Restarting" if status.get("restartCount") or status.get("disruptionCount") else "Pending"
            )
            _ready(p, now, gen)
            return p
        if next_restart and next_restart > now:
            p.requeue((next_restart - now).total_seconds())
            status["phase"] = "Restarting"
            _ready(p, now, gen)
            return p
        p.create_gang = True
        status.pop("nextRestartTime", None)
        if not status.get("startTime"):
            status["startTime"] = rfc3339(now)
            if spec.active_deadline_seconds:
                p.requeue(spec.active_deadline_seconds)
        was_restarting = is_true(status.get("conditions"), "Restarting")
        cond("Created", TRUE, "PodsCreated", f"gang {gang}: {spec.num_nodes} pod(s)")
        if was_restarting:
            cond("Restarting", FALSE, "GangRecreated", f"gang {gang} created")
        if not current:
            event(NORMAL, "GangCreated", f"created gang {gang} of {spec.num_nodes} pod(s)")
        status["phase"] = "Pending"
        _ready(p, now, gen)
        return p

    # 7. Steady state.
    if all(v.phase == "Running" for v in current):
        if not is_true(status.get("conditions"), "Running"):
            cond("Running", TRUE, "AllPodsRunning", f"{len(current)} pod(s) running")
            event(NORMAL, "Running", f"all {len(current)} pod(s) running")
        status["phase"] = "Running"
    else:
        status["phase"] = "Pending"
    _ready(p, now, gen)
    return p


def _failure(v: PodView, now: datetime, reason: str, message: str) -> dict[str, Any]:
    out: dict[str, Any] = {"pod": v.name, "reason": reason, "message": message[:4096], "time": rfc3339(now)}
    if v.exit_code is not None:
        out["exitCode"] = v.exit_code
    return out


def _restart(
    p: Plan,
    spec: TrainingJobSpec,
    current: list[PodView],
    status: dict[str, Any],
    now: datetime,
    *,
    delay: float,
    reason: str,
    message: str,
) -> None:
    p.delete_pods.extend((v.name, v.uid) for v in current if not v.deleting)
    status["gang"] = int(status["gang"]) + 1
    status["nextRestartTime"] = rfc3339(now + timedelta(seconds=delay))
    status["phase"] = "Restarting"
    status["conditions"] = set_condition(
        status.get("conditions"),
        "Running",
        FALSE,
        reason,
        message,
        generation=status.get("observedGeneration"),
        now=now,
    )
    p.events.append((WARNING, "GangRestart", message))
    p.requeue(max(delay, TERMINATING_POLL_SECONDS))
    _ready(p, now, status.get("observedGeneration"))


def _ready(p: Plan, now: datetime, gen: int | None) -> None:
    """Ready is True once the job Succeeded and (with a modelRef) its version is registered.

    A Failed job is also ``Stalled=True`` with the failure's reason and message (kstatus:
    Failed), since nothing but a new job gets it further; otherwise there is no Stalled condition.
    """
    st = p.status
    c = st.get("conditions")
    if is_true(c, "Succeeded"):
        if p.register is not None:
            value, reason, msg = FALSE, "Registering", "registering the result in the Model"
        else:
            value, reason, msg = (
                TRUE,
                "Succeeded",
                "training finished"
                + (
                    f"; registered as version {st['registeredVersion']}"
                    if st.get("registeredVersion")
                    else ""
                ),
            )
    elif is_true(c, "Failed"):
        failed = next(x for x in c or [] if x["type"] == "Failed")
        value, reason, msg = FALSE, failed["reason"], failed["message"]
    else:
        value, reason, msg = FALSE, st.get("phase") or "Pending", "training in progress"
    st["conditions"] = set_condition(c, "Ready", value, reason, msg, generation=gen, now=now)
    st["conditions"] = set_stalled(
        st["conditions"], is_true(c, "Failed"), reason, msg, generation=gen, now=now
    )


def _terminal_tail(job: dict[str, Any], spec: TrainingJobSpec, p: Plan, now: datetime) -> None:
    st = p.status
    if (
        spec.model_ref
        and is_true(st.get("conditions"), "Succeeded")
        and st.get("registeredVersion") is None
        and st.get("result")
        and p.register is None
    ):
        p.register = TrainingResult.model_validate(st["result"])
    _ready(p, now, job.get("metadata", {}).get("generation"))
    done = parse_time(st.get("completionTime"))
    if spec.ttl_seconds_after_finished is not None and done:
        left = (done + timedelta(seconds=spec.ttl_seconds_after_finished) - now).total_seconds()
        if left <= 0:
            p.delete_job = True
        else:
            p.requeue(left)
