"""The Helm chart: it renders, installs, and its ClusterRole is enough for the operator.

The operator runs in-process here (kwok nodes cannot run its image), authenticated as the
chart's ServiceAccount with a TokenRequest token, so every API call it makes is authorized by
the chart's RBAC and nothing else.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from kubernetes import client

from kiln import API_VERSION
from kiln.kube import create, get, list_objects

from .helpers import finish_pod, run_operator, serviceaccount_kubeconfig, wait_for
from .test_trainingjob import JOB, result_message

CHART = Path(__file__).resolve().parents[2] / "charts" / "kiln"


def helm(cluster, *args: str) -> str:
    return subprocess.run([cluster.helm, *args], check=True, capture_output=True, text=True).stdout


def test_chart_lints_and_renders(cluster):
    helm(cluster, "lint", str(CHART))
    docs = [
        d for d in yaml.safe_load_all(helm(cluster, "template", "kiln", str(CHART), "-n", "kiln-system")) if d
    ]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert (
        c["securityContext"]["readOnlyRootFilesystem"]
        and not c["securityContext"]["allowPrivilegeEscalation"]
    )
    assert c["resources"]["limits"] and c["resources"]["requests"]
    monitored = helm(cluster, "template", "kiln", str(CHART), "--set", "metrics.serviceMonitor.enabled=true")
    assert "kind: ServiceMonitor" in monitored


def test_values_schema_rejects_bad_values(cluster):
    r = subprocess.run(
        [cluster.helm, "template", "kiln", str(CHART), "--set", "workers=0"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "workers" in r.stderr


def test_operator_works_with_chart_rbac_only(cluster, kube, namespace, kiln_crds):
    release_ns = namespace
    rendered = helm(
        cluster,
        "template",
        "kiln",
        str(CHART),
        "-n",
        release_ns,
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
    )
    # the ClusterRole(Binding) names are made unique per test namespace
    rendered = rendered.replace("name: kiln\n", f"name: kiln-{release_ns}\n")
    cluster.kubectl_run("apply", "-n", release_ns, "-f", "-", input=rendered)
    try:
        sa = wait_for(
            lambda: client.CoreV1Api(kube).read_namespaced_service_account(f"kiln-{release_ns}", release_ns),
            30,
        )
        kubeconfig = serviceaccount_kubeconfig(kube, release_ns, sa.metadata.name)
        with run_operator(kubeconfig, namespace=namespace) as runner:
            create(
                kube,
                {
                    "apiVersion": API_VERSION,
                    "kind": "Model",
                    "metadata": {"name": "digits", "namespace": namespace},
                    "spec": {},
                },
            )
            body = {
                **JOB,
                "metadata": {"name": "digits", "namespace": namespace},
                "spec": {**JOB["spec"], "numNodes": 1, "modelRef": {"name": "digits"}},
            }
            create(kube, body)
            wait_for(
                lambda: [
                    p
                    for p in list_objects(kube, "v1", "Pod", namespace, "kiln.dev/trainingjob=digits")
                    if p["status"].get("phase") == "Running"
                ],
                60,
                message="pod running",
            )
            finish_pod(kube, namespace, "digits-node-0", exit_code=0, message=result_message())
            wait_for(
                lambda: (
                    (
                        get(kube, API_VERSION, "TrainingJob", namespace, "digits")["status"].get(
                            "registeredVersion"
                        )
                    )
                    == 1
                ),
                60,
                message="version registered",
            )
        assert "Forbidden" not in runner.output and "403" not in runner.output, runner.output[-3000:]
    finally:
        cluster.kubectl_run("delete", "clusterrole,clusterrolebinding", f"kiln-{release_ns}", check=False)
