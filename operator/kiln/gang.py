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
- A job queued in Kueue (``queue``: a :class:`kiln.queueing.QueueView`) has no pods until its
  Workload is admitted (phase ``Queued``); an eviction deletes the whole gang, counted as a
  disruption, and gives the quota back once no pod of it runs; the end of the job marks the
  Workload Finished. See :func:`_queued` and :mod:`kiln.queueing`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kiln.api.trainingjob import PodFailurePolicyAction, TrainingJobSpec
from kiln.artifact import TerminationMessageError, TrainingResult, parse_termination_message
from kiln.conditions import (
    FALSE,
    TRUE,
    get_condition,
    is_true,
    parse_time,
    rfc3339,
    set_condition,
    set_stalled,
)
from kiln.queueing import QueueView
from kiln.resources.trainingjob import CONTAINER, LABEL_GANG, LABEL_RANK

NORMAL, WARNING = "Normal", "Warning"
DISRUPTION_REASONS = {"Evicted", "Preempting", "NodeLost", "Shutdown", "NodeShutdown", "Terminated"}
#: How often to look again while waiting for the previous gang's pods to go away.
TERMINATING_POLL_SECONDS = 1.0
#: How often to look again while a gang is blocked (e.g. its FeatureGroup does not exist yet).
BLOCKED_RETRY_SECONDS = 15.0


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
    #: (reason, message) when a gang was due but could not be created (see :func:`plan`).
    blocked: tuple[str, str] | None = None
    # Kueue (a queued job): create its Workload; delete one (name, uid); give an evicted one's
    # quota back (kiln.queueing.unreserve); mark it Finished (succeeded?, message).
    create_workload: bool = False
    delete_workload: tuple[str, str] | None = None
    release_workload: bool = False
    finish_workload: tuple[bool, str] | None = None

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


def plan(
    job: dict[str, Any],
    spec: TrainingJobSpec,
    pods: list[dict[str, Any]],
    now: datetime,
    queue: QueueView | None = None,
    *,
    blocked: tuple[str, str] | None = None,
) -> Plan:
    """Decide the next step of a TrainingJob from its current state (see the module docstring).

    ``queue`` is the job's Kueue Workload as observed (None: the job names no LocalQueue).
    ``blocked`` is (reason, message) when a gang could not be built now (its FeatureGroup is
    missing or invalid): a gang that is due is then not created; the job stays Pending with
    ``Ready=False`` and that reason, and is looked at again in :data:`BLOCKED_RETRY_SECONDS`.
    One function per phase, in priority order: :func:`_terminal`, :func:`_suspended`,
    :func:`_queued` (and :func:`_resumed`), then the first of :func:`_deadline`,
    :func:`_rank0_succeeded`, :func:`_disrupted`, :func:`_pod_failed`, :func:`_gang_missing` that
    applies, else :func:`_steady`. Each returns the finished :class:`Plan`, or None when it does
    not apply. A job that ends marks its Workload Finished (:func:`_finish_workload`).
    """
    r = _observe(job, spec, pods, now)
    r.blocked = blocked
    p = _decide(r, queue)
    _finish_workload(r, queue)
    return p


def _decide(r: _Reconcile, queue: QueueView | None) -> Plan:
    conditions = r.status.get("conditions")
    if is_true(conditions, "Succeeded") or is_true(conditions, "Failed"):
        return _terminal(r)
    _unqueued(r, queue)
    if r.spec.suspend:
        if queue is not None:
            _drop_workload(r, queue)
        return _suspended(r)
    if queue is not None:
        held = _queued(r, queue)
        if held is not None:
            return held
    if is_true(r.status.get("conditions"), "Suspended"):
        _resumed(r)
    _unrecorded_gang(r)
    for phase in (_deadline, _rank0_succeeded, _disrupted, _pod_failed, _gang_missing):
        decided = phase(r)
        if decided is not None:
            return decided
    return _steady(r)


