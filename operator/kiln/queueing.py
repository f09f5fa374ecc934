"""Kueue for TrainingJobs: Kiln creates one Workload per job and acts on Kueue's decisions.

A TrainingJob labelled ``kueue.x-k8s.io/queue-name: <LocalQueue>`` (as a PyTorchJob is) waits
with no pods (phase ``Queued``, ``Suspended=True`` reason ``Queued``) until Kueue admits its whole
gang, runs, and gives its quota back when it ends. This module is the pure part: what Kiln
reads from the Workload (:func:`observe` -> :class:`QueueView`, which :func:`kiln.gang.plan`
decides from) and the Workload status writes Kiln makes (:func:`unreserve`, :func:`finish`).
The Workload itself is built by :func:`kiln.resources.workload.workload`.

Integration path: a Workload that Kiln creates and watches, not Kueue's plain pod groups
-------------------------------------------------------------------------------------------
Kueue offers two ways in for a controller it does not know:

(a) The Workload API: the controller creates a ``Workload`` (pod sets with counts and pod
    templates), keeps its job from running until Kueue sets ``Admitted``, stops the job when
    Kueue sets ``Evicted`` and then clears the quota reservation, and sets ``Finished`` when the
    job ends. This is exactly what Kueue's own integrations (batch/Job, PyTorchJob, JobSet, ...)
    do through its jobframework (pkg/controller/jobframework/reconciler.go).
(b) Plain pod groups: Kiln would create the gang's pods at once with Kueue's pod-group labels
    (``kueue.x-k8s.io/pod-group-name``, ``pod-group-total-count``); Kueue's ``pod`` integration
    gates them with a scheduling gate through its Pod webhook, builds the Workload itself and
    ungates them on admission.

Kiln takes (a), because:

- "Suspended until admitted" is real: no pod exists before admission. With (b) every waiting
  job holds ``numNodes`` gated Pending pods (API objects, names, a Pod webhook call each), and a
  gang restart (Kiln's, on a failure) deletes and recreates pods that Kueue must re-group.
- Preemption releases whole gangs by construction: Kueue evicts the Workload (all ``numNodes``
  pods are one pod set), and Kiln deletes every pod of the gang before it gives the quota back
  (:func:`kiln.gang.plan`), so a gang is never left half-running. With (b) Kueue deletes the
  pods itself and Kiln's gang logic would see a disruption it did not order.
- No Kueue webhook is needed for TrainingJobs (Kiln creates the Workload, nothing mutates pods),
  so Kueue's Pod webhook, which (b) requires cluster-wide with failurePolicy Fail, stays out of
  the admission path of every other pod.
- The job's own semantics stay Kiln's: the gang restart and back-off, ``podFailurePolicy``,
  ``activeDeadlineSeconds`` (its clock starts at admission), ``suspend`` (deletes the Workload:
  the quota is free at once; resuming queues a new one).

What (a) costs: Kiln writes the Workload's status in two places Kueue's jobframework does
(clearing the reservation after an eviction, and ``Finished``), through
:func:`kiln.status.write_status` (a JSON merge patch guarded by resourceVersion), as Kueue
itself does under its ``WorkloadRequestUseMergePatch`` gate: server-side apply cannot remove
``status.admission``, which Kueue's field manager owns.

States (from the Workload's conditions, Kueue's names):

- none yet, or stale (the job's pod set or queue changed, or it is Finished under a live job):
  Kiln creates it (after deleting the stale one); the job is ``Queued``;
- ``QuotaReserved`` False or ``Admitted`` False: ``Queued`` (``Admitted=False`` on the job with
  Kueue's reason and message, e.g. ``Pending``: "couldn't assign flavors ... insufficient quota");
- ``Evicted`` True while ``QuotaReserved`` True (preempted, deactivated...): Kiln deletes the
  whole gang (a disruption, not a failure: ``disruptionCount``), then, once none of its pods
  runs, clears the reservation (:func:`unreserve`) so Kueue can give the quota to another
  Workload and queue this one again;
- ``Admitted`` True: the gang runs, its pods placed with the admitted ResourceFlavors' node
  labels and tolerations (:func:`flavor_placement`);
- the job Succeeded or Failed: ``Finished`` True (:func:`finish`): the quota is free.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kiln.conditions import FALSE, TRUE, get_condition, is_true, set_condition
from kiln.kube import covers

#: Conditions of a Workload (kueue.x-k8s.io/v1beta2 WorkloadStatus).
QUOTA_RESERVED, ADMITTED, EVICTED, FINISHED, REQUEUED = (
    "QuotaReserved",
    "Admitted",
    "Evicted",
    "Finished",
    "Requeued",
)
#: Eviction reasons after which Kueue's jobframework marks the Workload Requeued=True.
_REQUEUED_REASONS = ("Preempted", "NodeFailures")


@dataclass(frozen=True)
class QueueView:
    """What :func:`kiln.gang.plan` needs from a queued job's Workload.

    ``queue``: the LocalQueue; ``workload``: the Workload's name. ``exists``/``uid``: whether it
    exists and which incarnation; ``matches``: it asks for what the job needs now (pod set and
    queue). ``quota_reserved``/``admitted``/``evicted``/``finished``: its conditions.
    ``reason``/``message``: why it waits (the eviction's, else ``QuotaReserved``'s).
    ``cluster_queue`` and ``flavors`` (resource -> ResourceFlavor name): its admission.
    """

    queue: str
    workload: str
    exists: bool = False
    uid: str = ""
    matches: bool = True
    quota_reserved: bool = False
    admitted: bool = False
    evicted: bool = False
    finished: bool = False
    reason: str = ""
    message: str = ""
    cluster_queue: str = ""
    flavors: dict[str, str] = field(default_factory=dict)

    @property
    def must_release(self) -> bool:
        """Evicted while it still holds quota: stop the gang, then :func:`unreserve`."""
        return self.evicted and self.quota_reserved


def observe(queue: str, name: str, live: dict[str, Any] | None, desired: dict[str, Any]) -> QueueView:
    """The :class:`QueueView` of Workload ``name`` as read (``live``, None when absent);
    ``desired`` is the Workload Kiln would create now (:func:`kiln.resources.workload.workload`),
    whose ``queueName`` and ``podSets`` the live one must still cover."""
    if live is None:
        return QueueView(queue=queue, workload=name)
    conds = (live.get("status") or {}).get("conditions")
    reserved = is_true(conds, QUOTA_RESERVED)
    evicted = is_true(conds, EVICTED)
    why = get_condition(conds, EVICTED) if evicted and reserved else get_condition(conds, QUOTA_RESERVED)
    admission = (live.get("status") or {}).get("admission") or {}
    flavors: dict[str, str] = {}
    for psa in admission.get("podSetAssignments") or []:
        flavors |= psa.get("flavors") or {}
    want = {"queueName": desired["spec"]["queueName"], "podSets": desired["spec"]["podSets"]}
    return QueueView(
        queue=queue,
        workload=name,
        exists=True,
        uid=live.get("metadata", {}).get("uid", ""),
        matches=covers(live.get("spec") or {}, want),
        quota_reserved=reserved,
        admitted=is_true(conds, ADMITTED),
        evicted=evicted,
        finished=is_true(conds, FINISHED),
        reason=(why or {}).get("reason") or "Pending",
        message=(why or {}).get("message") or f"waiting for Kueue to admit it in LocalQueue {queue}",
        cluster_queue=admission.get("clusterQueue") or "",
        flavors=flavors,
    )


def unreserve(workload: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The new status that gives an evicted Workload's quota back, once its pods are gone: what
    Kueue's jobframework writes then (``SetRequeuedCondition`` +
    ``UnsetQuotaReservationWithCondition``): ``Requeued`` (True for a preemption or node
    failure, else False) with the eviction's reason, ``QuotaReserved=False`` (reason Pending),
    ``Admitted=False`` (NoReservation) and no ``admission``; the rest as read.

    The whole status, for :func:`kiln.status.write_status`: written against the resourceVersion
    it was computed from, so nothing Kueue wrote since is lost.
    """
    status = workload.get("status") or {}
    gen = workload.get("metadata", {}).get("generation")
    evicted = get_condition(status.get("conditions"), EVICTED) or {}
    reason = evicted.get("reason") or "Evicted"
    message = evicted.get("message") or "evicted"
    conds = copy.deepcopy(status.get("conditions") or [])
    requeued = TRUE if reason in _REQUEUED_REASONS else FALSE
    conds = set_condition(conds, REQUEUED, requeued, reason, message, generation=gen, now=now)
    conds = set_condition(conds, QUOTA_RESERVED, FALSE, "Pending", message, generation=gen, now=now)
    if get_condition(conds, ADMITTED) is not None:
        conds = set_condition(
            conds,
            ADMITTED,
            FALSE,
            "NoReservation",
            "The workload has no reservation",
            generation=gen,
            now=now,
        )
    out = {k: v for k, v in status.items() if k != "admission"}
    return out | {"conditions": conds}


