"""kiln.featurestore.plan with a fixed clock: runs, results, the watermark, Ready, the CronJob."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from kiln.api.featuregroup import FeatureGroupSpec, FeatureGroupStatus
from kiln.conditions import get_condition, rfc3339
from kiln.features.schema import schema_digest
from kiln.featurestore import RETRY_SECONDS, Plan, plan
from kiln.resources import featuregroup as build

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
DEFAULTS = build.MaterializationDefaults(image="kiln-trainer:dev")
SPEC: dict[str, Any] = {
    "entities": [{"name": "customer_id", "dtype": "int64"}],
    "features": [{"name": "orders_7d", "dtype": "int64"}],
    "source": {"uri": "file:///data/activity.parquet"},
    "online": {"enabled": True, "store": {"address": "redis:6379"}, "maxAgeSeconds": 86400},
    "schedule": "@hourly",
    "materialization": {"windowSeconds": 21600},
}


def group(
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    generation: int = 1,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "FeatureGroup",
        "metadata": {
            "name": "activity",
            "namespace": "ml",
            "uid": "uid-fg",
            "generation": generation,
            "annotations": annotations or {},
        },
        "spec": copy.deepcopy(spec or SPEC),
        "status": copy.deepcopy(status or {}),
    }


def run(
    fg: dict[str, Any],
    jobs: list[dict[str, Any]] = (),  # type: ignore[assignment]
    pods: list[dict[str, Any]] = (),  # type: ignore[assignment]
    cronjobs: list[dict[str, Any]] = (),  # type: ignore[assignment]
    now: datetime = NOW,
    defaults: build.MaterializationDefaults = DEFAULTS,
) -> Plan:
    spec = FeatureGroupSpec.model_validate(fg["spec"])
    p = plan(fg, spec, list(jobs), list(pods), list(cronjobs), now, defaults)
    FeatureGroupStatus.model_validate(p.status)  # what the controller writes
    return p


def then(fg: dict[str, Any], p: Plan) -> dict[str, Any]:
    """The group after the plan's status write."""
    out = copy.deepcopy(fg)
    out["status"] = copy.deepcopy(p.status)
    return out


def stored(manifest: dict[str, Any], created: datetime = NOW, **status: Any) -> dict[str, Any]:
    """A Job (or CronJob) as the API server returns it."""
    obj = copy.deepcopy(manifest)
    obj["metadata"] |= {"uid": "uid-" + obj["metadata"]["name"], "creationTimestamp": rfc3339(created)}
    obj["status"] = status
    return obj


def complete(job: dict[str, Any], at: datetime, failed: int = 0) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["status"] = {
        "startTime": job["metadata"]["creationTimestamp"],
        "completionTime": rfc3339(at),
        "succeeded": job["spec"]["completions"],
        "failed": failed,
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    return job


def failed(job: dict[str, Any], reason: str, pods: int, at: datetime = NOW) -> dict[str, Any]:
    """A Failed Job: no completionTime (the API sets it for successful Jobs only)."""
    job = copy.deepcopy(job)
    cond = {
        "type": "Failed",
        "status": "True",
        "reason": reason,
        "message": "...",
        "lastTransitionTime": rfc3339(at),
    }
    job["status"] = {"startTime": job["metadata"]["creationTimestamp"], "failed": pods, "conditions": [cond]}
    return job


def pod(
    job: dict[str, Any], index: int, phase: str, exit_code: int, message: str, n: int = 0
) -> dict[str, Any]:
    name = job["metadata"]["name"]
    return {
        "metadata": {
            "name": f"{name}-{index}-{n}",
            "labels": {
                "batch.kubernetes.io/job-name": name,
                "batch.kubernetes.io/job-completion-index": str(index),
                build.LABEL_FEATURE_GROUP: "activity",
            },
        },
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "materialize",
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "message": message,
                            "finishedAt": f"2026-03-01T12:00:{n:02d}Z",
                        }
                    },
                }
            ],
        },
    }


def window_results(job: dict[str, Any], rows: int = 10) -> list[dict[str, Any]]:
    """Succeeded pods, one per window, with the entry point's result lines."""
    ann = job["metadata"]["annotations"]
    start, end = (
        datetime.fromisoformat(ann[k].replace("Z", "+00:00"))
        for k in (build.ANNOTATION_START, build.ANNOTATION_END)
    )
    n = job["spec"]["completions"]
    step = (end - start) / n
    out = []
    for i in range(n):
        a, b = start + step * i, start + step * (i + 1)
        result = {
            "start": rfc3339(a),
            "end": rfc3339(b),
            "watermark": rfc3339(b),
            "rowsWritten": rows,
            "durationSeconds": 1.5,
        }
        out.append(pod(job, i, "Succeeded", 0, json.dumps(result)))
    return out