@dataclass
class _Reconcile:
    """One :func:`plan` call: its inputs, the pods by gang, and the :class:`Plan` being built.

    ``gang`` is ``status.gang`` as the reconcile found it; ``current`` its pods (by rank),
    ``stale`` the pods of other gangs; ``gen`` the job's ``metadata.generation``.
    """

    job: dict[str, Any]
    spec: TrainingJobSpec
    now: datetime
    p: Plan
    gen: int | None
    views: list[PodView]
    gang: int
    current: list[PodView]
    stale: list[PodView]
    blocked: tuple[str, str] | None = None

    @property
    def status(self) -> dict[str, Any]:
        return self.p.status

    def cond(self, type_: str, value: str, reason: str, message: str = "") -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions"), type_, value, reason, message, generation=self.gen, now=self.now
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        self.p.events.append((type_, reason, message))

    def delete(self, vs: list[PodView]) -> None:
        """Delete these pods (those not already being deleted)."""
        self.p.delete_pods.extend((v.name, v.uid) for v in vs if not v.deleting)

    def unfinished(self) -> list[PodView]:
        """Every pod that still runs or waits (finished pods keep their logs)."""
        return [v for v in self.views if not v.finished]

    def finish(self, succeeded: bool, reason: str, message: str) -> None:
        """Mark the job Succeeded or Failed: conditions, phase, ``completionTime``, an Event."""
        self.cond("Succeeded" if succeeded else "Failed", TRUE, reason, message)
        self.cond("Running", FALSE, reason, message)
        self.cond("Restarting", FALSE, reason, message)
        self.status["phase"] = "Succeeded" if succeeded else "Failed"
        self.status["completionTime"] = rfc3339(self.now)
        self.status.pop("nextRestartTime", None)
        self.event(NORMAL if succeeded else WARNING, reason, message)

    def fail(self, reason: str, message: str) -> Plan:
        """Fail the job now: delete its unfinished pods, finish it Failed, then the terminal tail."""
        self.delete(self.unfinished())
        self.finish(False, reason, message)
        return self.tail()

    def tail(self) -> Plan:
        """A terminal job's end of plan: registration, Ready, ``ttlSecondsAfterFinished``."""
        _terminal_tail(self.job, self.spec, self.p, self.now)
        return self.p

    def settle(self) -> Plan:
        """A non-terminal end of plan: the Ready condition from the status built so far."""
        _ready(self.p, self.now, self.gen)
        return self.p


def _observe(
    job: dict[str, Any], spec: TrainingJobSpec, pods: list[dict[str, Any]], now: datetime
) -> _Reconcile:
    """Start a plan: a copy of the status with the counters defaulted, node counts of the
    current gang and ``observedGeneration``; the pods split into the current gang and stale."""
    status: dict[str, Any] = copy.deepcopy(job.get("status") or {})
    gen = job.get("metadata", {}).get("generation")
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
    if len(current) >= spec.num_nodes:
        status["createdGang"] = gang
    return _Reconcile(job, spec, now, Plan(status=status), gen, views, gang, current, stale)


def _terminal(r: _Reconcile) -> Plan:
    """Succeeded or Failed: free the GPUs (delete unfinished pods), never recreate, honour the TTL."""
    r.delete(r.unfinished())
    return r.tail()


def _suspended(r: _Reconcile) -> Plan:
    """``spec.suspend``: no pods, job kept. On entering, the gang number moves on (if it had pods)
    so resuming makes a fresh gang; ``startTime`` is dropped, so the deadline clock restarts."""
    r.delete(r.views)
    if not is_true(r.status.get("conditions"), "Suspended"):
        r.cond("Suspended", TRUE, "Suspended", "spec.suspend is true: pods deleted, job kept")
        r.cond("Running", FALSE, "Suspended", "")
        r.event(NORMAL, "Suspended", "job suspended; pods deleted")
        if r.current:
            r.status["gang"] = r.gang + 1
    r.status["phase"] = "Suspended"
    r.status.pop("startTime", None)
    return r.settle()


