"""FeatureGroup against a real kube-apiserver: status, and Stalled for a spec only the model refuses."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kiln import API_VERSION
from kiln import kube as kb
from kiln.conditions import get_condition

from .health import argocd_health, kstatus
from .helpers import wait_for

EXAMPLE = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "featuregroup.yaml").read_text())


def _reconciled(api: Any, ns: str, pred: Any) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = kb.get(api, API_VERSION, "FeatureGroup", ns, EXAMPLE["metadata"]["name"])
        st = (obj or {}).get("status") or {}
        return (
            obj
            if obj and st.get("observedGeneration") == obj["metadata"]["generation"] and pred(st)
            else None
        )

    return wait_for(check, 30, message="FeatureGroup reconciled")


def test_invalid_spec_is_stalled_until_fixed(kube, namespace, operator):
    body = copy.deepcopy(EXAMPLE)
    body["metadata"]["namespace"] = namespace
    assert kb.create(kube, body) is not None
    obj = _reconciled(kube, namespace, lambda st: st.get("schemaDigest"))
    ready = get_condition(obj["status"]["conditions"], "Ready")
    assert ready["reason"] == "MaterializationNotImplemented"
    assert get_condition(obj["status"]["conditions"], "Stalled") is None
    assert kstatus(obj)["status"] == "InProgress" and argocd_health(obj)["status"] == "Progressing"

    # The CRD's pattern is checked by Go's regexp, where \s is ASCII whitespace only; pydantic's is
    # Unicode-aware, so a no-break space passes admission and is refused by the model.
    name = body["metadata"]["name"]
    kb.patch(kube, API_VERSION, "FeatureGroup", namespace, name, {"spec": {"schedule": "0 * * * *\u00a0x"}})
    obj = _reconciled(kube, namespace, lambda st: not st.get("schemaDigest"))
    stalled = get_condition(obj["status"]["conditions"], "Stalled")
    assert (
        stalled["status"] == "True"
        and stalled["reason"] == "InvalidSpec"
        and "schedule" in stalled["message"]
    )
    assert kstatus(obj)["status"] == "Failed" and argocd_health(obj)["status"] == "Degraded"

    kb.patch(kube, API_VERSION, "FeatureGroup", namespace, name, {"spec": {"schedule": "@hourly"}})
    obj = _reconciled(kube, namespace, lambda st: st.get("schemaDigest"))
    assert get_condition(obj["status"]["conditions"], "Stalled") is None
