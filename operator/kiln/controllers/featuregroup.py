"""FeatureGroup controller: read -> :func:`kiln.featurestore.plan` -> apply -> status.

Watches FeatureGroups and their materialization Jobs (labelled ``kiln.dev/featuregroup``, the
operator's and the schedule CronJob's alike); every event enqueues one level-based reconcile of
the group (see :mod:`kiln.controllers.runtime`). The Job design is in
:mod:`kiln.resources.featuregroup`, the decisions in :mod:`kiln.featurestore`. The operator never
imports the feature store's engines (duckdb, pyarrow, redis): the Jobs run them.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from kubernetes import client as k8s
from pydantic import ValidationError

from kiln import API_VERSION, events, kube
from kiln.api import FeatureGroupSpec, FeatureGroupStatus
from kiln.api.common import spec_error
from kiln.conditions import FALSE, set_condition, set_stalled
from kiln.controllers.runtime import ReconcileFn, Result, watch, watch_children
from kiln.featurestore import plan
from kiln.resources import featuregroup as build
from kiln.status import write_status

KIND = "FeatureGroup"
watch(KIND, API_VERSION, "featuregroups")
watch_children(KIND, "batch/v1", "jobs", build.LABEL_FEATURE_GROUP)


def reconcile(api: k8s.ApiClient, namespace: str, name: str, now: datetime | None = None) -> Result | None:
    """Reconcile one FeatureGroup: start runs, keep the CronJob, record results in status.

    An invalid spec is terminal until the spec changes: ``Ready=False`` and ``Stalled=True``
    (reason ``InvalidSpec``), no ``schemaDigest``, and no run started.
    """
    obj = kube.get(api, API_VERSION, KIND, namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return None
    now = now or datetime.now(UTC)
    try:
        spec = FeatureGroupSpec.model_validate(obj.get("spec") or {})
    except ValidationError as e:
        _invalid(api, obj, spec_error(e), now)
        return None
    selector = f"{build.LABEL_FEATURE_GROUP}={name}"
    jobs = kube.list_objects(api, "batch/v1", "Job", namespace, selector)
    finished = any(
        c.get("type") in ("Complete", "Failed")
        for j in jobs
        for c in (j.get("status") or {}).get("conditions") or []
    )
    # Results are in the pods' termination messages; only finished Jobs need them.
    pods = kube.list_objects(api, "v1", "Pod", namespace, selector) if finished else []
    cronjobs = kube.list_objects(api, "batch/v1", "CronJob", namespace, selector)
    defaults = build.MaterializationDefaults.from_environ(os.environ)
    p = plan(obj, spec, jobs, pods, cronjobs, now, defaults)

    for api_version, kind, child, uid in p.delete:
        kube.delete(api, api_version, kind, namespace, child, uid=uid or None)
    for manifest in p.create:
        kube.create(api, manifest)
    for manifest in p.apply:
        kube.apply(api, manifest)
    # A 409 here (the group changed under us) propagates: the work queue decides again at once;
    # a Job created above is then seen as the active run, and its request annotation as handled.
    obj = write_status(api, obj, FeatureGroupStatus.model_validate(p.status))
    for type_, reason, message in p.events:
        events.record(api, obj, type_, reason, message)
    return Result(requeue_after=p.requeue_after) if p.requeue_after is not None else None


def _invalid(api: k8s.ApiClient, obj: dict, message: str, now: datetime) -> None:
    """Write ``Ready=False``/``Stalled=True`` with reason ``InvalidSpec`` (and no ``schemaDigest``)."""
    gen = obj["metadata"].get("generation")
    old = obj.get("status") or {}
    conds = set_condition(
        old.get("conditions"), "Ready", FALSE, "InvalidSpec", message, generation=gen, now=now
    )
    conds = set_stalled(conds, True, "InvalidSpec", message, generation=gen, now=now)
    new = {**old, "conditions": conds, "observedGeneration": gen}
    new.pop("schemaDigest", None)
    write_status(api, obj, FeatureGroupStatus.model_validate(new))


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    return lambda ns, name: reconcile(api, ns, name)
