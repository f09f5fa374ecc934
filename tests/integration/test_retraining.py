"""A Model's spec.retraining against the real API server (kwok nodes), the operator in-process and,
for the drift trigger, a REAL Prometheus scraping a synthetic exporter of ``kiln_feature_drift``.

TrainingJob pods never run on kwok nodes: the tests end them as a kubelet would
(``helpers.finish_pod``): exit 0 with the trainer's result message (the job succeeds and
registers a version), or exit 1 with ``maxRestarts: 0`` (the job fails).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kiln import API_VERSION, kube
from kiln.conditions import get_condition, parse_time

from .helpers import finish_pod, wait_for
from .test_inferenceservice import Prometheus, _stop, free_port, start_prometheus
from .test_trainingjob import result_message

MODEL = "digits"
TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "vision"}},
    "spec": {
        "image": "kiln-trainer:dev",
        "imagePullPolicy": "Never",
        "dataset": {"builtin": "sklearn-digits"},
        "resourcesPerNode": {
            "requests": {"cpu": "1", "nvidia.com/gpu": 1},
            "limits": {"cpu": "1", "nvidia.com/gpu": 1},
        },
        "nodeSelector": {"kiln.dev/pool": "gpu"},
        "maxRestarts": 0,
    },
}
DRIFT_QUERY = 'max(kiln_feature_drift{namespace="{{namespace}}",model="{{model}}",method="psi"})'


@dataclass
class DriftSource:
    """A real Prometheus scraping a synthetic ``kiln_feature_drift`` exporter every second."""

    prom: Prometheus
    gauge: Gauge

    def set(self, namespace: str, value: float) -> None:
        self.gauge.labels(MODEL, "1", namespace, "pixel-5", "psi").set(value)

    def trigger(self, **over: Any) -> dict[str, Any]:
        return {
            "prometheus": {"address": self.prom.address},
            "query": DRIFT_QUERY,
            "threshold": 0.2,
            "forSeconds": 3,
            "intervalSeconds": 5,
            **over,
        }


@pytest.fixture(scope="module")
def drift(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriftSource]:
    tmp = tmp_path_factory.mktemp("drift")
    registry = CollectorRegistry()
    gauge = Gauge(
        "kiln_feature_drift",
        "Feature drift statistic.",
        ["model", "version", "namespace", "feature", "method"],
        registry=registry,
    )
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)
    prom = start_prometheus(tmp, [f"127.0.0.1:{port}"])
    try:
        yield DriftSource(prom, gauge)
    finally:
        _stop(prom.proc)


def create_model(api: client.ApiClient, ns: str, **retraining: Any) -> None:
    body = {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": MODEL, "namespace": ns},
        "spec": {"retraining": {"template": TEMPLATE, **retraining}},
    }
    assert kube.create(api, body) is not None


def model(api: client.ApiClient, ns: str) -> dict[str, Any]:
    obj = kube.get(api, API_VERSION, "Model", ns, MODEL)
    assert obj is not None
    return obj


def retraining(api: client.ApiClient, ns: str) -> dict[str, Any]:
    return dict((model(api, ns).get("status") or {}).get("retraining") or {})


def condition(api: client.ApiClient, ns: str, type_: str) -> dict[str, Any]:
    return get_condition((model(api, ns).get("status") or {}).get("conditions"), type_) or {}


def jobs(api: client.ApiClient, ns: str) -> list[dict[str, Any]]:
    return sorted(
        kube.list_objects(api, API_VERSION, "TrainingJob", ns),
        key=lambda j: j["metadata"]["creationTimestamp"],
    )


def wait_model(api: client.ApiClient, ns: str, pred: Any, timeout: float = 60, message: str = "") -> None:
    try:
        wait_for(lambda: pred(model(api, ns)), timeout, interval=0.25, message=message)
    except TimeoutError as e:
        st = json.dumps(model(api, ns).get("status"), indent=1)[:6000]
        raise AssertionError(f"{e}; Model status: {st}") from None


def wait_jobs(api: client.ApiClient, ns: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    return wait_for(
        lambda: (js := jobs(api, ns)) and len(js) == n and js, timeout, message=f"{n} TrainingJobs"
    )


def request(api: client.ApiClient, ns: str, value: str) -> None:
    kube.patch(
        api,
        API_VERSION,
        "Model",
        ns,
        MODEL,
        {"metadata": {"annotations": {"kiln.dev/retrain-requested-at": value}}},
    )


def job_phase(api: client.ApiClient, ns: str, name: str) -> str | None:
    job = kube.get(api, API_VERSION, "TrainingJob", ns, name)
    return ((job or {}).get("status") or {}).get("phase")


def end_job(api: client.ApiClient, ns: str, name: str, *, succeed: bool) -> None:
    """End the job's only pod as a kubelet would; wait until the TrainingJob says so."""
    if succeed:
        finish_pod(api, ns, f"{name}-node-0", exit_code=0, message=result_message())
    else:
        finish_pod(api, ns, f"{name}-node-0", exit_code=1, message="CUDA error: out of memory")
    want = "Succeeded" if succeed else "Failed"
    wait_for(lambda: job_phase(api, ns, name) == want, 60, message=f"TrainingJob {name} {want}")


