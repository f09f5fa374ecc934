"""TrainingJob against a real kube-apiserver, kube-scheduler and kwok-simulated GPU nodes."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes import client

from kiln import API_VERSION, kube
from kiln.artifact import TrainingResult, format_termination_message
from kiln.conditions import get_condition

from .health import argocd_health, kstatus
from .helpers import finish_pod, run_operator, wait_for

DIGEST = "sha256:" + "5e" * 32
JOB: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "TrainingJob",
    "metadata": {"name": "digits"},
    "spec": {
        "image": "kiln-trainer:dev",
        "imagePullPolicy": "Never",
        "dataset": {"builtin": "sklearn-digits"},
        "hyperparameters": {"epochs": 3},
        "numNodes": 2,
        "resourcesPerNode": {
            "requests": {"cpu": "1", "nvidia.com/gpu": 8},
            "limits": {"cpu": "1", "nvidia.com/gpu": 8},
        },
        "nodeSelector": {"kiln.dev/pool": "gpu"},
        "maxRestarts": 1,
        "restartBackoff": {"initialSeconds": 0, "maxSeconds": 0},
    },
}


@pytest.fixture
def kube_api(kube: client.ApiClient) -> client.ApiClient:
    """The admin ApiClient (renamed: ``kube`` here is the kiln.kube module)."""
    return kube


def make_job(api: client.ApiClient, ns: str, **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(JOB)
    body["metadata"]["namespace"] = ns
    body["spec"].update(spec)
    created = kube.create(api, body)
    assert created is not None
    return created


def get_job(api: client.ApiClient, ns: str, name: str = "digits") -> dict[str, Any]:
    job = kube.get(api, API_VERSION, "TrainingJob", ns, name)
    assert job is not None
    return job


def pods(api: client.ApiClient, ns: str, name: str = "digits") -> list[dict[str, Any]]:
    return kube.list_objects(api, "v1", "Pod", ns, f"kiln.dev/trainingjob={name}")


def wait_status(
    api: client.ApiClient, ns: str, pred, timeout: float = 60, what: str = "status"
) -> dict[str, Any]:
    return wait_for(
        lambda: (lambda j: j if pred(j.get("status") or {}) else None)(get_job(api, ns)),
        timeout,
        message=what,
    )


def cond(status: dict[str, Any], type_: str) -> str | None:
    c = get_condition(status.get("conditions"), type_)
    return c["status"] if c else None


def running_gang(api: client.ApiClient, ns: str, gang: int, n: int = 2) -> list[dict[str, Any]]:
    def ready():
        ps = [
            p
            for p in pods(api, ns)
            if p["metadata"]["labels"].get("kiln.dev/gang") == str(gang)
            and not p["metadata"].get("deletionTimestamp")
        ]
        return ps if len(ps) == n and all(p["status"].get("phase") == "Running" for p in ps) else None

    return wait_for(ready, 60, message=f"gang {gang} running")


def result_message() -> str:
    return format_termination_message(
        TrainingResult(
            artifactUri="file:///var/lib/kiln/artifacts/digits/digits",
            digest=DIGEST,
            metrics={"accuracy": 0.97},
        )
    )


def test_creates_service_and_pods_on_gpu_nodes(kube_api, namespace, operator):
    make_job(kube_api, namespace)
    gang = running_gang(kube_api, namespace, 0)
    by_rank = {p["metadata"]["labels"]["kiln.dev/node-rank"]: p for p in gang}
    assert sorted(p["metadata"]["name"] for p in gang) == ["digits-node-0", "digits-node-1"]
    core = client.CoreV1Api(kube_api)
    for rank, p in by_rank.items():
        c = p["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PET_NODE_RANK"] == rank and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "8"
        assert env["PET_MASTER_ADDR"] == f"digits-node-0.digits.{namespace}.svc"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        node = core.read_node(p["spec"]["nodeName"])
        assert node.metadata.labels.get("kiln.dev/pool") == "gpu"
        assert any(t["key"] == "nvidia.com/gpu" for t in p["spec"]["tolerations"])
    svc = core.read_namespaced_service("digits", namespace)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
    job = wait_status(kube_api, namespace, lambda s: s.get("phase") == "Running", what="phase Running")
    st = job["status"]
    assert cond(st, "Created") == "True" and cond(st, "Running") == "True" and cond(st, "Ready") == "False"
    assert st["nodes"]["running"] == 2 and st["observedGeneration"] == job["metadata"]["generation"]
    assert st["startTime"]
    assert kstatus(job)["status"] == "InProgress" and argocd_health(job)["status"] == "Progressing"


def test_pod_failure_restarts_gang_then_fails_after_max_restarts(kube_api, namespace, operator):
    make_job(kube_api, namespace)
    running_gang(kube_api, namespace, 0)
    finish_pod(kube_api, namespace, "digits-node-1", exit_code=1, message="CUDA error: out of memory")
    job = wait_status(kube_api, namespace, lambda s: s.get("restartCount") == 1, what="restartCount 1")
    assert job["status"]["lastFailure"]["exitCode"] == 1
    assert job["status"]["lastFailure"]["pod"] == "digits-node-1"
    gang1 = running_gang(kube_api, namespace, 1)
    assert len(gang1) == 2  # both pods recreated, not just the failed one
    # the back-off is over: the restart time is removed from the stored status, not left behind
    wait_status(
        kube_api,
        namespace,
        lambda s: s.get("gang") == 1 and s.get("phase") == "Running" and "nextRestartTime" not in s,
        what="gang 1 Running without nextRestartTime",
    )
    finish_pod(kube_api, namespace, "digits-node-0", exit_code=2, message="NCCL timeout")
    job = wait_status(
        kube_api,
        namespace,
        lambda s: s.get("phase") == "Failed" and cond(s, "Stalled") == "True",
        what="phase Failed, Stalled",
    )
    st = job["status"]
    assert get_condition(st["conditions"], "Failed")["reason"] == "BackoffLimitExceeded"
    assert st["lastFailure"]["exitCode"] == 2 and "NCCL timeout" in st["lastFailure"]["message"]
    assert st["completionTime"]
    stalled = get_condition(st["conditions"], "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "BackoffLimitExceeded"
    assert kstatus(job) == {"status": "Failed", "message": stalled["message"]}
    assert argocd_health(job)["status"] == "Degraded"
    # the still-running rank 1 is deleted so its GPUs are freed
    wait_for(
        lambda: (
            not any(
                p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
                for p in pods(kube_api, namespace)
            )
        ),
        30,
        message="running pods deleted",
    )


def test_success_fills_result(kube_api, namespace, operator):
    make_job(kube_api, namespace)
    running_gang(kube_api, namespace, 0)
    finish_pod(kube_api, namespace, "digits-node-0", exit_code=0, message=result_message())
    job = wait_status(kube_api, namespace, lambda s: s.get("phase") == "Succeeded", what="Succeeded")
    st = job["status"]
    assert st["result"] == {
        "artifactUri": "file:///var/lib/kiln/artifacts/digits/digits",
        "digest": DIGEST,
        "metrics": {"accuracy": 0.97},
    }
    assert cond(st, "Ready") == "True"  # no modelRef: nothing to register
    assert cond(st, "Stalled") is None
    assert kstatus(job)["status"] == "Current" and argocd_health(job)["status"] == "Healthy"
    # rank 1 was still running: deleted; and a deleted child of a terminal job is not recreated
    wait_for(
        lambda: (
            [
                p["metadata"]["name"]
                for p in pods(kube_api, namespace)
                if not p["metadata"].get("deletionTimestamp")
            ]
            == ["digits-node-0"]
        ),
        30,
        message="only rank 0 left",
    )
    kube.delete(kube_api, "v1", "Pod", namespace, "digits-node-0", grace_period_seconds=0)
    wait_for(lambda: not pods(kube_api, namespace), 30, message="pods gone")
    job = get_job(kube_api, namespace)
    assert job["status"]["phase"] == "Succeeded" and not pods(kube_api, namespace)


def test_success_registers_version_in_model(kube_api, namespace, operator):
    kube.create(
        kube_api,
        {
            "apiVersion": API_VERSION,
            "kind": "Model",
            "metadata": {"name": "digits", "namespace": namespace},
            "spec": {},
        },
    )
    make_job(kube_api, namespace, modelRef={"name": "digits"})
    running_gang(kube_api, namespace, 0)
    finish_pod(kube_api, namespace, "digits-node-1", exit_code=0)
    finish_pod(kube_api, namespace, "digits-node-0", exit_code=0, message=result_message())
    job = wait_status(kube_api, namespace, lambda s: s.get("registeredVersion") == 1, what="registered")
    assert cond(job["status"], "Ready") == "True"
    model = kube.get(kube_api, API_VERSION, "Model", namespace, "digits")
    v = model["status"]["versions"][0]
    assert v["version"] == 1 and v["digest"] == DIGEST and v["metrics"] == {"accuracy": 0.97}
    assert v["lineage"]["trainingJob"] == "digits" and v["hyperparameters"] == {"epochs": 3}


def test_pod_failure_policy_fails_fast_on_permanent_errors(kube_api, namespace, operator):
    make_job(
        kube_api,
        namespace,
        maxRestarts=5,
        podFailurePolicy={"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]},
    )
    running_gang(kube_api, namespace, 0)
    finish_pod(
        kube_api, namespace, "digits-node-0", exit_code=2, message="kiln-train: error: no column 'label'"
    )
    job = wait_status(
        kube_api,
        namespace,
        lambda s: s.get("phase") == "Failed" and cond(s, "Stalled") == "True",
        what="Failed at once, Stalled",
    )
    st = job["status"]
    assert get_condition(st["conditions"], "Failed")["reason"] == "PodFailurePolicy"
    assert st["restartCount"] == 0 and "no column" in st["lastFailure"]["message"]
    assert get_condition(st["conditions"], "Stalled")["reason"] == "PodFailurePolicy"
    assert kstatus(job)["status"] == "Failed" and argocd_health(job)["status"] == "Degraded"


@pytest.mark.parametrize(("message", "reason"), [("", "ResultMissing"), ("oops", "ResultMalformed")])
def test_unusable_result_is_a_clear_failure(kube_api, namespace, operator, message, reason):
    make_job(kube_api, namespace, numNodes=1)
    running_gang(kube_api, namespace, 0, n=1)
    finish_pod(kube_api, namespace, "digits-node-0", exit_code=0, message=message)
    job = wait_status(kube_api, namespace, lambda s: s.get("phase") == "Failed", what="Failed")
    assert get_condition(job["status"]["conditions"], "Ready")["reason"] == reason


def test_suspend_and_resume(kube_api, namespace, operator):
    make_job(kube_api, namespace)
    running_gang(kube_api, namespace, 0)
    started = wait_status(kube_api, namespace, lambda s: s.get("startTime"), what="startTime")["status"]
    kube.patch(kube_api, API_VERSION, "TrainingJob", namespace, "digits", {"spec": {"suspend": True}})
    # suspended time must not count toward activeDeadlineSeconds: the clock is removed
    job = wait_status(
        kube_api,
        namespace,
        lambda s: s.get("phase") == "Suspended" and "startTime" not in s,
        what="Suspended without startTime",
    )
    assert argocd_health(job)["status"] == "Suspended"
    wait_for(lambda: not pods(kube_api, namespace), 30, message="pods deleted")
    kube.patch(kube_api, API_VERSION, "TrainingJob", namespace, "digits", {"spec": {"suspend": False}})
    job = wait_status(kube_api, namespace, lambda s: s.get("phase") == "Running", what="resumed")
    assert cond(job["status"], "Suspended") == "False"
    assert job["status"]["restartCount"] == 0
    assert job["status"]["startTime"] >= started["startTime"]


def test_active_deadline(kube_api, namespace, operator):
    make_job(kube_api, namespace, activeDeadlineSeconds=3)
    running_gang(kube_api, namespace, 0)
    job = wait_status(kube_api, namespace, lambda s: s.get("phase") == "Failed", timeout=30, what="deadline")
    assert get_condition(job["status"]["conditions"], "Failed")["reason"] == "DeadlineExceeded"
    wait_for(
        lambda: not [p for p in pods(kube_api, namespace) if not p["metadata"].get("deletionTimestamp")],
        30,
        message="pods deleted",
    )


def test_ttl_deletes_finished_job(kube_api, namespace, operator):
    make_job(kube_api, namespace, numNodes=1, ttlSecondsAfterFinished=1)
    running_gang(kube_api, namespace, 0, n=1)
    finish_pod(kube_api, namespace, "digits-node-0", exit_code=0, message=result_message())
    wait_for(
        lambda: kube.get(kube_api, API_VERSION, "TrainingJob", namespace, "digits") is None,
        30,
        message="job deleted by TTL",
    )


def test_operator_restart_mid_job_keeps_pods_and_status(cluster, kube_api, namespace, kiln_crds):
    with run_operator(cluster.kubeconfig):
        make_job(kube_api, namespace)
        first = running_gang(kube_api, namespace, 0)
        wait_status(kube_api, namespace, lambda s: s.get("phase") == "Running", what="Running")
    uids = sorted(p["metadata"]["uid"] for p in first)
    with run_operator(cluster.kubeconfig):
        finish_pod(kube_api, namespace, "digits-node-1", exit_code=1)
        job = wait_status(
            kube_api, namespace, lambda s: s.get("restartCount") == 1, what="restart after restart"
        )
        assert job["status"]["gang"] == 1
        running_gang(kube_api, namespace, 1)
    # the first operator's pods were reused (no duplicates), and exactly one gang exists now
    assert len(uids) == 2
    assert len([p for p in pods(kube_api, namespace) if not p["metadata"].get("deletionTimestamp")]) == 2


def test_feature_group_ref_waits_for_the_feature_group(kube_api, namespace, operator):
    """A job naming a FeatureGroup that does not exist creates nothing and says so; once the
    FeatureGroup exists the gang is created with it resolved into the trainer's KILN_DATASET."""
    make_job(
        kube_api,
        namespace,
        dataset={
            "featureGroupRef": {"name": "activity"},
            "entityUri": "s3://datasets/churn-labels.parquet",
            "labelColumn": "churned",
        },
    )
    st = wait_status(
        kube_api,
        namespace,
        lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("reason") == "FeatureGroupNotFound",
        what="Ready=False FeatureGroupNotFound",
    )
    assert st["status"]["phase"] == "Pending" and not pods(kube_api, namespace)
    fg = {
        "apiVersion": API_VERSION,
        "kind": "FeatureGroup",
        "metadata": {"name": "activity", "namespace": namespace},
        "spec": {
            "entities": [{"name": "customer_id"}],
            "features": [{"name": "orders", "dtype": "int64"}],
            "source": {"uri": "s3://datasets/activity.parquet"},
        },
    }
    assert kube.create(kube_api, fg) is not None
    gang = running_gang(kube_api, namespace, 0)  # within the 15 s blocked-retry interval
    env = {e["name"]: e.get("value") for e in gang[0]["spec"]["containers"][0]["env"]}
    ds = json.loads(env["KILN_DATASET"])
    assert ds["featureGroup"]["name"] == "activity" and ds["featureGroup"]["schemaDigest"].startswith(
        "sha256:"
    )
    assert ds["entityUri"] == "s3://datasets/churn-labels.parquet" and ds["labelColumn"] == "churned"
    assert env["KILN_STAGING_DIR"]  # s3:// entity table and source: the pod stages downloads
