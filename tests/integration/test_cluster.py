"""The local cluster itself (hack/cluster): what every other integration test relies on."""

from __future__ import annotations

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from .helpers import complete_job, finish_pod, serviceaccount_kubeconfig, wait_for, wait_pods_running

pytestmark = pytest.mark.integration

# What the restricted PodSecurity level requires of every pod and container.
POD_SECURITY = client.V1PodSecurityContext(
    run_as_non_root=True, run_as_user=65532, seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")
)
CONTAINER_SECURITY = client.V1SecurityContext(
    allow_privilege_escalation=False, capabilities=client.V1Capabilities(drop=["ALL"])
)
GPU_TOLERATION = client.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")


def pod_spec(*, gpus: int = 0, restart_policy: str = "Always") -> client.V1PodSpec:
    resources = client.V1ResourceRequirements(
        requests={"cpu": "100m", "memory": "64Mi"}, limits={"memory": "64Mi"}
    )
    if gpus:
        resources.limits["nvidia.com/gpu"] = str(gpus)
    return client.V1PodSpec(
        restart_policy=restart_policy,
        security_context=POD_SECURITY,
        tolerations=[GPU_TOLERATION] if gpus else None,
        containers=[
            client.V1Container(
                name="main",
                image="registry.k8s.io/pause:3.10",
                security_context=CONTAINER_SECURITY,
                resources=resources,
            )
        ],
    )


def test_nodes_ready_with_gpu_capacity(kube):
    nodes = client.CoreV1Api(kube).list_node(label_selector="type=kwok").items
    ready = {
        n.metadata.name: n
        for n in nodes
        if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
    }
    assert len(ready) == len(nodes) == 4, [n.metadata.name for n in nodes]
    gpu = [n for n in ready.values() if n.metadata.labels.get("kiln.dev/pool") == "gpu"]
    cpu = [n for n in ready.values() if n.metadata.labels.get("kiln.dev/pool") == "cpu"]
    assert len(gpu) == 2 and len(cpu) == 2
    for n in gpu:
        assert n.status.allocatable["nvidia.com/gpu"] == "8"
        assert n.metadata.labels["nvidia.com/gpu.present"] == "true"
        assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in n.spec.taints)
    for n in cpu:
        assert "nvidia.com/gpu" not in n.status.allocatable


def test_deployment_reaches_three_running_pods(kube, namespace):
    labels = {"app": "web"}
    client.AppsV1Api(kube).create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=3,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels), spec=pod_spec()
                ),
            ),
        ),
    )
    pods = wait_pods_running(kube, namespace, "app=web", 3)
    assert all(p.status.pod_ip for p in pods)
    # untolerated pods stay off the tainted GPU nodes
    assert {p.spec.node_name for p in pods} <= {"kwok-cpu-0", "kwok-cpu-1"}
    wait_for(
        lambda: (
            client.AppsV1Api(kube).read_namespaced_deployment("web", namespace).status.ready_replicas == 3
        ),
        message="deployment web to report 3 ready replicas",
    )


def test_job_completes_through_helper(kube, namespace):
    batch = client.BatchV1Api(kube)
    batch.create_namespaced_job(
        namespace,
        client.V1Job(
            metadata=client.V1ObjectMeta(name="once"),
            spec=client.V1JobSpec(
                completions=2,
                parallelism=2,
                backoff_limit=0,
                template=client.V1PodTemplateSpec(spec=pod_spec(restart_policy="Never")),
            ),
        ),
    )
    job = complete_job(kube, namespace, "once")
    assert job.status.succeeded == 2
    pods = client.CoreV1Api(kube).list_namespaced_pod(
        namespace, label_selector="batch.kubernetes.io/job-name=once"
    )
    assert [p.status.phase for p in pods.items] == ["Succeeded", "Succeeded"]