@pytest.fixture
def api(kube: client.ApiClient) -> client.ApiClient:
    return kube


def test_manual_request_creates_one_run_and_a_second_waits_for_it(api, namespace, operator):
    ns = namespace
    create_model(api, ns, cooldownSeconds=3600)
    wait_model(
        api, ns, lambda m: condition(api, ns, "RetrainingSuspended").get("reason") == "Idle", message="Idle"
    )
    assert jobs(api, ns) == []  # enabling retraining starts nothing

    request(api, ns, "2026-03-01T12:00:00Z")
    (job,) = wait_jobs(api, ns, 1)
    name = job["metadata"]["name"]
    assert name == "digits-retrain-1"
    assert job["spec"]["modelRef"] == {"name": MODEL} and job["spec"]["image"] == "kiln-trainer:dev"
    labels, notes = job["metadata"]["labels"], job["metadata"]["annotations"]
    assert (
        labels["kiln.dev/model"] == MODEL
        and labels["kiln.dev/retraining-run"] == "1"
        and labels["team"] == "vision"
    )
    assert notes["kiln.dev/retraining-trigger"] == "Manual"
    owner = job["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "Model" and owner["uid"] == model(api, ns)["metadata"]["uid"]
    st = model(api, ns)["status"]
    (entry,) = [e for e in st["history"] if e["cause"] == "Retraining"]
    assert entry["trainingJob"] == name and "Manual: requested (2026-03-01T12:00:00Z)" in entry["message"]
    assert st["retraining"]["lastRun"]["name"] == name and st["retraining"]["runs"] == 1

    # A second request while the run is in progress: seen (pending), nothing created.
    request(api, ns, "2026-03-01T12:05:00Z")
    wait_model(api, ns, lambda m: retraining(api, ns).get("pending") == ["Manual"], message="request pending")
    msg = condition(api, ns, "RetrainingSuspended")["message"]
    assert "digits-retrain-1 in progress" in msg, msg
    assert [j["metadata"]["name"] for j in jobs(api, ns)] == [name]

    # The run succeeds and registers version 1 with its trigger in the lineage; the waiting
    # request (a person's, not held by the cooldown) starts run 2, and only run 2.
    end_job(api, ns, name, succeed=True)
    js = wait_jobs(api, ns, 2)
    assert js[1]["metadata"]["name"] == "digits-retrain-2"
    wait_model(
        api, ns, lambda m: (retraining(api, ns).get("lastRun") or {}).get("name") == "digits-retrain-2"
    )
    versions = model(api, ns)["status"]["versions"]
    assert versions[0]["lineage"]["trainingJob"] == name
    assert versions[0]["lineage"]["retrainingTrigger"] == "Manual"
    assert retraining(api, ns)["consecutiveFailures"] == 0


def test_drift_for_the_duration_starts_one_run_and_the_cooldown_holds_the_next(
    api, namespace, operator, drift
):
    ns = namespace
    drift.set(ns, 0.05)
    create_model(api, ns, cooldownSeconds=20, triggers={"drift": drift.trigger()})
    wait_model(
        api,
        ns,
        lambda m: (retraining(api, ns).get("drift") or {}).get("value") == 0.05,
        message="drift observed",
    )
    drift.set(ns, 0.5)
    (job,) = wait_jobs(api, ns, 1, timeout=60)
    rt = retraining(api, ns)
    since = parse_time(rt["drift"]["aboveSince"])
    created = parse_time(job["metadata"]["creationTimestamp"])
    assert since is not None and created is not None and (created - since).total_seconds() >= 3  # forSeconds
    assert job["metadata"]["annotations"]["kiln.dev/retraining-trigger"] == "Drift"
    assert "drift 0.5 > 0.2" in rt["lastRun"]["message"]

    # Drift stays high. The run succeeds; the next one waits for the cooldown (20 s from its end).
    end_job(api, ns, job["metadata"]["name"], succeed=True)
    wait_model(
        api,
        ns,
        lambda m: condition(api, ns, "RetrainingSuspended").get("reason") == "Waiting",
        message="cooldown",
    )
    assert "cooldown until" in condition(api, ns, "RetrainingSuspended")["message"]
    assert len(jobs(api, ns)) == 1
    js = wait_jobs(api, ns, 2, timeout=60)
    ended = parse_time(retraining(api, ns)["lastRun"]["startTime"])
    first_end = parse_time(
        kube.get(api, API_VERSION, "TrainingJob", ns, "digits-retrain-1")["status"]["completionTime"]
    )
    second = parse_time(js[1]["metadata"]["creationTimestamp"])
    assert ended is not None and first_end is not None and second is not None
    assert (second - first_end).total_seconds() >= 20 - 1  # second precision of both times


def test_failing_runs_back_off_then_suspend_and_a_person_can_retry(api, namespace, operator, drift):
    ns = namespace
    drift.set(ns, 0.9)  # drift stays over the threshold: without back-off this would loop
    create_model(
        api,
        ns,
        triggers={"drift": drift.trigger(forSeconds=0)},
        backoff={"initialSeconds": 4, "maxSeconds": 4},
        maxConsecutiveFailures=2,
    )
    (first,) = wait_jobs(api, ns, 1)
    end_job(api, ns, first["metadata"]["name"], succeed=False)
    wait_model(api, ns, lambda m: retraining(api, ns).get("consecutiveFailures") == 1, message="1 failure")
    js = wait_jobs(api, ns, 2)
    gap = parse_time(js[1]["metadata"]["creationTimestamp"]) - parse_time(
        kube.get(api, API_VERSION, "TrainingJob", ns, first["metadata"]["name"])["status"]["completionTime"]
    )
    assert gap.total_seconds() >= 4 - 1  # the back-off
    end_job(api, ns, js[1]["metadata"]["name"], succeed=False)

    # Two failures in a row: suspended, and it says so.
    wait_model(
        api,
        ns,
        lambda m: condition(api, ns, "RetrainingSuspended").get("status") == "True",
        message="suspended",
    )
    ready, stalled = condition(api, ns, "Ready"), condition(api, ns, "Stalled")
    assert ready["status"] == "False" and ready["reason"] == "RetrainingSuspended"
    assert stalled.get("status") == "True"
    assert "2 retraining runs failed in a row" in ready["message"] and "out of memory" in ready["message"]
    # It stays suspended while drift keeps being evaluated over the threshold.
    seen = retraining(api, ns)["drift"]["lastEvaluationTime"]
    wait_model(
        api,
        ns,
        lambda m: retraining(api, ns)["drift"]["lastEvaluationTime"] > seen,
        timeout=30,
        message="another drift evaluation",
    )
    assert len(jobs(api, ns)) == 2

    # A person asks: one more run.
    request(api, ns, "retry")
    js = wait_jobs(api, ns, 3)
    assert js[2]["metadata"]["annotations"]["kiln.dev/retraining-trigger"] == "Drift,Manual"


def test_template_with_a_model_ref_is_refused_at_admission(api, namespace, kiln_crds):
    body = {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": MODEL, "namespace": namespace},
        "spec": {
            "retraining": {
                "template": {"spec": {**TEMPLATE["spec"], "modelRef": {"name": "other"}}},
                "triggers": {"schedule": {"cron": "every day"}},
            }
        },
    }
    with pytest.raises(client.ApiException) as e:
        kube.create(api, body)
    text = json.loads(e.value.body)["message"]
    assert (
        "spec.retraining.template.spec.modelRef" in text and "spec.retraining.triggers.schedule.cron" in text
    )


def test_what_the_schema_cannot_see_is_ready_false_naming_the_field(api, namespace, operator):
    # Five fields (the schema's pattern) but minute 61 does not exist: only croniter knows.
    create_model(api, namespace, triggers={"schedule": {"cron": "61 * * * *"}})
    wait_model(
        api,
        namespace,
        lambda m: condition(api, namespace, "Ready").get("reason") == "InvalidSpec",
        message="Ready=False InvalidSpec",
    )
    ready = condition(api, namespace, "Ready")
    assert ready["status"] == "False" and ready["message"].startswith("spec.retraining.triggers.schedule")
    assert "61 * * * *" in ready["message"] and jobs(api, namespace) == []
