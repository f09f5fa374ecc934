"""TrainingJob controller: read -> :func:`kiln.gang.plan` -> apply -> status.

Watches TrainingJobs, their pods and their Kueue Workloads (both labelled
``kiln.dev/trainingjob``); every event enqueues one level-based reconcile of the job (see
:mod:`kiln.controllers.runtime`). A job labelled ``kueue.x-k8s.io/queue-name`` is queued in
Kueue through a Workload Kiln creates (see :mod:`kiln.queueing`). Without Kueue's CRDs the
Workload watch is simply not served (kopf notices the CRD when it is installed later).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kiln import API_VERSION, events, failpoints, kube, queueing, storage
from kiln.api.common import spec_error
from kiln.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from kiln.artifact import ArtifactError
from kiln.conditions import FALSE, TRUE, get_condition, set_condition, set_stalled
from kiln.controllers.runtime import CACHE, ReconcileFn, Result, watch, watch_children
from kiln.gang import Plan, plan
from kiln.queueing import QueueView
from kiln.resources import trainingjob as build
from kiln.resources import workload as wl
from kiln.resources.retraining import ANNOTATION_TRIGGER as ANNOTATION_RETRAINING_TRIGGER
from kiln.resources.storage import StorageDefaults
from kiln.status import write_status

log = logging.getLogger("kiln.trainingjob")
KIND = "TrainingJob"
PLURAL = "trainingjobs"
watch(KIND, API_VERSION, PLURAL, cached=True)
watch_children(KIND, "v1", "pods", build.LABEL_JOB)
watch_children(KIND, wl.KUEUE_API_VERSION, "workloads", build.LABEL_JOB)

#: First retry interval when the Model to register in is missing or the registration failed; it
#: doubles (the time since Ready went False) up to :data:`REGISTRATION_RETRY_MAX_SECONDS`.
REGISTRATION_RETRY_SECONDS = 15.0
REGISTRATION_RETRY_MAX_SECONDS = 300.0
#: Threads that create a gang's Services and pods in parallel (shared by all TrainingJobs).
GANG_CREATORS = 32
_creators = ThreadPoolExecutor(max_workers=GANG_CREATORS, thread_name_prefix="kiln-gang-create")
#: Retry interval while a queued job's Workload cannot be created (Kueue's API not served, its
#: priority class missing): nothing Kiln watches says when that changes.
WORKLOAD_RETRY_SECONDS = 30.0


def reconcile(api: k8s.ApiClient, namespace: str, name: str, now: datetime | None = None) -> Result | None:
    """Reconcile one TrainingJob. Returns when to look again (back-off, deadline, TTL).

    The job is read from the watch cache unless a status write of ours is not in it yet (see
    :class:`kiln.controllers.runtime.WatchCache`); a stale copy cannot write: the status write
    is guarded by its resourceVersion, and after a 409 the next run reads the API server.
    """
    job = CACHE.get(PLURAL, namespace, name) or kube.get(api, API_VERSION, KIND, namespace, name)
    if job is None or job["metadata"].get("deletionTimestamp"):
        return None
    now = now or datetime.now(UTC)
    old_status = job.get("status") or {}
    try:
        spec = TrainingJobSpec.model_validate(job.get("spec") or {})
    except ValidationError as e:
        # The schema admits it but the model does not (e.g. a rule only pydantic states): terminal
        # until the spec changes.
        gen = job["metadata"].get("generation")
        conds = set_condition(
            old_status.get("conditions"),
            "Ready",
            FALSE,
            "InvalidSpec",
            spec_error(e),
            generation=gen,
            now=now,
        )
        conds = set_stalled(conds, True, "InvalidSpec", spec_error(e), generation=gen, now=now)
        new = {**old_status, "conditions": conds, "observedGeneration": gen}
        write_status(api, job, TrainingJobStatus.model_validate(new))
        return None

    pods = kube.list_objects(api, "v1", "Pod", namespace, f"{build.LABEL_JOB}={name}")
    queue, workload = _read_queue(api, job, spec)
    p = plan(job, spec, pods, now, queue)
    # The FeatureGroup is read only when a gang is to be built (not at every reconcile of a
    # running job); if it cannot be built, decide again with the blocker (the plan is pure).
    fg_ref = spec.dataset.feature_group_ref
    feature_group = None
    if p.create_gang and fg_ref is not None:
        feature_group = kube.get(api, API_VERSION, "FeatureGroup", namespace, fg_ref.name)
        blocked = build.feature_group_blocker(spec, feature_group)
        if blocked is not None:
            p = plan(job, spec, pods, now, queue, blocked=blocked)

    for pod_name, uid in p.delete_pods:
        kube.delete(api, "v1", "Pod", namespace, pod_name, uid=uid)
    _sync_workload(api, job, spec, p, workload, now)
    if p.create_gang:
        _create_gang(api, job, spec, p, pods, _admitted_placement(api, queue), feature_group)
    if p.register is not None:
        _register(api, job, spec, p.status, now)
        if p.status.get("registeredVersion") is None:
            p.requeue(registration_retry_delay(p.status, now))
        else:
            failpoints.hit("trainingjob-registered")
    # A 409 here (the job changed under us) propagates: the work queue decides again at once,
    # from the API server (the cached copy may be the stale one).
    read_version = job["metadata"].get("resourceVersion")
    try:
        job = write_status(api, job, TrainingJobStatus.model_validate(p.status))
    except kube.Conflict:
        CACHE.forget(PLURAL, namespace, name)
        raise
    if job["metadata"].get("resourceVersion") != read_version:
        CACHE.wrote(PLURAL, job)
    for type_, reason, message in p.events:
        events.record(api, job, type_, reason, message)
    if p.delete_job:
        kube.delete(api, API_VERSION, KIND, namespace, name, uid=job["metadata"]["uid"])
        return None
    return Result(requeue_after=p.requeue_after) if p.requeue_after is not None else None


def _create_gang(
    api: k8s.ApiClient,
    job: dict[str, Any],
    spec: TrainingJobSpec,
    p: Plan,
    pods: list[dict[str, Any]],
    admitted: dict[str, Any] | None,
    feature_group: dict[str, Any] | None,
) -> None:
    """Create the gang's missing pods (with Kueue's ``admitted`` placement and the resolved
    ``feature_group`` of ``dataset.featureGroupRef``) and its Service.

    The pods and the headless Service are created concurrently: the gang is only as fast as its
    slowest pod, and torchrun's rendezvous retries until node 0's name resolves. Only the missing
    pods: creating one that exists is not always a harmless 409 (under a full ResourceQuota the
    API server answers 403 before it looks for the name).
    """
    writes: list[tuple[Callable[..., Any], dict[str, Any]]] = [(kube.apply, build.service(job))]
    defaults = StorageDefaults.from_environ(os.environ)
    existing = {x["metadata"]["name"] for x in pods}
    writes += [
        (_create_pod, m)
        for m in build.pods(job, spec, int(p.status["gang"]), defaults, admitted, feature_group)
        if m["metadata"]["name"] not in existing
    ]
    futures = [_creators.submit(write, api, manifest) for write, manifest in writes]
    for f in futures:
        f.result()


def _read_queue(
    api: k8s.ApiClient, job: dict[str, Any], spec: TrainingJobSpec
) -> tuple[QueueView | None, dict[str, Any] | None]:
    """The job's Kueue Workload, as read and as :class:`QueueView` (both None: not queued)."""
    queue = wl.queue_name(job)
    if queue is None:
        return None, None
    name = wl.workload_name(job)
    live = kube.get(api, wl.KUEUE_API_VERSION, wl.WORKLOAD, job["metadata"]["namespace"], name)
    return queueing.observe(queue, name, live, wl.workload(job, spec)), live


