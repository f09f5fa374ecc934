"""FeatureGroup against a real kube-apiserver (kwok nodes): materialization Jobs, their results in
status, the schedule's CronJob, failures; and one run of the real entry point, as the Job's
container would run it, against a real Redis.

kwok pods run no process: a test ends each pod as a kubelet would (helpers.finish_pod), with the
termination message the entry point writes (``{"error": ...}`` on failure), and kube-controller-
manager's Job controller then applies the Job's podFailurePolicy and backoffLimit for real.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import API_VERSION
from kiln import kube as kb
from kiln.cli import main as kiln_cli
from kiln.conditions import get_condition, parse_time, rfc3339
from kiln.resources import featuregroup as build

from .health import argocd_health, kstatus
from .helpers import finish_pod, job_condition, wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "featuregroup.yaml").read_text())
NAME = "activity"
#: A schedule that will not fire during a test (its Job's kwok pods would never end).
QUIET_SCHEDULE = "0 0 29 2 *"


@pytest.fixture(autouse=True)
def no_job_pods_left_running(kube: Any, namespace: str) -> Any:
    """After the test, delete the groups (their Jobs go with them) and end any pod still running.

    kwok runs no process, so such a pod never ends by itself; it carries the Job controller's
    ``batch.kubernetes.io/job-tracking`` finalizer, which (with a podFailurePolicy) goes only once
    the pod reaches a terminal phase or its Job is gone: the namespace would stay Terminating.
    The groups go first, or the operator (still running) would start new runs.
    """
    yield
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    for fg in kb.list_objects(kube, API_VERSION, "FeatureGroup", namespace):
        kb.delete(kube, API_VERSION, "FeatureGroup", namespace, fg["metadata"]["name"])
    batch, core = client.BatchV1Api(kube), client.CoreV1Api(kube)
    wait_for(lambda: not batch.list_namespaced_job(namespace).items, 60, message="the Jobs deleted")
    for pod in core.list_namespaced_pod(namespace).items:
        if pod.status.phase not in ("Succeeded", "Failed"):
            try:
                core.patch_namespaced_pod_status(
                    pod.metadata.name, namespace, {"status": {"phase": "Failed"}}
                )
            except ApiException as e:
                if e.status != 404:
                    raise


def body(ns: str, **materialization: Any) -> dict[str, Any]:
    """A FeatureGroup with one feature over a local Parquet file; one-day windows from ``startTime``."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=20)
    return {
        "apiVersion": API_VERSION,
        "kind": "FeatureGroup",
        "metadata": {"name": NAME, "namespace": ns},
        "spec": {
            "entities": [{"name": "customer_id", "dtype": "int64"}],
            "features": [{"name": "orders_7d", "dtype": "int64"}],
            "source": {"uri": "file:///data/activity.parquet"},
            "online": {"enabled": True, "store": {"address": "redis.features:6379"}, "maxAgeSeconds": 604800},
            "schedule": QUIET_SCHEDULE,
            "materialization": {
                "image": "kiln-trainer:dev",
                "imagePullPolicy": "Never",
                "startTime": rfc3339(start),
                **materialization,
            },
        },
    }


def get_fg(api: Any, ns: str, name: str = NAME) -> dict[str, Any]:
    obj = kb.get(api, API_VERSION, "FeatureGroup", ns, name)
    assert obj is not None
    return obj


def wait_fg(
    api: Any, ns: str, pred: Any, timeout: float = 60, message: str = "FeatureGroup status"
) -> dict[str, Any]:
    """The group once its status is for the current generation and ``pred(status)`` holds."""

    def check() -> dict[str, Any] | None:
        obj = get_fg(api, ns)
        st = obj.get("status") or {}
        return obj if st.get("observedGeneration") == obj["metadata"]["generation"] and pred(st) else None

    return wait_for(check, timeout, message=message)


def runs(api: Any, ns: str) -> list[dict[str, Any]]:
    jobs = kb.list_objects(api, "batch/v1", "Job", ns, f"{build.LABEL_FEATURE_GROUP}={NAME}")
    return sorted(jobs, key=lambda j: j["metadata"]["creationTimestamp"] + j["metadata"]["name"])