def error(reason: str, column: str | None = None) -> str:
    return json.dumps(
        {"error": {"reason": reason, "message": f"source has no column {column!r}", "column": column}}
    )


def ready(p: Plan) -> dict[str, Any]:
    return get_condition(p.status["conditions"], "Ready") or {}


def stalled(p: Plan) -> bool:
    return get_condition(p.status["conditions"], "Stalled") is not None


def backfilled(rows: int = 10) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], Plan]:
    """A group whose first backfill succeeded: (group after, the Job, its pods, the plan)."""
    fg = group()
    p = run(fg)
    job = stored(p.create[0])
    done = complete(job, NOW + timedelta(minutes=5))
    pods = window_results(job, rows)
    later = NOW + timedelta(minutes=6)
    p2 = run(then(fg, p), [done], pods, now=later)
    return then(fg, p2), done, pods, p2


def test_first_run_is_a_backfill_of_max_age():
    p = run(group())
    (job,) = p.create
    ann = job["metadata"]["annotations"]
    assert (
        ann[build.ANNOTATION_START] == "2026-02-28T12:00:00Z"
        and ann[build.ANNOTATION_END] == "2026-03-01T12:00:00Z"
    )
    assert job["spec"]["completions"] == 4  # one day in 6-hour windows
    assert p.status["activeRun"]["trigger"] == "Backfill" and p.status["activeRun"]["windows"] == 4
    assert ready(p)["status"] == "False" and ready(p)["reason"] == "Materializing"
    assert not p.apply  # no CronJob before a watermark
    assert p.status["schemaDigest"] == schema_digest(FeatureGroupSpec.model_validate(SPEC))
    # while it runs, nothing else starts
    p2 = run(then(group(), p), [stored(job)])
    assert not p2.create and p2.status["activeRun"]["jobName"] == job["metadata"]["name"]


def test_start_time_sets_the_backfill_range():
    spec = copy.deepcopy(SPEC)
    spec["materialization"]["startTime"] = "2026-02-01T00:00:00Z"
    (job,) = run(group(spec)).create
    assert job["metadata"]["annotations"][build.ANNOTATION_START] == "2026-02-01T00:00:00Z"
    assert job["spec"]["completions"] == 114  # 28.5 days / 6 h


def test_success_sets_the_watermark_ready_and_the_cronjob():
    fg, _, _, p = backfilled(rows=7)
    st = p.status
    assert st["lastMaterializationTime"] == "2026-03-01T12:00:00Z"
    assert st["materializedRows"] == 28 and st["materializedDurationSeconds"] == 300.0
    assert st["lastRun"]["phase"] == "Succeeded" and st["lastRun"]["rowsWritten"] == 28
    assert "activeRun" not in st and not p.create
    assert ready(p)["status"] == "True" and ready(p)["reason"] == "Materialized" and not stalled(p)
    assert get_condition(st["conditions"], "Materialized")["status"] == "True"
    (cron,) = p.apply
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--start", "2026-03-01T12:00:00Z", "--end", "now"]
    assert ("Normal", "Materialized") in [(t, r) for t, r, _ in p.events]
    # the same CronJob is not applied again; the same result folds to the same status
    p3 = run(fg, [], [], [stored(cron)], now=NOW + timedelta(minutes=7))
    assert (
        not p3.apply
        and not p3.delete
        and p3.status["lastMaterializationTime"] == st["lastMaterializationTime"]
    )