def _sync_workload(
    api: k8s.ApiClient,
    job: dict[str, Any],
    spec: TrainingJobSpec,
    p: Plan,
    live: dict[str, Any] | None,
    now: datetime,
) -> None:
    """Carry out the plan's Workload steps: delete, create, give the quota back, finish.

    The status writes go through :func:`kiln.status.write_status`, guarded by the Workload's
    resourceVersion (Kueue writes the same conditions): a 409 re-runs the reconcile from a fresh
    read; a Workload deleted meanwhile is left to the next reconcile (its DELETED event).
    """
    ns = job["metadata"]["namespace"]
    if p.delete_workload:
        name, uid = p.delete_workload
        kube.delete(api, wl.KUEUE_API_VERSION, wl.WORKLOAD, ns, name, uid=uid or None)
    if p.create_workload:
        _create_workload(api, job, spec, p, now)
    status: dict[str, Any] | None = None
    if live is not None and p.release_workload:
        status = queueing.unreserve(live, now)
    elif live is not None and p.finish_workload:
        status = queueing.finish(live, *p.finish_workload, now)
    if live is not None and status is not None:
        with contextlib.suppress(kube.Gone):
            write_status(api, live, status)


def _create_workload(
    api: k8s.ApiClient, job: dict[str, Any], spec: TrainingJobSpec, p: Plan, now: datetime
) -> None:
    """Create the job's Workload, its priority resolved from its class. When that cannot be done
    yet (the class is missing, Kueue's API is not served) the job stays Queued with
    ``Admitted=False`` saying why, and tries again in :data:`WORKLOAD_RETRY_SECONDS`."""
    ref = wl.priority_class(job, spec)
    try:
        priority = _priority(api, *ref) if ref else None
        kube.create(api, wl.workload(job, spec, priority))
        return
    except LookupError as e:
        reason, msg = "PriorityClassNotFound", str(e)
    except ApiException as e:
        if e.status != 404:
            raise
        reason, msg = (
            "WorkloadAPIMissing",
            f"{wl.KUEUE_API_VERSION} Workloads are not served: is Kueue installed?",
        )
    gen = job["metadata"].get("generation")
    if (get_condition(p.status.get("conditions"), "Admitted") or {}).get("reason") != reason:
        p.events.append((events.WARNING, reason, msg))
    p.status["conditions"] = set_condition(
        p.status.get("conditions"), "Admitted", FALSE, reason, msg, generation=gen, now=now
    )
    p.requeue(WORKLOAD_RETRY_SECONDS)


