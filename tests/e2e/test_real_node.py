"""Pods really run on the real node kiln-real-0: kubelet + containerd + CNI + kube-proxy + CoreDNS."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.integration.helpers import TERMINAL_PHASES, wait_for

from .conftest import REAL_NODE

pytestmark = pytest.mark.e2e


def _pod(
    name: str, image: str, command: str, *, labels=None, restart: str = "Never", volumes=(), **container
) -> dict:
    """A pod that passes PodSecurity `restricted` and lands on the real node only."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": restart,
            "nodeSelector": {"kiln.dev/pool": "real"},
            "tolerations": [{"key": "kiln.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65534,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "terminationGracePeriodSeconds": 1,
            "volumes": list(volumes),
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", command],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    **container,
                }
            ],
        },
    }


def _finished(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 90) -> client.V1Pod:
    def done():
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in TERMINAL_PHASES else None

    return wait_for(done, timeout, message=f"pod {name} to finish")


def test_node_registered_with_pool_label_and_taint(kube, real_cluster):
    node = client.CoreV1Api(kube).read_node(REAL_NODE)
    assert node.metadata.labels["kiln.dev/pool"] == "real"
    assert any(t.key == "kiln.dev/real-node" and t.effect == "NoSchedule" for t in node.spec.taints or [])
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.status == "True", ready.message


def test_termination_message_and_exit_code(kube, namespace, busybox_image):
    core = client.CoreV1Api(kube)
    cmd = "echo 'training finished: loss=0.01' > /dev/termination-log; echo log-line; exit 3"
    core.create_namespaced_pod(namespace, _pod("term", busybox_image, cmd))
    pod = _finished(core, namespace, "term")
    assert pod.spec.node_name == REAL_NODE
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 3
    assert term.message.strip() == "training finished: loss=0.01"
    assert "log-line" in core.read_namespaced_pod_log("term", namespace)  # through the kubelet


def test_pod_to_pod_and_service_dns(kube, namespace, busybox_image):
    core = client.CoreV1Api(kube)
    serve = "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"
    core.create_namespaced_pod(
        namespace,
        _pod(
            "web",
            busybox_image,
            serve,
            labels={"app": "web"},
            restart="Always",
            ports=[{"containerPort": 8080}],
            volumes=[{"name": "www", "emptyDir": {}}],
            volumeMounts=[{"name": "www", "mountPath": "/www"}],
        ),
    )
    web = wait_for(
        lambda: (p := core.read_namespaced_pod("web", namespace)).status.phase == "Running" and p,
        90,
        message="pod web Running",
    )
    assert web.spec.node_name == REAL_NODE
    assert web.status.pod_ip
    core.create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    fqdn = f"web.{namespace}.svc.cluster.local"
    # busybox-static's wget crashes in its static glibc (NSS lookups): plain HTTP over nc instead.
    # By name: busybox's own resolver (nslookup) asks CoreDNS through the kube-dns Service.
    get = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5"
    cmd = (
        f"set -e; a=$({get} {web.status.pod_ip} 8080 | tail -n 1); "
        f"for i in $(seq 20); do svc=$(nslookup {fqdn} | awk '/^Address: /{{ip=$2}} END{{print ip}}'); "
        f'[ -n "$svc" ] && b=$({get} "$svc" 80 | tail -n 1) && [ -n "$b" ] && break; sleep 1; done; '
        'echo "ip=$a svc=$svc:$b" > /dev/termination-log; test -n "$b"'
    )
    core.create_namespaced_pod(namespace, _pod("client", busybox_image, cmd))
    pod = _finished(core, namespace, "client", timeout=120)
    term = pod.status.container_statuses[0].state.terminated
    log = core.read_namespaced_pod_log("client", namespace)
    assert pod.status.phase == "Succeeded", f"{term.message!r} {log}"
    ip_answer, svc_answer = term.message.strip().split(" ")
    assert ip_answer == "ip=hello-from-web"
    svc_ip = core.read_namespaced_service("web", namespace).spec.cluster_ip
    assert svc_answer == f"svc={svc_ip}:hello-from-web"  # the name resolved to the ClusterIP