def _queued(r: _Reconcile, q: QueueView) -> Plan | None:
    """Kueue decides when the gang runs: None once the Workload is admitted (the phases below
    then run the gang), else the plan that keeps the job ``Queued`` with no pods.

    - no Workload yet, or a stale one (the job's pod set or LocalQueue changed, or it is
      Finished under a live job): create one, after deleting the stale one;
    - evicted while holding quota: delete the whole gang (:func:`_stop_gang`), then, once none
      of its pods runs, give the quota back (``release_workload``);
    - not admitted (waiting for quota, or requeued after an eviction): stop any gang that runs.
    """
    r.status["workload"] = q.workload
    if not q.exists or not q.matches or q.finished:
        if q.exists:
            r.p.delete_workload = (q.workload, q.uid)
        else:
            r.p.create_workload = True
        _stop_gang(r, "WorkloadChanged" if q.exists else "Queued", f"Workload {q.workload} (re)created")
        return _hold(r, q, "Pending", f"Workload {q.workload} submitted to LocalQueue {q.queue}")
    if q.must_release:
        _stop_gang(r, q.reason, f"evicted by Kueue ({q.reason}): {q.message}")
        if any(not v.finished for v in r.views):
            r.p.requeue(TERMINATING_POLL_SECONDS)  # the quota goes back once no pod runs
        else:
            r.p.release_workload = True
        return _hold(r, q, q.reason, q.message)
    if not q.admitted:
        _stop_gang(r, "NotAdmitted", f"Workload {q.workload} is not admitted")
        return _hold(r, q, q.reason, q.message)
    if not is_true(r.status.get("conditions"), "Admitted"):
        msg = f"admitted by ClusterQueue {q.cluster_queue}"
        r.cond("Admitted", TRUE, "Admitted", msg)
        r.event(NORMAL, "Admitted", f"Kueue admitted the gang of {r.spec.num_nodes} pod(s): {msg}")
    if is_true(r.status.get("conditions"), "Suspended"):
        r.cond("Suspended", FALSE, "Admitted", "Kueue admitted the gang")
    return None


def _stop_gang(r: _Reconcile, reason: str, message: str) -> None:
    """Delete every pod of the job (a gang runs whole or not at all). A current gang that had
    pods is over: the gang number moves on, counted in ``disruptionCount`` (not a failure)."""
    r.delete(r.views)
    if not r.current:
        return
    r.status["gang"] = r.gang + 1
    r.status["disruptionCount"] = int(r.status["disruptionCount"]) + 1
    r.status.pop("nextRestartTime", None)
    r.event(WARNING, "GangStopped", f"gang {r.gang} stopped ({reason}): {message}; not counted")


def _hold(r: _Reconcile, q: QueueView, reason: str, message: str) -> Plan:
    """The job waits for Kueue: ``Queued``, ``Admitted=False`` with Kueue's reason and message,
    ``Suspended=True`` (reason Queued: no pods, job kept) and no ``startTime`` (the
    ``activeDeadlineSeconds`` clock starts at admission)."""
    r.cond("Admitted", FALSE, reason, message)
    suspended = get_condition(r.status.get("conditions"), "Suspended") or {}
    if suspended.get("status") != TRUE or suspended.get("reason") != "Queued":
        r.cond(
            "Suspended", TRUE, "Queued", f"waiting for Kueue to admit the whole gang (LocalQueue {q.queue})"
        )
        r.event(
            NORMAL,
            "Queued",
            f"no pods until Kueue admits the whole gang: Workload {q.workload}, LocalQueue {q.queue}",
        )
    if get_condition(r.status.get("conditions"), "Running") is not None:
        r.cond("Running", FALSE, "Queued", "")
    r.status["phase"] = "Queued"
    r.status.pop("startTime", None)
    return r.settle()


def _drop_workload(r: _Reconcile, q: QueueView) -> None:
    """``spec.suspend`` of a queued job: its Workload is deleted once no pod of it runs (the
    quota is free at once); resuming creates a new one, which queues again."""
    if q.exists and not any(not v.finished for v in r.views):
        r.p.delete_workload = (q.workload, q.uid)
        r.status.pop("workload", None)
    elif q.exists:
        r.p.requeue(TERMINATING_POLL_SECONDS)
    else:
        r.status.pop("workload", None)


def _unqueued(r: _Reconcile, q: QueueView | None) -> None:
    """The queue-name label was removed: the job no longer waits for Kueue, and the Workload
    it had (``status.workload``) is deleted so it holds no quota."""
    name = r.status.get("workload")
    if q is None and name:
        r.p.delete_workload = (str(name), "")
        r.status.pop("workload", None)
        r.cond(
            "Admitted", FALSE, "Unqueued", f"the job names no LocalQueue any more; Workload {name} deleted"
        )


def _finish_workload(r: _Reconcile, q: QueueView | None) -> None:
    """A job that Succeeded or Failed gives its quota back: its Workload becomes Finished."""
    c = r.status.get("conditions")
    done = is_true(c, "Succeeded") or is_true(c, "Failed")
    if q is None or not done or not q.exists or q.finished:
        return
    cond = get_condition(c, "Succeeded" if is_true(c, "Succeeded") else "Failed") or {}
    r.p.finish_workload = (is_true(c, "Succeeded"), cond.get("message") or cond.get("reason") or "")


