"""A child the API server refuses (403 PodSecurity / ResourceQuota) becomes the parent's
Ready=False with the server's message and one Warning Event; the operator backs off instead of
logging a traceback on every retry (kiln.controllers.rejections)."""

from __future__ import annotations

import copy
import math
import re
import time
from typing import Any

import pytest
from kubernetes import client

from kiln import API_VERSION, kube
from kiln.conditions import get_condition

from .helpers import run_operator, wait_for

JOB: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "TrainingJob",
    "metadata": {"name": "digits"},
    "spec": {
        "image": "kiln-trainer:dev",
        "imagePullPolicy": "Never",
        "dataset": {"builtin": "sklearn-digits"},
        "numNodes": 2,
    },
}
REJECTED_LINE = re.compile(r"reconcile of TrainingJob \S+/digits: .* rejected by the API server")


def make_job(api: client.ApiClient, ns: str, **spec: Any) -> None:
    body = copy.deepcopy(JOB)
    body["metadata"]["namespace"] = ns
    body["spec"].update(spec)
    assert kube.create(api, body) is not None


def ready(api: client.ApiClient, ns: str) -> dict[str, Any]:
    job = kube.get(api, API_VERSION, "TrainingJob", ns, "digits") or {}
    return get_condition((job.get("status") or {}).get("conditions"), "Ready") or {}


def rejection_events(api: client.ApiClient, ns: str) -> list[client.CoreV1Event]:
    return [
        e
        for e in client.CoreV1Api(api).list_namespaced_event(ns).items
        if e.reason == "ChildRejected" and e.involved_object.name == "digits"
    ]


def pods(api: client.ApiClient, ns: str) -> list[dict[str, Any]]:
    return kube.list_objects(api, "v1", "Pod", ns, "kiln.dev/trainingjob=digits")


@pytest.fixture
def api(kube: client.ApiClient) -> client.ApiClient:
    """The admin ApiClient (``kube`` is the kiln.kube module here)."""
    return kube


def assert_backed_off(caplog: pytest.LogCaptureFixture, output: str, seconds: float) -> int:
    """No traceback, and retries no more often than the 1, 2, 4 ... s back-off allows."""
    assert "Traceback" not in output, output[-4000:]
    kiln = [r for r in caplog.records if r.name.startswith("kiln.")]
    assert not [r for r in kiln if r.exc_info], [r.getMessage() for r in kiln if r.exc_info]
    attempts = sum(bool(REJECTED_LINE.search(r.getMessage())) for r in kiln)
    # t = 0, 1, 3, 7, 15 ...: 1 + log2(1 + t) attempts, plus a rerun for our own status write;
    # a hot loop would make hundreds
    assert 1 <= attempts <= 4 + math.log2(1 + seconds), (attempts, seconds)
    print(f"{attempts} rejected reconciles in {seconds:.1f} s")  # the figure, with -rP
    return attempts


def test_pod_security_violation_is_reported_and_a_spec_fix_recovers(
    api, cluster, namespace, kiln_crds, caplog
):
    """A hostPath output volume in a `restricted` namespace: every pod is Forbidden."""
    with run_operator(cluster.kubeconfig, namespace=namespace) as runner:
        t0 = time.monotonic()
        make_job(api, namespace, output={"uri": "/out", "volume": {"hostPath": {"path": "/tmp/kiln"}}})
        cond = wait_for(
            lambda: (c := ready(api, namespace)).get("reason") == "ChildRejected" and c,
            30,
            message="Ready=False ChildRejected",
        )
        assert cond["status"] == "False"
        assert cond["message"].startswith(
            "Pod digits-node-0 was rejected by the API server (403 Forbidden): "
        )
        assert (
            'violates PodSecurity "restricted:latest": restricted volume types '
            '(volume "output" uses restricted volume type "hostPath")'
        ) in cond["message"], cond
        events = wait_for(lambda: rejection_events(api, namespace), 10, message="ChildRejected event")
        assert events[0].type == "Warning" and events[0].message == cond["message"]
        assert not pods(api, namespace)
        # a few retries later: still one Event (it is posted when the condition changes)
        wait_for(lambda: time.monotonic() - t0 > 4, 10)
        assert len(rejection_events(api, namespace)) == 1

        # the fix is a spec change: the watch brings it in at once, whatever the back-off
        kube.patch(
            api,
            API_VERSION,
            "TrainingJob",
            namespace,
            "digits",
            {"spec": {"output": {"volume": {"hostPath": None, "emptyDir": {}}}}},
        )
        fixed = time.monotonic()
        wait_for(lambda: len(pods(api, namespace)) == 2, 10, message="the gang created after the fix")
        wait_for(lambda: ready(api, namespace).get("reason") != "ChildRejected", 10, message="Ready updated")
        recovery = time.monotonic() - fixed
        elapsed = time.monotonic() - t0
    assert recovery < 5, recovery
    print(f"spec fix to the gang created: {recovery:.2f} s")
    assert_backed_off(caplog, runner.output, elapsed)


