"""Pure builders of a FeatureGroup's children (kiln.resources.featuregroup)."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from kiln.api.featuregroup import FeatureGroupSpec, RunTrigger
from kiln.features.schema import schema_digest
from kiln.resources import featuregroup as build
from kiln.resources.storage import StorageDefaults
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden"
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
FG: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "FeatureGroup",
    "metadata": {
        "name": "customer-activity",
        "namespace": "ml",
        "uid": "0c8e6a1e-1111-2222-3333-444455556666",
        "generation": 3,
    },
    "spec": {
        "entities": [{"name": "customer_id", "dtype": "int64"}],
        "features": [
            {"name": "orders_7d", "dtype": "int64"},
            {
                "name": "spend_7d_log",
                "dtype": "float32",
                "transformation": {"type": "Log1p", "column": "spend_7d"},
            },
        ],
        "source": {
            "uri": "s3://features/customer_activity/",
            "format": "parquet",
            "storage": {"secretRef": {"name": "features-s3"}, "endpoint": "http://versitygw.storage:7070"},
        },
        "online": {"enabled": True, "store": {"address": "redis.features:6379"}, "maxAgeSeconds": 86400},
        "schedule": "@hourly",
        "materialization": {
            "image": "kiln-trainer:dev",
            "parallelism": 2,
            "windowSeconds": 86400,
            "backoffLimit": 2,
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "3Gi"}},
        },
    },
}
DEFAULTS = build.MaterializationDefaults(storage=StorageDefaults(region="us-east-1"))


def spec(fg: dict[str, Any] = FG) -> FeatureGroupSpec:
    return FeatureGroupSpec.model_validate(fg["spec"])


def backfill(fg: dict[str, Any] = FG, days: float = 5) -> dict[str, Any]:
    return build.run_job(
        fg,
        spec(fg),
        name=build.run_name(fg["metadata"]["name"], T0),
        trigger=RunTrigger.BACKFILL,
        start=T0 - dt.timedelta(days=days),
        end=T0,
        defaults=DEFAULTS,
    )


def test_backfill_is_an_indexed_job_golden():
    job = backfill()
    assert_golden(GOLDEN, "featuregroup-backfill-job", job)
    s = job["spec"]
    assert (s["completionMode"], s["completions"], s["parallelism"], s["backoffLimit"]) == (
        "Indexed",
        5,
        2,
        2,
    )
    rules = s["podFailurePolicy"]["rules"]
    assert [(r["action"], r.get("onExitCodes", {}).get("values")) for r in rules] == [
        ("FailJob", [1, 2]),
        ("Count", [3]),
        ("Ignore", None),
    ]
    assert job["metadata"]["ownerReferences"][0]["uid"] == FG["metadata"]["uid"]
    assert job["metadata"]["annotations"][build.ANNOTATION_DIGEST] == schema_digest(spec())
    c = s["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "kiln.features", "materialize"]
    assert c["args"][:6] == [
        "--start",
        "2026-02-24T00:00:00Z",
        "--end",
        "2026-03-01T00:00:00Z",
        "--windows",
        "5",
    ]
    assert c["args"][6:] == ["--memory-limit", "1536MiB"]  # half of the 3Gi limit
    env = {e["name"]: e["value"] for e in c["env"]}
    fg = json.loads(env["KILN_FEATURE_GROUP"])
    assert fg["metadata"] == {"name": "customer-activity", "namespace": "ml"}
    assert FeatureGroupSpec.model_validate(fg["spec"]) == spec()  # the entry point reads the same spec
    assert env["AWS_ENDPOINT_URL"] == "http://versitygw.storage:7070" and env["AWS_REGION"] == "us-east-1"
    assert c["envFrom"] == [{"secretRef": {"name": "features-s3"}}]
    assert s["template"]["metadata"]["labels"][build.LABEL_FEATURE_GROUP] == "customer-activity"


def test_cronjob_golden_starts_at_the_watermark():
    cj = build.cronjob(FG, spec(), start=T0, defaults=DEFAULTS)
    assert_golden(GOLDEN, "featuregroup-cronjob", cj)
    assert cj["metadata"]["name"] == "customer-activity"
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    job = cj["spec"]["jobTemplate"]
    assert job["spec"]["completions"] == 1 and job["spec"]["completionMode"] == "Indexed"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--start", "2026-03-01T00:00:00Z", "--end", "now"]
    # the CronJob copies these onto its Jobs: the operator reads trigger and digest from them
    assert job["metadata"]["labels"][build.LABEL_TRIGGER] == "Schedule"
    assert job["metadata"]["annotations"][build.ANNOTATION_DIGEST] == schema_digest(spec())


def test_redis_password_secret_reaches_materialization_pods_only():
    fg = copy.deepcopy(FG)
    fg["spec"]["online"]["store"]["secretRef"] = {"name": "redis-auth"}
    c = backfill(fg)["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "redis-auth"}} in c["envFrom"]
    check = build.run_job(
        fg, spec(fg), name="x", trigger=RunTrigger.VALIDATION, start=None, end=None, defaults=DEFAULTS
    )
    assert {"secretRef": {"name": "redis-auth"}} not in check["spec"]["template"]["spec"]["containers"][0][
        "envFrom"
    ]


def test_file_source_volume_is_mounted_read_only_at_its_parent():
    fg = copy.deepcopy(FG)
    fg["spec"]["source"] = {
        "uri": "file:///data/events/activity.parquet",
        "volume": {"persistentVolumeClaim": {"claimName": "events"}},
    }
    pod = backfill(fg)["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert {"name": "source", "mountPath": "/data/events", "readOnly": True} in c["volumeMounts"]
    assert {"name": "source", "persistentVolumeClaim": {"claimName": "events"}} in pod["volumes"]
    assert "envFrom" not in c and not [e for e in c["env"] if e["name"].startswith("AWS_")]


def test_validation_run_checks_the_source_only():
    job = build.run_job(
        FG, spec(), name="x", trigger=RunTrigger.VALIDATION, start=None, end=None, defaults=DEFAULTS
    )
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][-1] == "validate" and c["args"] == [] and job["spec"]["completions"] == 1


def test_windows_names_and_limits():
    assert build.window_count(T0, T0 + dt.timedelta(hours=1), 86400) == 1
    assert build.window_count(T0, T0 + dt.timedelta(days=3, seconds=1), 86400) == 4
    assert build.window_count(T0, T0 + dt.timedelta(days=5000), 86400) == 1000
    assert build.window_count(T0, T0 - dt.timedelta(days=1), 86400) == 1
    name = build.run_name("a" * 52, dt.datetime(2038, 1, 1, tzinfo=dt.UTC))
    assert len(name) <= 59 and len(f"{name}-999") <= 63  # Indexed pods' hostname is <job>-<index>
    assert build.run_name("g", T0) != build.run_name("g", T0 + dt.timedelta(seconds=1))
    assert build.quantity_bytes("2Gi") == 2**31 and build.quantity_bytes("500M") == 5 * 10**8
    assert build.duckdb_memory_limit({"limits": {"memory": "100Mi"}}) == "64MiB"
    assert build.duckdb_memory_limit({}) == "1GB"


def test_image_from_the_operator_and_none_at_all():
    fg = copy.deepcopy(FG)
    del fg["spec"]["materialization"]["image"]
    env = {"KILN_FEATURES_IMAGE": "ghcr.io/kiln-dev/kiln-trainer:0.1.0"}
    job = build.run_job(
        fg,
        spec(fg),
        name="x",
        trigger=RunTrigger.BACKFILL,
        start=T0,
        end=T0 + dt.timedelta(hours=1),
        defaults=build.MaterializationDefaults.from_environ(env),
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == env["KILN_FEATURES_IMAGE"]
    with pytest.raises(ValueError, match="image"):
        build.run_job(
            fg, spec(fg), name="x", trigger=RunTrigger.BACKFILL, start=T0, end=T0, defaults=DEFAULTS
        )


def test_a_spec_too_large_for_the_environment_is_refused():
    fg = copy.deepcopy(FG)
    fg["spec"]["features"] = [
        {"name": f"f{i}", "dtype": "float64", "description": "x" * 1024} for i in range(120)
    ]
    with pytest.raises(build.SpecTooLarge, match="bytes"):
        build.feature_group_json(fg, spec(fg))