def _resumed(r: _Reconcile) -> None:
    """A suspended job whose ``spec.suspend`` is false again: Suspended=False and an Event; the
    phases below then create the new gang."""
    r.cond("Suspended", FALSE, "Resumed", "spec.suspend is false")
    r.event(NORMAL, "Resumed", "job resumed")


def _unrecorded_gang(r: _Reconcile) -> None:
    """The gang exists but its creation is not recorded: the status write after creating it lost
    a 409 to another writer. Record it now (the deadline clock starts from this reconcile)."""
    if r.current and not r.status.get("startTime"):
        r.status["startTime"] = rfc3339(r.now)
        r.cond("Created", TRUE, "PodsCreated", f"gang {r.gang}: {len(r.current)} pod(s)")


def _deadline(r: _Reconcile) -> Plan | None:
    """``activeDeadlineSeconds`` since ``startTime``: over, the job fails (DeadlineExceeded);
    else a requeue for when it will be."""
    start = parse_time(r.status.get("startTime"))
    limit = r.spec.active_deadline_seconds
    if not (start and limit):
        return None
    left = (start + timedelta(seconds=limit) - r.now).total_seconds()
    if left > 0:
        r.p.requeue(left)
        return None
    return r.fail("DeadlineExceeded", f"job ran longer than activeDeadlineSeconds={limit}")


def _rank0_succeeded(r: _Reconcile) -> Plan | None:
    """Rank 0 Succeeded: the job succeeds with the result in its termination message (registered
    next, with a modelRef), or fails when that result is missing or malformed."""
    rank0 = next((v for v in r.current if v.rank == 0), None)
    if rank0 is None or rank0.phase != "Succeeded":
        return None
    r.delete(r.unfinished())
    try:
        result = parse_termination_message(rank0.message)
    except TerminationMessageError as e:
        r.status["lastFailure"] = _failure(rank0, r.now, e.reason, str(e))
        r.finish(False, e.reason, f"rank 0 exited 0 but its result is unusable: {e}")
    else:
        r.status["result"] = {
            "artifactUri": result.artifactUri,
            "digest": result.digest,
            "metrics": result.metrics,
        }
        r.finish(True, "Succeeded", f"rank 0 finished; artifact {result.artifactUri}")
        if r.spec.model_ref and r.status.get("registeredVersion") is None:
            r.p.register = result
    return r.tail()


def _disrupted(r: _Reconcile) -> Plan | None:
    """A pod evicted, preempted or deleted under the gang, or pods of a started, once complete
    gang vanished (node loss): restart the gang at once, counted in ``disruptionCount``, not
    ``restartCount``. A gang that was never complete (``createdGang``: its creation was
    interrupted, or the API server refused a pod) is not disrupted: :func:`_gang_missing` creates
    the pods it lacks."""
    current, num_nodes = r.current, r.spec.num_nodes
    started = any(v.phase in ("Running", "Succeeded", "Failed") for v in current)
    complete = r.status.get("createdGang") == r.gang
    vanished = started and complete and len(current) < num_nodes
    disrupted = [v for v in current if v.disrupted or (v.deleting and not v.finished)]
    if not (disrupted or vanished):
        return None
    first = disrupted[0] if disrupted else None
    msg = (
        f"pod {first.name} disrupted ({first.reason or 'deleted'})"
        if first
        else f"{num_nodes - len(current)} pod(s) of a running gang vanished"
    )
    r.status["disruptionCount"] = int(r.status["disruptionCount"]) + 1
    if first:
        r.status["lastFailure"] = _failure(first, r.now, first.reason or "Disrupted", msg)
    _restart(
        r.p, r.spec, current, r.status, r.now, delay=0.0, reason="Disruption", message=msg + "; not counted"
    )
    r.cond("Restarting", TRUE, "Disruption", msg)
    return r.p