@pytest.mark.parametrize("allowed", [0, 1], ids=["no-pod", "half-the-gang"])
def test_resource_quota_is_reported_and_lifting_it_recovers(
    api, cluster, namespace, kiln_crds, caplog, allowed
):
    """A quota admits none or one of the gang's two pods. With one admitted the gang is not
    "disrupted" (it was never complete): the admitted pod is kept, no restart is counted, and
    the missing pod is created once the quota allows it."""
    core = client.CoreV1Api(api)
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-pods"),
        spec=client.V1ResourceQuotaSpec(hard={"pods": str(allowed)}),
    )
    core.create_namespaced_resource_quota(namespace, quota)
    wait_for(
        lambda: (
            (core.read_namespaced_resource_quota("no-pods", namespace).status.hard or {}).get("pods")
            == str(allowed)
        ),
        30,
        message="quota status computed",
    )
    with run_operator(cluster.kubeconfig, namespace=namespace) as runner:
        t0 = time.monotonic()
        make_job(api, namespace)
        cond = wait_for(
            lambda: (c := ready(api, namespace)).get("reason") == "ChildRejected" and c,
            30,
            message="Ready=False ChildRejected",
        )
        assert cond["status"] == "False"
        assert "was rejected by the API server (403 Forbidden)" in cond["message"]
        if not allowed:
            assert "Pod digits-node-0 was rejected" in cond["message"]
        assert "exceeded quota: no-pods" in cond["message"], cond
        events = wait_for(lambda: rejection_events(api, namespace), 10, message="ChildRejected event")
        assert events[0].type == "Warning" and "exceeded quota: no-pods" in events[0].message
        admitted = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(api, namespace)}
        assert len(admitted) == allowed

        # lifting the quota changes nothing the operator watches: the back-off retry finds it
        wait_for(lambda: time.monotonic() - t0 > 4, 10)
        assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(api, namespace)} == admitted
        core.delete_namespaced_resource_quota("no-pods", namespace)
        wait_for(lambda: len(pods(api, namespace)) == 2, 40, message="the gang created after the quota went")
        wait_for(lambda: ready(api, namespace).get("reason") != "ChildRejected", 10, message="Ready updated")
        elapsed = time.monotonic() - t0
    after = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(api, namespace)}
    assert {n: after[n] for n in admitted} == admitted  # the admitted pod was kept
    st = kube.get(api, API_VERSION, "TrainingJob", namespace, "digits")["status"]
    assert (st["gang"], st["restartCount"], st["disruptionCount"]) == (0, 0, 0), st
    assert len(rejection_events(api, namespace)) == 1
    assert_backed_off(caplog, runner.output, elapsed)


def test_inferenceservice_children_share_the_path(api, cluster, namespace, kiln_crds, tmp_path):
    """The same report for another kind: an InferenceService whose Service exceeds a quota."""
    from .test_inferenceservice import MODEL, Store, create_model, isvc_body

    core = client.CoreV1Api(api)
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-services"),
        spec=client.V1ResourceQuotaSpec(hard={"services": "0"}),
    )
    core.create_namespaced_resource_quota(namespace, quota)
    wait_for(
        lambda: (core.read_namespaced_resource_quota("no-services", namespace).status.hard or {}).get(
            "services"
        ),
        30,
        message="quota status computed",
    )
    store = Store(tmp_path)
    with run_operator(cluster.kubeconfig, namespace=namespace) as runner:
        create_model(api, namespace, [store.version(1)], production=1)
        assert kube.create(api, isvc_body(namespace)) is not None

        def rejected() -> dict[str, Any] | None:
            obj = kube.get(api, API_VERSION, "InferenceService", namespace, MODEL) or {}
            c = get_condition((obj.get("status") or {}).get("conditions"), "Ready") or {}
            return c if c.get("reason") == "ChildRejected" else None

        cond = wait_for(rejected, 30, message="InferenceService Ready=False ChildRejected")
        assert f"Service {MODEL} was rejected by the API server (403 Forbidden)" in cond["message"], cond
        assert "exceeded quota: no-services" in cond["message"]

        def isvc_events() -> list[client.CoreV1Event]:
            return [
                e
                for e in core.list_namespaced_event(namespace).items
                if e.reason == "ChildRejected" and e.involved_object.kind == "InferenceService"
            ]

        events = wait_for(isvc_events, 10, message="ChildRejected event")
        assert len(events) == 1 and events[0].type == "Warning"
    assert "Traceback" not in runner.output, runner.output[-4000:]


def test_inferenceservice_pods_refused_after_the_deployment_was_accepted(
    api, cluster, namespace, kiln_crds, tmp_path
):
    """The API server accepts the Deployment, then refuses its ReplicaSet's pods (a pod quota;
    PodSecurity admission is the same path): the Deployment's ReplicaFailure condition is the
    only place that says so, and the InferenceService's Ready must carry it."""
    from .test_inferenceservice import MODEL, Store, create_model, isvc_body

    core = client.CoreV1Api(api)
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-pods"), spec=client.V1ResourceQuotaSpec(hard={"pods": "0"})
    )
    core.create_namespaced_resource_quota(namespace, quota)
    wait_for(
        lambda: (core.read_namespaced_resource_quota("no-pods", namespace).status.hard or {}).get("pods"),
        30,
        message="quota status computed",
    )
    store = Store(tmp_path)
    with run_operator(cluster.kubeconfig, namespace=namespace):
        create_model(api, namespace, [store.version(1)], production=1)
        assert kube.create(api, isvc_body(namespace)) is not None

        def refused() -> dict[str, Any] | None:
            obj = kube.get(api, API_VERSION, "InferenceService", namespace, MODEL) or {}
            c = get_condition((obj.get("status") or {}).get("conditions"), "Ready") or {}
            return c if c.get("reason") == "ReplicaFailure" else None

        cond = wait_for(refused, 60, message="InferenceService Ready=False ReplicaFailure")
        assert cond["status"] == "False"
        assert "stable Deployment cannot create pods" in cond["message"], cond
        assert "exceeded quota: no-pods" in cond["message"], cond

        core.delete_namespaced_resource_quota("no-pods", namespace)
        wait_for(
            lambda: (
                (
                    get_condition(
                        (kube.get(api, API_VERSION, "InferenceService", namespace, MODEL) or {})
                        .get("status", {})
                        .get("conditions"),
                        "Ready",
                    )
                    or {}
                ).get("reason")
                != "ReplicaFailure"
            ),
            120,
            message="ReplicaFailure cleared once pods can be created",
        )