def finish(workload: dict[str, Any], succeeded: bool, message: str, now: datetime) -> dict[str, Any]:
    """The new status marking a Workload ``Finished`` (reason Succeeded or Failed, as Kueue's
    ``workload.Finish``): Kueue then no longer counts its quota. The whole status, as
    :func:`unreserve`."""
    status = workload.get("status") or {}
    gen = workload.get("metadata", {}).get("generation")
    reason = "Succeeded" if succeeded else "Failed"
    conds = set_condition(status.get("conditions"), FINISHED, TRUE, reason, message, generation=gen, now=now)
    return {**status, "conditions": conds}


def flavor_placement(flavors: list[dict[str, Any]]) -> dict[str, Any]:
    """Placement the admitted ResourceFlavors add to the gang's pods: the union of their
    ``spec.nodeLabels`` as ``nodeSelector`` and of their ``spec.tolerations`` (Kueue's
    jobframework does the same on start: podset.FromAssignment)."""
    selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    for f in flavors:
        spec = f.get("spec") or {}
        selector |= spec.get("nodeLabels") or {}
        tolerations += [t for t in spec.get("tolerations") or [] if t not in tolerations]
    out: dict[str, Any] = {}
    if selector:
        out["nodeSelector"] = selector
    if tolerations:
        out["tolerations"] = tolerations
    return out