def test_a_scheduled_run_advances_the_watermark_only_from_it():
    fg, _, _, p = backfilled()
    cron = stored(p.apply[0])
    template = cron["spec"]["jobTemplate"]

    def cron_job(name: str, start: str, end: str, phase: str = "Complete") -> tuple[dict, dict]:
        job = stored(
            {"apiVersion": "batch/v1", "kind": "Job", **copy.deepcopy(template)}
            | {"metadata": copy.deepcopy(template["metadata"]) | {"name": name, "namespace": "ml"}},
            NOW + timedelta(hours=1),
        )
        job = complete(job, NOW + timedelta(hours=1, minutes=1))
        result = {"start": start, "end": end, "watermark": end, "rowsWritten": 3, "durationSeconds": 0.5}
        return job, pod(job, 0, "Succeeded", 0, json.dumps(result))

    gap, gap_pod = cron_job("activity-29561000", "2026-03-01T12:30:00Z", "2026-03-01T13:00:00Z")
    p2 = run(fg, [gap], [gap_pod], [cron], now=NOW + timedelta(hours=2))
    assert p2.status["lastMaterializationTime"] == "2026-03-01T12:00:00Z"  # a gap never counts
    job, job_pod = cron_job("activity-29561040", "2026-03-01T12:00:00Z", "2026-03-01T13:00:00.123456Z")
    p3 = run(fg, [job], [job_pod], [cron], now=NOW + timedelta(hours=2))
    assert (
        p3.status["lastMaterializationTime"] == "2026-03-01T13:00:00Z" and p3.status["materializedRows"] == 3
    )
    assert p3.status["lastRun"]["trigger"] == "Schedule"
    (cron2,) = p3.apply  # the next scheduled run starts at the new watermark
    assert (
        cron2["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][1]
        == "2026-03-01T13:00:00Z"
    )


def test_complete_job_without_every_result_fails_and_keeps_the_watermark():
    fg = group()
    p = run(fg)
    job = complete(stored(p.create[0]), NOW + timedelta(minutes=5))
    pods = window_results(job)[:-1]
    p2 = run(then(fg, p), [job], pods, now=NOW + timedelta(minutes=6))
    assert "lastMaterializationTime" not in p2.status
    assert p2.status["lastRun"]["reason"] == "ResultMissing" and "[3]" in p2.status["lastRun"]["message"]
    assert ready(p2)["status"] == "False" and not stalled(p2)
    assert p2.requeue_after == RETRY_SECONDS - 60  # a backfill again, 5 minutes after it ended


def test_column_missing_is_not_ready_names_the_column_and_keeps_the_watermark():
    fg, _, _, _ = backfilled()
    req = group(status=fg["status"], annotations={build.ANNOTATION_REQUEST: "2026-03-01T13:00:00Z"})
    later = NOW + timedelta(hours=1)
    p2 = run(req, now=later)
    (job,) = p2.create
    assert job["metadata"]["annotations"][build.ANNOTATION_START] == "2026-03-01T12:00:00Z"  # incremental
    assert p2.status["lastHandledMaterializeAt"] == "2026-03-01T13:00:00Z"
    assert job["metadata"]["annotations"][build.ANNOTATION_ANSWERS] == "2026-03-01T13:00:00Z"
    job = failed(stored(job, later), "PodFailurePolicy", 1)
    pods = [pod(job, 0, "Failed", 1, error("ColumnMissing", "orders_7d"))]
    p3 = run(then(req, p2), [job], pods, now=later + timedelta(minutes=1))
    st = p3.status
    assert st["lastMaterializationTime"] == "2026-03-01T12:00:00Z"  # unchanged
    assert st["lastRun"]["phase"] == "Failed" and st["lastRun"]["column"] == "orders_7d"
    assert ready(p3)["reason"] == "ColumnMissing" and "orders_7d" in ready(p3)["message"]
    assert "still served" in ready(p3)["message"] and stalled(p3)
    assert ("Warning", "ColumnMissing") in [(t, r) for t, r, _ in p3.events]
    assert not p3.create  # no retry of a permanent failure
    assert p3.apply  # the CronJob stays (a fixed source is picked up on schedule)


def test_transient_failure_of_a_backfill_is_retried_later_and_never_advances():
    fg = group()
    p = run(fg)
    t = NOW + timedelta(minutes=2)
    job = failed(stored(p.create[0]), "BackoffLimitExceeded", 4, at=t)
    msg = json.dumps(
        {
            "error": {
                "reason": "OnlineStoreUnavailable",
                "message": "online store: ConnectionError",
                "column": None,
            }
        }
    )
    pods = [pod(job, 0, "Failed", 3, msg, n) for n in range(4)]
    p2 = run(then(fg, p), [job], pods, now=t)
    st = p2.status
    assert "lastMaterializationTime" not in st and not p2.create
    assert st["lastRun"]["reason"] == "OnlineStoreUnavailable" and st["lastRun"]["transient"] is True
    assert st["lastRun"]["failedPods"] == 4 and "BackoffLimitExceeded" in st["lastRun"]["message"]
    assert ready(p2)["status"] == "False" and not stalled(p2)
    assert p2.requeue_after == RETRY_SECONDS
    p3 = run(then(fg, p2), [job], pods, now=t + timedelta(seconds=RETRY_SECONDS))
    (retry,) = p3.create
    assert retry["metadata"]["labels"][build.LABEL_TRIGGER] == "Backfill"


def test_a_request_is_answered_once_even_when_the_status_write_was_lost():
    fg, _, _, _ = backfilled()
    req = group(status=fg["status"], annotations={build.ANNOTATION_REQUEST: "r1"})
    p = run(req, now=NOW + timedelta(hours=1))
    (job,) = p.create
    # the status write was lost: the Job is there, the status is not
    done = complete(stored(job, NOW + timedelta(hours=1)), NOW + timedelta(hours=1, minutes=1))
    p2 = run(req, [done], window_results(done), now=NOW + timedelta(hours=2))
    assert not p2.create and p2.status["lastHandledMaterializeAt"] == "r1"
    assert p2.status["lastMaterializationTime"] == rfc3339(NOW + timedelta(hours=1))
    # a request while a run is active waits for it
    busy = group(status=p2.status, annotations={build.ANNOTATION_REQUEST: "r2"})
    running = stored(job | {"metadata": job["metadata"] | {"name": "activity-other"}})
    assert not run(busy, [running], now=NOW + timedelta(hours=3)).create
    assert run(busy, now=NOW + timedelta(hours=3)).create


def test_new_definitions_start_over():
    fg, _, _, p = backfilled()
    spec = copy.deepcopy(SPEC)
    spec["features"].append({"name": "spend_7d", "dtype": "float64"})
    manifest = copy.deepcopy(run(group()).create[0])
    manifest["metadata"]["name"] = "activity-old"
    old_run = stored(manifest, NOW)
    changed = group(spec, status=fg["status"], generation=2)
    p2 = run(changed, [old_run], [], [stored(p.apply[0])], now=NOW + timedelta(hours=1))
    st = p2.status
    assert "lastMaterializationTime" not in st and "materializedSchemaDigest" not in st
    assert ("batch/v1", "Job", "activity-old", "uid-activity-old") in p2.delete  # stale definitions
    assert ("batch/v1", "CronJob", "activity", "uid-activity") in p2.delete
    (job,) = p2.create
    assert (
        job["metadata"]["annotations"][build.ANNOTATION_DIGEST]
        == st["schemaDigest"]
        != fg["status"]["schemaDigest"]
    )
    assert ready(p2)["reason"] == "Materializing"


def test_a_success_of_other_definitions_never_moves_the_watermark():
    fg, done, pods, _ = backfilled()
    spec = copy.deepcopy(SPEC)
    spec["features"][0]["description"] = "orders"
    p = run(group(spec, status=fg["status"], generation=2), [done], pods, now=NOW + timedelta(hours=1))
    assert "lastMaterializationTime" not in p.status and p.create


def test_without_online_store_the_source_is_validated_per_generation():
    spec = copy.deepcopy(SPEC)
    spec["online"] = {"enabled": False}
    fg = group(spec)
    p = run(fg)
    (job,) = p.create
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "validate"
    ok = complete(stored(job), NOW + timedelta(seconds=30))
    ok_pod = pod(ok, 0, "Succeeded", 0, json.dumps({"columns": {"customer_id": "BIGINT"}}))
    p2 = run(then(fg, p), [ok], [ok_pod], now=NOW + timedelta(minutes=1))
    assert ready(p2)["status"] == "True" and ready(p2)["reason"] == "SourceValidated"
    assert not p2.create and not p2.apply  # no CronJob without an online store
    bad = failed(stored(job), "PodFailurePolicy", 1)
    p3 = run(then(fg, p), [bad], [pod(bad, 0, "Failed", 1, error("ColumnMissing", "orders_7d"))])
    assert ready(p3)["reason"] == "ColumnMissing" and stalled(p3)


def test_no_image_is_stalled_and_starts_nothing():
    p = run(group(), defaults=build.MaterializationDefaults())
    assert not p.create and ready(p)["reason"] == "NoMaterializationImage" and stalled(p)


def test_unparseable_failure_reports_the_jobs_reason_and_output():
    fg = group()
    p = run(fg)
    job = failed(stored(p.create[0]), "DeadlineExceeded", 1)
    pods = [pod(job, 0, "Failed", 137, "Traceback (most recent call last): ...")]
    p2 = run(then(fg, p), [job], pods)
    assert p2.status["lastRun"]["reason"] == "DeadlineExceeded"
    assert "Traceback" in p2.status["lastRun"]["message"]
