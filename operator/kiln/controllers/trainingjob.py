"""TrainingJob controller: read -> :func:`kiln.gang.plan` -> apply -> status.

Watches TrainingJobs and their pods (labelled ``kiln.dev/trainingjob``); every event enqueues
one level-based reconcile of the job (see :mod:`kiln.controllers.runtime`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kiln import API_VERSION, events, failpoints, kube, storage
from kiln.api.common import spec_error
from kiln.api.trainingjob import TrainingJobSpec, TrainingJobStatus
from kiln.artifact import ArtifactError
from kiln.conditions import FALSE, TRUE, get_condition, set_condition, set_stalled
from kiln.controllers.runtime import ReconcileFn, Result, watch, watch_children
from kiln.gang import plan
from kiln.resources import trainingjob as build
from kiln.resources.retraining import ANNOTATION_TRIGGER as ANNOTATION_RETRAINING_TRIGGER
from kiln.resources.storage import StorageDefaults
from kiln.status import write_status

log = logging.getLogger("kiln.trainingjob")
KIND = "TrainingJob"
watch(KIND, API_VERSION, "trainingjobs")
watch_children(KIND, "v1", "pods", build.LABEL_JOB)

#: First retry interval when the Model to register in is missing or the registration failed; it
#: doubles (the time since Ready went False) up to :data:`REGISTRATION_RETRY_MAX_SECONDS`.
REGISTRATION_RETRY_SECONDS = 15.0
REGISTRATION_RETRY_MAX_SECONDS = 300.0
_creators = ThreadPoolExecutor(max_workers=32, thread_name_prefix="kiln-gang-create")


def reconcile(api: k8s.ApiClient, namespace: str, name: str, now: datetime | None = None) -> Result | None:
    """Reconcile one TrainingJob. Returns when to look again (back-off, deadline, TTL)."""
    job = kube.get(api, API_VERSION, KIND, namespace, name)
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
    fg_ref = spec.dataset.feature_group_ref
    feature_group = kube.get(api, API_VERSION, "FeatureGroup", namespace, fg_ref.name) if fg_ref else None
    p = plan(job, spec, pods, now, blocked=build.feature_group_blocker(spec, feature_group))

    for pod_name, uid in p.delete_pods:
        kube.delete(api, "v1", "Pod", namespace, pod_name, uid=uid)
    if p.create_gang:
        # The gang's pods and its headless Service are created concurrently: the gang is only as
        # fast as its slowest pod, and torchrun's rendezvous retries until node 0's name resolves.
        writes: list[tuple[Callable[..., Any], dict[str, Any]]] = [(kube.apply, build.service(job))]
        defaults = StorageDefaults.from_environ(os.environ)
        # Only the missing pods: creating one that exists is not always a harmless 409 (under a
        # full ResourceQuota the API server answers 403 before it looks for the name).
        existing = {x["metadata"]["name"] for x in pods}
        writes += [
            (_create_pod, m)
            for m in build.pods(job, spec, int(p.status["gang"]), defaults, feature_group)
            if m["metadata"]["name"] not in existing
        ]
        futures = [_creators.submit(write, api, manifest) for write, manifest in writes]
        for f in futures:
            f.result()
    if p.register is not None:
        _register(api, job, spec, p.status, now)
        if p.status.get("registeredVersion") is None:
            p.requeue(registration_retry_delay(p.status, now))
        else:
            failpoints.hit("trainingjob-registered")
    # A 409 here (the job changed under us) propagates: the work queue decides again at once.
    job = write_status(api, job, TrainingJobStatus.model_validate(p.status))
    for type_, reason, message in p.events:
        events.record(api, job, type_, reason, message)
    if p.delete_job:
        kube.delete(api, API_VERSION, KIND, namespace, name, uid=job["metadata"]["uid"])
        return None
    return Result(requeue_after=p.requeue_after) if p.requeue_after is not None else None


def _create_pod(api: k8s.ApiClient, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Create one gang pod (None when it already exists; see :func:`kiln.kube.create`)."""
    created = kube.create(api, manifest)
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