def wait_run(api: Any, ns: str, count: int = 1) -> dict[str, Any]:
    """The ``count``-th materialization Job of the group, once it exists."""
    return wait_for(
        lambda: (runs(api, ns)[count - 1 :] or [None])[0], 60, message=f"materialization Job #{count}"
    )


def ready(st: dict[str, Any]) -> dict[str, Any]:
    return get_condition(st.get("conditions"), "Ready") or {}


def simulated_result(job: dict[str, Any], index: int, rows: int) -> str:
    """The result line the entry point would print for window ``index`` of ``job``."""
    ann = job["metadata"]["annotations"]
    start, end = parse_time(ann[build.ANNOTATION_START]), parse_time(ann[build.ANNOTATION_END])
    assert start and end
    n = job["spec"]["completions"]
    a, b = start + (end - start) * index / n, start + (end - start) * (index + 1) / n
    return json.dumps(
        {
            "start": rfc3339(a),
            "end": rfc3339(b),
            "watermark": rfc3339(b),
            "rowsWritten": rows,
            "durationSeconds": 0.1,
        }
    )


def error(reason: str, message: str, column: str | None = None) -> str:
    return json.dumps({"error": {"reason": reason, "message": message, "column": column}})


def finish_run(api: Any, ns: str, job: dict[str, Any], end_pod: Any, timeout: float = 90) -> dict[str, Any]:
    """End the Job's pods as they come, ``end_pod(index) -> (exit_code, message)``, until the Job
    is Complete or Failed; returns the Job (batch/v1 client object)."""
    from kubernetes import client

    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    name, done = job["metadata"]["name"], set()

    def step() -> Any:
        j = batch.read_namespaced_job(name, ns)
        if job_condition(j, "Complete") or job_condition(j, "Failed"):
            return j
        for pod in core.list_namespaced_pod(ns, label_selector=f"batch.kubernetes.io/job-name={name}").items:
            if (
                pod.status.phase == "Running"
                and pod.metadata.name not in done
                and not pod.metadata.deletion_timestamp
            ):
                index = int(pod.metadata.labels["batch.kubernetes.io/job-completion-index"])
                code, message = end_pod(index)
                finish_pod(core, ns, pod.metadata.name, code, message, container=build.CONTAINER)
                done.add(pod.metadata.name)
        return None

    return wait_for(step, timeout, interval=0.3, message=f"Job {ns}/{name} to finish")


def succeed(api: Any, ns: str, job: dict[str, Any], rows: int = 5) -> dict[str, Any]:
    j = finish_run(api, ns, job, lambda i: (0, simulated_result(job, i, rows)))
    assert job_condition(j, "Complete")
    return j