def _priority(api: k8s.ApiClient, kind: str, name: str) -> wl.Priority:
    """The value of WorkloadPriorityClass / PriorityClass ``name``.

    Raises:
        LookupError: no such class, or Kiln may not read it (a namespaced install without the
            chart's ``kueue.clusterReads``).
    """
    api_version = wl.KUEUE_API_VERSION if kind == wl.WORKLOAD_PRIORITY_CLASS else "scheduling.k8s.io/v1"
    try:
        obj = kube.get(api, api_version, kind, None, name)
    except ApiException as e:
        if e.status != 403:
            raise
        raise LookupError(f"{kind} {name} cannot be read: {kube.server_message(e)}") from e
    if obj is None:
        raise LookupError(f"{kind} {name} not found")
    return wl.Priority(kind, name, int(obj.get("value", 0)))


def _admitted_placement(api: k8s.ApiClient, queue: QueueView | None) -> dict[str, Any] | None:
    """``nodeSelector``/``tolerations`` of the ResourceFlavors Kueue admitted the gang with.

    Read only when the gang is created. A flavor Kiln may not read (a namespaced install without
    the chart's cluster-wide Kueue reads) is skipped with a warning: its pods then rely on the
    kube-scheduler alone to land where the quota was counted.
    """
    if queue is None or not queue.flavors:
        return None
    flavors = []
    for name in sorted(set(queue.flavors.values())):
        try:
            flavor = kube.get(api, wl.KUEUE_API_VERSION, wl.RESOURCE_FLAVOR, None, name)
        except ApiException as e:
            if e.status != 403:
                raise
            log.warning("cannot read ResourceFlavor %s (%s): its node labels are not applied", name, e.reason)
            continue
        if flavor is not None:
            flavors.append(flavor)
    return queueing.flavor_placement(flavors)


