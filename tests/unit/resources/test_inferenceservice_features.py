"""An InferenceService's FeatureGroups: resolution, the schema check of the served version, each
track's ``KILN_FEATURE_GROUPS`` and the server environment (pure; no API server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kiln.api.inferenceservice import InferenceServiceSpec
from kiln.controllers.inferenceservice import (
    ReferenceIndex,
    Unresolved,
    _features_env,
    check_feature_schema,
    resolve_feature_groups,
)
from kiln.features.schema import FeatureView
from kiln.resources import inferenceservice as build
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden"
DIGEST = "sha256:" + "ab" * 32
ISVC: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "churn", "namespace": "ml", "uid": "0c8e6a1e-1111-2222-3333-444455556666"},
}


def fg(name: str, *features: str, online: bool = True, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "FeatureGroup",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {
            "entities": [{"name": "customer_id", "dtype": "int64"}],
            "features": [{"name": f, "dtype": "float32", "description": f"the {f}"} for f in features],
            "source": {"uri": f"s3://features/{name}.parquet", "timestampField": "ts"},
            "online": {"enabled": online, "store": {"address": "redis.feast:6379"}, "maxAgeSeconds": 600}
            if online
            else {},
            **spec,
        },
    }


ACTIVITY = fg("activity", "orders", "spend", schedule="@hourly", offline={"lookbackSeconds": 3600})
PROFILE = fg("profile", "age")


def isvc_spec(*names: str) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(
        {
            "modelRef": {"name": "churn", "stage": "Production"},
            "runtime": {"image": "kiln/server:dev"},
            "featureGroups": [{"name": n} for n in names],
        }
    )


def views(*objs: dict[str, Any]) -> list[FeatureView]:
    return [FeatureView.from_object(o) for o in objs]


def test_feature_groups_resolve_in_spec_order():
    got = resolve_feature_groups(
        isvc_spec("profile", "activity"), "ml", {"activity": ACTIVITY, "profile": PROFILE}
    )
    assert [(v.namespace, v.name, v.feature_names) for v in got] == [
        ("ml", "profile", ["age"]),
        ("ml", "activity", ["orders", "spend"]),
    ]
    assert resolve_feature_groups(isvc_spec(), "ml", {}) == []


@pytest.mark.parametrize(
    ("found", "reason", "message"),
    [
        ({"activity": None}, "FeatureGroupNotFound", "FeatureGroup activity (spec.featureGroups) not found"),
        ({"activity": {**ACTIVITY, "spec": {**ACTIVITY["spec"], "features": []}}}, "FeatureGroupInvalid",
         "FeatureGroup activity is invalid: spec.features"),
        ({"activity": fg("activity", "orders", online=False)}, "FeatureGroupNotOnline",
         "FeatureGroup activity has no online store"),
    ],
)  # fmt: skip
def test_unusable_feature_groups_are_named(found: dict[str, Any], reason: str, message: str):
    with pytest.raises(Unresolved) as e:
        resolve_feature_groups(isvc_spec("activity"), "ml", found)
    assert e.value.reason == reason and message in e.value.message, e.value.message


def lineage(digest: str | None, group: str | None = "activity") -> dict[str, Any]:
    return {
        "version": 4,
        "lineage": {"source": "TrainingJob", "featureGroup": group, "featureGroupSchemaDigest": digest},
    }


def test_a_version_trained_on_the_served_schema_passes():
    served = views(PROFILE, ACTIVITY)
    check_feature_schema(lineage(served[1].digest), served, "churn")
    check_feature_schema(lineage(served[0].digest, None), served, "churn")  # unnamed: any served digest
    check_feature_schema({"version": 4, "lineage": {"source": "Import"}}, served, "churn")  # no FeatureGroup
    check_feature_schema(lineage("sha256:" + "0" * 64), [], "churn")  # served without FeatureGroups


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (lineage("sha256:" + "0" * 64),
         "version 4 of Model 'churn' was trained on FeatureGroup activity with schema digest sha256:0000"),
        (lineage("sha256:" + "0" * 64), "FeatureGroup activity now has schema digest sha256:"),
        (lineage("sha256:" + "0" * 64, "clicks"), "which spec.featureGroups does not name (profile, activity)"),
        (lineage("sha256:" + "0" * 64, None), "the FeatureGroups served have profile: sha256:"),
    ],
)  # fmt: skip
def test_a_version_trained_on_another_schema_is_refused(version: dict[str, Any], message: str):
    with pytest.raises(Unresolved) as e:
        check_feature_schema(version, views(PROFILE, ACTIVITY), "churn")
    assert e.value.reason == "FeatureSchemaMismatch" and message in e.value.message, e.value.message


def test_changing_the_features_changes_the_digest_the_version_is_checked_against():
    before = views(ACTIVITY)
    changed = fg("activity", "orders", "spend", "visits")
    with pytest.raises(Unresolved, match="now has schema digest"):
        check_feature_schema(lineage(before[0].digest), views(changed), "churn")
    # a change outside the features (store, maxAge, schedule) keeps the digest
    moved = {**ACTIVITY, "spec": {**ACTIVITY["spec"], "schedule": "@daily"}}
    check_feature_schema(lineage(before[0].digest), views(moved), "churn")


def test_feature_groups_env_keeps_what_the_server_reads():
    env = json.loads(build.feature_groups_env(views(PROFILE, ACTIVITY)))
    assert [g["name"] for g in env] == ["profile", "activity"]
    activity = env[1]
    assert activity["namespace"] == "ml" and activity["schemaDigest"] == views(ACTIVITY)[0].digest
    assert set(activity["spec"]) == {"entities", "features", "online", "source"}  # no offline, schedule
    assert activity["spec"]["source"] == {
        "uri": "s3://features/activity.parquet",
        "format": "parquet",
        "timestampField": "ts",
    }
    server = pytest.importorskip("kiln.server.features")  # the server parses it back, digest checked
    parsed = server.parse_feature_groups(build.feature_groups_env(views(PROFILE, ACTIVITY)))
    assert [g.view.digest for g in parsed] == [v.digest for v in views(PROFILE, ACTIVITY)]
    assert [g.password_env for g in parsed] == [None, None]


def test_features_env_per_track():
    """The current FeatureGroups for a version trained on them (or without that lineage); a
    version trained on older definitions keeps what its live Deployment has."""
    old = views(fg("activity", "orders"))
    new = views(ACTIVITY)
    model = {"status": {"versions": [lineage(old[0].digest) | {"version": 1}, lineage(new[0].digest) | {"version": 2},
                                     {"version": 3, "lineage": {"source": "Import"}}]}}  # fmt: skip
    live = {"spec": {"template": {"spec": {"containers": [{"name": "server", "env": [
        {"name": "KILN_FEATURE_GROUPS", "value": build.feature_groups_env(old)}]}]}}}}  # fmt: skip
    current = build.feature_groups_env(new)
    assert _features_env(model, 2, None, new, "churn") == current
    assert _features_env(model, 3, None, new, "churn") == current
    assert _features_env(model, 9, None, new, "churn") == current  # pruned: nothing to check against
    assert _features_env(model, 1, live, new, "churn") == build.feature_groups_env(old)
    assert _features_env(model, 1, None, new, "churn") is None
    assert _features_env(model, 2, None, [], "churn") is None
    assert _features_env(model, None, None, new, "churn") is None


def test_server_env_and_golden_deployment():
    env_value = build.feature_groups_env(views(ACTIVITY))
    spec = isvc_spec("activity")
    objs = build.children(
        ISVC,
        spec,
        stable=(1, "file:///var/lib/kiln/artifacts/churn/v1", DIGEST),
        stable_replicas=2,
        canary=(2, "file:///var/lib/kiln/artifacts/churn/v2", DIGEST),
        canary_replicas=1,
        stable_features=None,
        canary_features=env_value,
    )
    deps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    envs = {
        n: {e["name"]: e["value"] for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        for n, d in deps.items()
    }
    assert "KILN_FEATURE_GROUPS" not in envs["churn-stable"]
    assert envs["churn-canary"]["KILN_FEATURE_GROUPS"] == env_value
    assert_golden(GOLDEN, "inferenceservice-featuregroups", deps["churn-canary"])


def test_feature_group_index():
    idx = ReferenceIndex()
    idx.set("ml", "a", ["activity", "profile"])
    idx.set("ml", "b", ["activity"])
    idx.set("other", "c", ["activity"])
    assert idx.users("ml", "activity") == ["a", "b"] and idx.users("ml", "profile") == ["a"]
    idx.set("ml", "a", [])
    assert idx.users("ml", "activity") == ["b"] and idx.users("ml", "profile") == []


def test_duplicate_feature_groups_are_refused():
    with pytest.raises(ValueError, match="featureGroups must name each FeatureGroup once"):
        isvc_spec("activity", "activity")


def test_store_secret_becomes_the_server_password_only():
    """``online.store.secretRef``: the server container gets the Secret's KILN_REDIS_PASSWORD as
    the variable its FeatureGroup entry names; the storage-initializer does not."""
    secured = fg("profile", "age")
    secured["spec"]["online"]["store"]["secretRef"] = {"name": "redis-auth"}
    value = build.feature_groups_env(views(ACTIVITY, secured))
    entries = json.loads(value)
    assert "passwordEnv" not in entries[0] and entries[1]["passwordEnv"] == "KILN_REDIS_PASSWORD_1"
    assert build.feature_group_secret_env(value) == [
        {
            "name": "KILN_REDIS_PASSWORD_1",
            "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "KILN_REDIS_PASSWORD"}},
        }
    ]
    assert build.feature_group_secret_env(None) == []
    dep = build.deployment(ISVC, isvc_spec("activity", "profile"), "stable", 1, "s3://models/churn/1", DIGEST, 1,
                           feature_groups=value)  # fmt: skip
    pod = dep["spec"]["template"]["spec"]
    server_env = pod["containers"][0]["env"]
    assert server_env[-1]["name"] == "KILN_REDIS_PASSWORD_1"
    assert all("KILN_REDIS_PASSWORD" not in e["name"] for e in pod["initContainers"][0]["env"])
    server = pytest.importorskip("kiln.server.features")
    assert [g.password_env for g in server.parse_feature_groups(value)] == [None, "KILN_REDIS_PASSWORD_1"]