def run_container_locally(job: dict[str, Any], index: int, tmp_path: Path) -> str:
    """Run the Job's container command with the Job's environment in a process here, as the kubelet
    would for completion ``index``; returns the termination message it wrote.

    Differences from the pod, and why: ``python`` is this interpreter (with the worktree's package
    on PYTHONPATH), and the termination log is a temporary file (``/dev/termination-log`` exists
    only in a container); ``JOB_COMPLETION_INDEX`` is what the Job controller sets.
    """
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["terminationMessagePath"] == "/dev/termination-log"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KILN_TERMINATION_LOG"] == c["terminationMessagePath"]
    log = tmp_path / f"termination-log-{index}"
    env |= {
        "KILN_TERMINATION_LOG": str(log),
        "JOB_COMPLETION_INDEX": str(index),
        "PYTHONPATH": str(REPO / "operator"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp_path),
    }
    command = [sys.executable if c["command"][0] == "python" else c["command"][0], *c["command"][1:]]
    r = subprocess.run([*command, *c["args"]], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return log.read_text()


def test_backfill_runs_the_entry_point_and_records_the_watermark(
    kube, cluster, namespace, operator, redis_server, tmp_path, capsys
):
    """The builder and the entry point agree: the Indexed Job the operator created, run for real
    (each completion's command and environment in a process here, against a local Parquet file and
    a real Redis), and its termination messages recorded as the watermark."""
    pytest.importorskip("duckdb", reason="the 'features' extra is not installed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    now = datetime.now(UTC)
    hours = [-66, -60, -30, -29, -2, -1]  # events over the last ~3 days, in two windows
    source = tmp_path / "activity.parquet"
    pq.write_table(
        pa.table(
            {
                "customer_id": [1, 2, 1, 2, 1, 3],
                "event_timestamp": pa.array(
                    [now + timedelta(hours=h) for h in hours], pa.timestamp("us", tz="UTC")
                ),
                "orders_7d": [1, 2, 3, 4, 5, 6],
            }
        ),
        source,
    )
    fg = body(namespace, parallelism=2, windowSeconds=86400, startTime=rfc3339(now - timedelta(hours=70)))
    fg["spec"]["source"]["uri"] = source.as_uri()
    fg["spec"]["online"]["store"]["address"] = redis_server.address
    assert kb.create(kube, fg)

    job = wait_run(kube, namespace)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 2)
    assert [r["action"] for r in spec["podFailurePolicy"]["rules"]] == ["FailJob", "Count", "Ignore"]
    assert job["metadata"]["ownerReferences"][0]["name"] == NAME
    obj = wait_fg(kube, namespace, lambda st: st.get("activeRun"), message="activeRun")
    assert ready(obj["status"])["reason"] == "Materializing"

    messages = {}

    def end_pod(index: int) -> tuple[int, str]:
        messages[index] = run_container_locally(job, index, tmp_path)
        return 0, messages[index]

    assert job_condition(finish_run(kube, namespace, job, end_pod, timeout=240), "Complete")
    rows = sum(json.loads(m)["rowsWritten"] for m in messages.values())
    assert rows == 3  # each customer once, in the window of its latest event
    end = job["metadata"]["annotations"][build.ANNOTATION_END]
    obj = wait_fg(
        kube, namespace, lambda st: st.get("lastMaterializationTime") == end, message="the watermark"
    )
    st = obj["status"]
    assert st["materializedRows"] == 3 and st["lastRun"]["phase"] == "Succeeded" and "activeRun" not in st
    assert ready(st)["status"] == "True" and kstatus(obj)["status"] == "Current"
    assert argocd_health(obj)["status"] == "Healthy"

    # online values are there, as the CLI reads them (the group from the API server)
    args = ["features", "get-online", NAME, "-n", namespace, "--kubeconfig", cluster.kubeconfig]
    capsys.readouterr()
    assert kiln_cli([*args, "-e", "customer_id=1", "-e", "customer_id=3", "-e", "customer_id=9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["values"]["orders_7d"] for o in out] == [5, 6, None]
    assert [o["statuses"]["orders_7d"] for o in out] == ["PRESENT", "PRESENT", "NOT_FOUND"]

    # the schedule's CronJob starts where this run ended
    cron = wait_for(lambda: kb.get(kube, "batch/v1", "CronJob", namespace, NAME), 30, message="the CronJob")
    tmpl = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert tmpl["args"][:4] == ["--start", end, "--end", "now"] and cron["spec"]["schedule"] == QUIET_SCHEDULE


def test_failed_validation_keeps_the_values_and_names_the_column(kube, cluster, namespace, operator, capsys):
    assert kb.create(kube, body(namespace))
    first = wait_run(kube, namespace)
    assert first["spec"]["completions"] == 1  # 20 hours in one-day windows
    succeed(kube, namespace, first, rows=5)
    end = first["metadata"]["annotations"][build.ANNOTATION_END]
    wait_fg(kube, namespace, lambda st: st.get("lastMaterializationTime") == end, message="the watermark")

    # `kiln features materialize --wait` requests an incremental run and reports how it ended
    args = ["features", "materialize", NAME, "-n", namespace, "--kubeconfig", cluster.kubeconfig]
    outcome: dict[str, int] = {}
    waiter = threading.Thread(
        target=lambda: outcome.update(code=kiln_cli([*args, "--wait", "--timeout", "90"]))
    )
    waiter.start()
    second = wait_run(kube, namespace, 2)
    assert second["metadata"]["labels"][build.LABEL_TRIGGER] == "Requested"
    assert second["metadata"]["annotations"][build.ANNOTATION_START] == end  # from the watermark
    message = error("ColumnMissing", "source has no column 'orders_7d' (feature orders_7d)", "orders_7d")
    j = finish_run(kube, namespace, second, lambda i: (1, message))
    # exit 1 fails the Job at once (podFailurePolicy FailJob), without using backoffLimit's retries
    assert job_condition(j, "Failed") and j.status.failed == 1
    assert any(c.reason == "PodFailurePolicy" for c in j.status.conditions)
    waiter.join(120)
    assert outcome["code"] == 1
    assert '"reason": "ColumnMissing"' in capsys.readouterr().out

    obj = wait_fg(
        kube, namespace, lambda st: ready(st).get("reason") == "ColumnMissing", message="ColumnMissing"
    )
    st = obj["status"]
    assert ready(st)["status"] == "False" and "orders_7d" in ready(st)["message"]
    assert st["lastMaterializationTime"] == end and st["materializedRows"] == 5  # old values stay
    assert st["lastRun"]["column"] == "orders_7d" and st["lastHandledMaterializeAt"]
    assert get_condition(st["conditions"], "Stalled")["status"] == "True"
    assert kstatus(obj)["status"] == "Failed" and argocd_health(obj)["status"] == "Degraded"
    assert len(runs(kube, namespace)) == 2  # a permanent failure is not retried


def test_transient_failure_is_retried_per_backoff_limit_and_never_advances(kube, namespace, operator):
    assert kb.create(kube, body(namespace, backoffLimit=1))
    job = wait_run(kube, namespace)
    message = error("OnlineStoreUnavailable", "online store: ConnectionError: Connection refused")
    j = finish_run(kube, namespace, job, lambda i: (3, message), timeout=120)
    # exit 3 counts against backoffLimit: the Job controller retried the pod once, then gave up
    assert job_condition(j, "Failed") and j.status.failed == 2
    assert any(c.reason == "BackoffLimitExceeded" for c in j.status.conditions)
    obj = wait_fg(
        kube, namespace, lambda st: (st.get("lastRun") or {}).get("phase") == "Failed", message="lastRun"
    )
    st = obj["status"]
    assert st["lastRun"]["reason"] == "OnlineStoreUnavailable" and st["lastRun"]["transient"] is True
    assert st["lastRun"]["failedPods"] == 2 and "BackoffLimitExceeded" in st["lastRun"]["message"]
    assert "lastMaterializationTime" not in st and ready(st)["reason"] == "OnlineStoreUnavailable"
    assert get_condition(st["conditions"], "Stalled") is None  # retried in 5 minutes
    assert kb.get(kube, "batch/v1", "CronJob", namespace, NAME) is None  # no watermark, no schedule


def test_invalid_spec_is_stalled_until_fixed(kube, namespace, operator):
    body_ = copy.deepcopy(EXAMPLE)
    body_["metadata"]["namespace"] = namespace
    name = body_["metadata"]["name"]
    assert kb.create(kube, body_)

    def reconciled(pred: Any) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            obj = get_fg(kube, namespace, name)
            st = obj.get("status") or {}
            return obj if st.get("observedGeneration") == obj["metadata"]["generation"] and pred(st) else None

        return wait_for(check, 30, message="FeatureGroup reconciled")

    obj = reconciled(lambda st: st.get("schemaDigest"))
    assert ready(obj["status"])["reason"] == "Materializing"  # the example's backfill Job runs
    assert get_condition(obj["status"]["conditions"], "Stalled") is None
    assert kstatus(obj)["status"] == "InProgress" and argocd_health(obj)["status"] == "Progressing"

    # The CRD's pattern is checked by Go's regexp, where \s is ASCII whitespace only; pydantic's is
    # Unicode-aware, so a no-break space passes admission and is refused by the model.
    kb.patch(kube, API_VERSION, "FeatureGroup", namespace, name, {"spec": {"schedule": "0 * * * *\u00a0x"}})
    obj = reconciled(lambda st: not st.get("schemaDigest"))
    stalled = get_condition(obj["status"]["conditions"], "Stalled")
    assert (
        stalled["status"] == "True"
        and stalled["reason"] == "InvalidSpec"
        and "schedule" in stalled["message"]
    )
    assert kstatus(obj)["status"] == "Failed" and argocd_health(obj)["status"] == "Degraded"

    kb.patch(kube, API_VERSION, "FeatureGroup", namespace, name, {"spec": {"schedule": "@hourly"}})
    obj = reconciled(lambda st: st.get("schemaDigest"))
    assert get_condition(obj["status"]["conditions"], "Stalled") is None
