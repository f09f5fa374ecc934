"""InferenceService ``spec.featureGroups`` against the real API server (kwok nodes): the FeatureGroup
watch, ``KILN_FEATURE_GROUPS`` on the Deployment, and a version trained on another schema of the
FeatureGroup refused with ``FeatureSchemaMismatch`` while the stable Deployment stays as it was.
"""

from __future__ import annotations

import json
from typing import Any

from kiln import API_VERSION, kube
from kiln.conditions import get_condition
from kiln.features.schema import FeatureView

from .helpers import wait_for, wait_for_events
from .test_inferenceservice import (  # noqa: F401  (api, store: fixtures)
    MODEL,
    api,
    create_isvc,
    create_model,
    deployment,
    env_of,
    set_production,
    status,
    store,
    wait_status,
)

FG = "activity"


def feature_group(ns: str, *features: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "FeatureGroup",
        "metadata": {"name": FG, "namespace": ns},
        "spec": {
            "entities": [{"name": "customer_id", "dtype": "int64"}],
            "features": [{"name": f, "dtype": "float32"} for f in features],
            "source": {"uri": "file:///data/activity.parquet"},
            "online": {"enabled": True, "store": {"address": "redis.example:6379"}, "maxAgeSeconds": 600},
        },
    }


def digest_of(obj: dict[str, Any]) -> str:
    return FeatureView.from_object(obj).digest


def trained_on(entry: dict[str, Any], digest: str) -> dict[str, Any]:
    """A Model version entry whose lineage names FeatureGroup ``activity`` with ``digest``."""
    lineage = {"source": "TrainingJob", "featureGroup": FG, "featureGroupSchemaDigest": digest}
    return {**entry, "lineage": lineage}


def ready(reason: str | None = None, status_: str | None = None) -> Any:
    def pred(st: dict[str, Any]) -> bool:
        c = get_condition(st.get("conditions"), "Ready") or {}
        return (reason is None or c.get("reason") == reason) and (
            status_ is None or c.get("status") == status_
        )

    return pred


def served_digests(dep: dict[str, Any]) -> list[str]:
    return [g["schemaDigest"] for g in json.loads(env_of(dep)["KILN_FEATURE_GROUPS"])]


def test_feature_groups_and_schema_mismatch(api, store, namespace, operator):  # noqa: F811
    ns = namespace
    fg = feature_group(ns, "orders", "spend", "visits", "returns")  # the 4 inputs of the store's models
    digest = digest_of(fg)
    v1 = trained_on(store.version(1), digest)
    create_model(api, ns, [v1], production=1)
    create_isvc(api, ns, featureGroups=[{"name": FG}])
    st = wait_status(api, ns, ready("FeatureGroupNotFound"), message="Ready=False FeatureGroupNotFound")
    assert (
        f"FeatureGroup {FG} (spec.featureGroups) not found"
        in get_condition(st["conditions"], "Ready")["message"]
    )
    assert deployment(api, ns, "stable") is None

    # creating the FeatureGroup wakes the InferenceService (the FeatureGroup watch)
    assert kube.create(api, fg) is not None
    wait_status(api, ns, ready("Serving", "True"), message="Ready=True once the FeatureGroup exists")
    stable = deployment(api, ns, "stable")
    assert stable is not None and served_digests(stable) == [digest]
    groups = json.loads(env_of(stable)["KILN_FEATURE_GROUPS"])
    assert groups[0]["name"] == FG and groups[0]["namespace"] == ns
    assert [f["name"] for f in groups[0]["spec"]["features"]] == ["orders", "spend", "visits", "returns"]

    # version 2 was trained on other definitions of the FeatureGroup: refused, nothing rolls out
    other = digest_of(feature_group(ns, "orders", "spend", "visits", "refunds"))
    v2 = trained_on(store.version(2), other)
    set_production(api, ns, [v1, v2], production=2)
    st = wait_status(
        api, ns, ready("FeatureSchemaMismatch", "False"), message="Ready=False FeatureSchemaMismatch"
    )
    message = get_condition(st["conditions"], "Ready")["message"]
    assert (
        f"version 2 of Model '{MODEL}' was trained on FeatureGroup {FG} with schema digest {other}" in message
    )
    assert f"FeatureGroup {FG} now has schema digest {digest}" in message
    wait_for_events(api, ns, "InferenceService", {"FeatureSchemaMismatch"})
    after = deployment(api, ns, "stable")
    assert after is not None and after["metadata"]["generation"] == stable["metadata"]["generation"]
    assert after["spec"]["template"] == stable["spec"]["template"]  # still version 1, same features
    assert deployment(api, ns, "canary") is None
    assert st["stableVersion"] == 1 and "canaryVersion" not in st

    # the FeatureGroup changes to what version 2 was trained on: version 2 rolls out as the canary
    # with the new definitions, the stable (trained on the old ones) keeps its own
    fg_now = kube.get(api, API_VERSION, "FeatureGroup", ns, FG)
    assert fg_now is not None
    kube.patch(
        api,
        API_VERSION,
        "FeatureGroup",
        ns,
        FG,
        {"spec": {"features": feature_group(ns, "orders", "spend", "visits", "refunds")["spec"]["features"]}},
    )
    st = wait_status(api, ns, lambda s: s.get("canaryVersion") == 2, message="version 2 as the canary")
    canary = wait_for(lambda: deployment(api, ns, "canary"), 30, message="canary Deployment")
    assert served_digests(canary) == [other]
    stable_now = deployment(api, ns, "stable")
    assert stable_now is not None and served_digests(stable_now) == [digest]
    assert env_of(stable_now)["KILN_MODEL_VERSION"] == "1"
    assert status(api, ns)["stableVersion"] == 1