def test_failed_pod_keeps_exit_code_and_termination_message(kube, namespace):
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="trainer"), spec=pod_spec(gpus=8, restart_policy="Never")
        ),
    )
    finish_pod(kube, namespace, "trainer", exit_code=3, message='{"error": "loss is NaN"}')

    pod = core.read_namespaced_pod("trainer", namespace)
    assert pod.spec.node_name in ("kwok-gpu-0", "kwok-gpu-1")  # 8 GPUs: only a GPU node fits
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message) == (
        3,
        "Error",
        '{"error": "loss is NaN"}',
    )
    assert pod.status.container_statuses[0].state.running is None

    # kwok must leave a finished pod alone: poke it (a metadata change makes kwok re-evaluate its
    # stages) and watch it for a few seconds.
    core.patch_namespaced_pod("trainer", namespace, {"metadata": {"labels": {"poked": "yes"}}})
    seen = []
    for event in watch.Watch().stream(
        core.list_namespaced_pod, namespace, field_selector="metadata.name=trainer", timeout_seconds=3
    ):
        seen.append(event["object"].status.phase)
    assert seen and set(seen) == {"Failed"}


def test_upstream_crds_accept_servicemonitor_and_httproute(kube, namespace):
    custom = client.CustomObjectsApi(kube)
    custom.create_namespaced_custom_object(
        "monitoring.coreos.com",
        "v1",
        namespace,
        "servicemonitors",
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "endpoints": [{"port": "http", "interval": "15s"}],
            },
        },
    )
    custom.create_namespaced_custom_object(
        "monitoring.coreos.com",
        "v1",
        namespace,
        "prometheusrules",
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "web"},
            "spec": {"groups": [{"name": "web", "rules": [{"alert": "Down", "expr": "up == 0"}]}]},
        },
    )
    custom.create_namespaced_custom_object(
        "gateway.networking.k8s.io",
        "v1",
        namespace,
        "httproutes",
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web"},
            "spec": {
                "parentRefs": [{"name": "gw"}],
                "rules": [
                    {
                        "backendRefs": [
                            {"name": "web-stable", "port": 80, "weight": 90},
                            {"name": "web-canary", "port": 80, "weight": 10},
                        ]
                    }
                ],
            },
        },
    )
    route = custom.get_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", namespace, "httproutes", "web"
    )
    assert [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]] == [90, 10]
    # the upstream schema is really there: a negative weight is refused at admission
    with pytest.raises(ApiException) as err:
        custom.create_namespaced_custom_object(
            "gateway.networking.k8s.io",
            "v1",
            namespace,
            "httproutes",
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "bad"},
                "spec": {"rules": [{"backendRefs": [{"name": "x", "port": 80, "weight": -1}]}]},
            },
        )
    assert err.value.status == 422


def test_rbac_is_enforced_for_service_accounts(kube, namespace):
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    path = serviceaccount_kubeconfig(kube, namespace, "nobody")
    sa_api = config.new_client_from_config(config_file=str(path))
    try:
        who = client.AuthenticationV1Api(sa_api).create_self_subject_review(client.V1SelfSubjectReview())
        assert who.status.user_info.username == f"system:serviceaccount:{namespace}:nobody"  # authenticated
        for call in (
            lambda: client.CoreV1Api(sa_api).list_namespaced_secret(namespace),
            lambda: client.CoreV1Api(sa_api).list_secret_for_all_namespaces(),
        ):
            with pytest.raises(ApiException) as err:
                call()
            assert err.value.status == 403
    finally:
        sa_api.close()
        path.unlink()


def test_pod_security_admission_is_enforced(kube, namespace):
    spec = pod_spec()
    spec.containers[0].security_context = client.V1SecurityContext(privileged=True)
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(kube).create_namespaced_pod(
            namespace, client.V1Pod(metadata=client.V1ObjectMeta(name="privileged"), spec=spec)
        )
    assert err.value.status == 403 and "violates PodSecurity" in err.value.body