def _create_pod(api: k8s.ApiClient, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Create one gang pod (None when it already exists; see :func:`kiln.kube.create`)."""
    created = kube.create(api, manifest)
    CACHE.wrote("pods", created)  # its ADDED event only echoes this create: no reconcile for it
    failpoints.hit("trainingjob-pod-created")
    return created


def registration_retry_delay(status: dict[str, Any], now: datetime) -> float:
    """Seconds until the next registration attempt: the time Ready has been False (so waits
    double), clamped to [:data:`REGISTRATION_RETRY_SECONDS`, :data:`REGISTRATION_RETRY_MAX_SECONDS`]."""
    ready = get_condition(status.get("conditions"), "Ready") or {}
    since = ready.get("lastTransitionTime") if ready.get("status") == FALSE else None
    waited = (now - datetime.fromisoformat(since.replace("Z", "+00:00"))).total_seconds() if since else 0.0
    return min(REGISTRATION_RETRY_MAX_SECONDS, max(REGISTRATION_RETRY_SECONDS, waited))


def _register(
    api: k8s.ApiClient, job: dict[str, Any], spec: TrainingJobSpec, status: dict[str, Any], now: datetime
) -> None:
    """Register the job's result as a new Model version; records the outcome in ``status``."""
    from kiln.registration import ArtifactRefused, register_version  # the registry's one entry point

    assert spec.model_ref is not None
    result = status["result"]
    lineage: dict[str, Any] = {
        "source": "TrainingJob",
        "trainingJob": job["metadata"]["name"],
        "image": spec.image,
    }
    trigger = (job["metadata"].get("annotations") or {}).get(ANNOTATION_RETRAINING_TRIGGER)
    if trigger:  # a run of the Model's spec.retraining (kiln.resources.retraining)
        lineage["retrainingTrigger"] = trigger
    try:
        meta = storage.read_artifact_metadata(result["artifactUri"])
    except ArtifactError:
        meta = None  # the operator may not reach the artifact store; lineage stays partial
    if meta and meta.dataset:
        lineage["dataset"] = meta.dataset.name
        lineage["datasetDigest"] = meta.dataset.digest
        if meta.dataset.schemaDigest:
            lineage["featureGroupSchemaDigest"] = meta.dataset.schemaDigest
    elif spec.dataset.builtin or spec.dataset.uri:
        lineage["dataset"] = spec.dataset.builtin or spec.dataset.uri
    if spec.dataset.feature_group_ref:
        lineage["featureGroup"] = spec.dataset.feature_group_ref.name
    gen = job["metadata"].get("generation")
    try:
        version = register_version(
            api,
            job["metadata"]["namespace"],
            spec.model_ref.name,
            artifact_uri=result["artifactUri"],
            digest=result["digest"],
            metrics=result.get("metrics") or {},
            hyperparameters=spec.hyperparameters or {},
            lineage=lineage,
        )
    except (ApiException, LookupError, ValueError, ArtifactRefused) as e:
        reason = (
            "ModelNotFound"
            if isinstance(e, LookupError)
            else (e.problem.reason if isinstance(e, ArtifactRefused) else "RegistrationFailed")
        )
        detail = e.problem.message if isinstance(e, ArtifactRefused) else (getattr(e, "reason", None) or e)
        msg = f"could not register in Model {spec.model_ref.name}: {detail}"
        log.warning("%s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], msg)
        status["conditions"] = set_condition(
            status.get("conditions"), "Ready", FALSE, reason, msg, generation=gen, now=now
        )
        return
    status["registeredVersion"] = version
    status["conditions"] = set_condition(
        status.get("conditions"),
        "Ready",
        TRUE,
        "Registered",
        f"registered as version {version} of Model {spec.model_ref.name}",
        generation=gen,
        now=now,
    )
    events.record(
        api,
        job,
        events.NORMAL,
        "Registered",
        f"registered as version {version} of Model {spec.model_ref.name}",
    )


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    return lambda ns, name: reconcile(api, ns, name)
