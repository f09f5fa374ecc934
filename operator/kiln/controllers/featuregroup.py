"""FeatureGroup controller: validates the definition and reports it in status.

Materialization (the CronJob), point-in-time joins and online lookup arrive with the
FeatureGroup issue; until then a valid FeatureGroup reports ``Ready=False`` with reason
``MaterializationNotImplemented`` so nobody mistakes it for a working feature pipeline.
"""

from __future__ import annotations

import hashlib
import json

from kubernetes import client as k8s
from pydantic import ValidationError

from kiln import API_VERSION, kube
from kiln.api import FeatureGroupSpec, FeatureGroupStatus
from kiln.api.common import spec_error
from kiln.conditions import FALSE, set_condition, set_stalled
from kiln.controllers.runtime import ReconcileFn, Result, watch
from kiln.status import write_status

KIND = "FeatureGroup"
watch(KIND, API_VERSION, "featuregroups")


def reconcile(api: k8s.ApiClient, namespace: str, name: str) -> Result | None:
    """Validate the spec and write ``schemaDigest``, ``observedGeneration`` and ``Ready``.

    An invalid spec is terminal until the spec changes: ``Ready=False`` and ``Stalled=True``
    (reason ``InvalidSpec``), and no ``schemaDigest`` (it describes a valid spec only).
    """
    obj = kube.get(api, API_VERSION, KIND, namespace, name)
    if obj is None:
        return None
    gen = obj["metadata"].get("generation")
    old = obj.get("status") or {}
    digest: str | None = None
    try:
        spec = FeatureGroupSpec.model_validate(obj.get("spec") or {})
    except ValidationError as e:
        reason, message = "InvalidSpec", spec_error(e)
    else:
        canonical = json.dumps(spec.to_api()["features"], sort_keys=True).encode()
        digest = "sha256:" + hashlib.sha256(canonical).hexdigest()
        reason, message = (
            "MaterializationNotImplemented",
            "feature definitions are valid; materialization is not implemented yet",
        )
    conds = set_condition(old.get("conditions"), "Ready", FALSE, reason, message, generation=gen)
    conds = set_stalled(conds, digest is None, reason, message, generation=gen)
    new = {**old, "conditions": conds, "observedGeneration": gen, "schemaDigest": digest}
    write_status(api, obj, FeatureGroupStatus.model_validate(new))
    return None


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    return lambda ns, name: reconcile(api, ns, name)