def _pod_failed(r: _Reconcile) -> Plan | None:
    """A pod of the gang Failed (the lowest rank is reported): ``podFailurePolicy`` fails the job
    (FailJob), restarts the gang uncounted (Ignore), or the failure counts (:func:`_counted_failure`)."""
    failed = [v for v in r.current if v.phase == "Failed"]
    if not failed:
        return None
    first = failed[0]
    r.status["lastFailure"] = _failure(first, r.now, first.reason or "Error", first.message)
    code = f"exit code {first.exit_code}" if first.exit_code is not None else "no exit code"
    action = failure_action(r.spec, first.exit_code)
    if action == PodFailurePolicyAction.FAIL_JOB:
        return r.fail(
            "PodFailurePolicy", f"pod {first.name} failed ({code}), which podFailurePolicy makes fatal"
        )
    if action == PodFailurePolicyAction.IGNORE:
        msg = (
            f"pod {first.name} failed ({code}); podFailurePolicy ignores it: restarting the gang, not counted"
        )
        _restart(r.p, r.spec, r.current, r.status, r.now, delay=0.0, reason="PodFailureIgnored", message=msg)
        r.cond("Restarting", TRUE, "PodFailureIgnored", msg)
        return r.p
    return _counted_failure(r, first, code)


def _counted_failure(r: _Reconcile, first: PodView, code: str) -> Plan:
    """A failure counted against ``maxRestarts``: past it the job fails (BackoffLimitExceeded),
    else ``restartCount`` grows and the gang restarts after :func:`backoff_seconds`."""
    restarts = int(r.status["restartCount"])
    if restarts >= r.spec.max_restarts:
        return r.fail(
            "BackoffLimitExceeded",
            f"pod {first.name} failed ({code}) after {r.status['restartCount']} gang restart(s); maxRestarts={r.spec.max_restarts}",
        )
    r.status["restartCount"] = restarts + 1
    delay = backoff_seconds(r.spec, restarts + 1)
    msg = f"pod {first.name} failed ({code}); restarting the gang in {delay:g}s"
    _restart(r.p, r.spec, r.current, r.status, r.now, delay=delay, reason="PodFailed", message=msg)
    r.cond("Restarting", TRUE, "PodFailed", msg)
    return r.p


def _gang_missing(r: _Reconcile) -> Plan | None:
    """The gang lacks pods: first wait for the previous gang's pods to go, then for the
    restart back-off (``nextRestartTime``), then create it (:func:`_create_gang`)."""
    if len(r.current) >= r.spec.num_nodes:
        return None
    next_restart = parse_time(r.status.get("nextRestartTime"))
    if r.stale:
        r.delete(r.stale)
        r.p.requeue(TERMINATING_POLL_SECONDS)
        restarted = r.status.get("restartCount") or r.status.get("disruptionCount")
        r.status["phase"] = "Restarting" if restarted else "Pending"
        return r.settle()
    if next_restart and next_restart > r.now:
        r.p.requeue((next_restart - r.now).total_seconds())
        r.status["phase"] = "Restarting"
        return r.settle()
    if r.blocked is not None:
        r.p.blocked = r.blocked
        r.p.requeue(BLOCKED_RETRY_SECONDS)
        r.status["phase"] = "Pending"
        return r.settle()
    return _create_gang(r)


def _create_gang(r: _Reconcile) -> Plan:
    """Create the gang's pods (the controller creates those missing). The first creation starts
    the ``activeDeadlineSeconds`` clock (``startTime``); a recreation ends Restarting."""
    r.p.create_gang = True
    r.status.pop("nextRestartTime", None)
    if not r.status.get("startTime"):
        r.status["startTime"] = rfc3339(r.now)
        if r.spec.active_deadline_seconds:
            r.p.requeue(r.spec.active_deadline_seconds)
    was_restarting = is_true(r.status.get("conditions"), "Restarting")
    r.cond("Created", TRUE, "PodsCreated", f"gang {r.gang}: {r.spec.num_nodes} pod(s)")
    if was_restarting:
        r.cond("Restarting", FALSE, "GangRecreated", f"gang {r.gang} created")
    if not r.current:
        r.event(NORMAL, "GangCreated", f"created gang {r.gang} of {r.spec.num_nodes} pod(s)")
    r.status["phase"] = "Pending"
    return r.settle()


def _steady(r: _Reconcile) -> Plan:
    """The whole gang exists and nothing failed: Running once every pod runs, else Pending."""
    if all(v.phase == "Running" for v in r.current):
        if not is_true(r.status.get("conditions"), "Running"):
            r.cond("Running", TRUE, "AllPodsRunning", f"{len(r.current)} pod(s) running")
            r.event(NORMAL, "Running", f"all {len(r.current)} pod(s) running")
        r.status["phase"] = "Running"
    else:
        r.status["phase"] = "Pending"
    return r.settle()


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
    elif p.blocked is not None:
        value, (reason, msg) = FALSE, p.blocked
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
