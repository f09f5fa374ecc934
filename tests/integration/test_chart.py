"""The Helm chart: it renders what the values say, and its RBAC is exactly enough for the operator.

The operator runs as its own process here (``kiln operator``, with the arguments the chart's
Deployment renders; kwok nodes cannot run its image), authenticated as the chart's
ServiceAccount with a TokenRequest token, so every API call it makes is authorized by the
chart's RBAC and nothing else, in both modes: cluster-wide (a ClusterRole) and
``watchNamespaces`` (Roles in those namespaces only).
"""

from __future__ import annotations

import copy
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kiln import API_VERSION
from kiln.conditions import get_condition
from kiln.kube import create, get, list_objects, patch

from .helpers import finish_pod, operator_processes, serviceaccount_kubeconfig, wait_for
from .test_featuregroup import succeed as succeed_featuregroup_run
from .test_inferenceservice import MODEL, Store, create_model, isvc_body, set_production, wait_status
from .test_trainingjob import JOB, result_message

CHART = Path(__file__).resolve().parents[2] / "charts" / "kiln"


def helm(cluster, *args: str) -> str:
    return subprocess.run([cluster.helm, *args], check=True, capture_output=True, text=True).stdout


def render(
    cluster, *values: str, release: str = "kiln", namespace: str = "kiln-system"
) -> list[dict[str, Any]]:
    """``helm template`` with ``--set``/``--set-json`` style arguments; the documents rendered."""
    out = helm(cluster, "template", release, str(CHART), "-n", namespace, *values)
    return [d for d in yaml.safe_load_all(out) if d]


def refused(cluster, *values: str) -> str:
    """stderr of a ``helm template`` the values schema (or a template) must refuse."""
    r = subprocess.run(
        [cluster.helm, "template", "kiln", str(CHART), *values], capture_output=True, text=True
    )
    assert r.returncode != 0, f"helm accepted {values}"
    return r.stderr


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs).get("env", [])}


def test_chart_lints_and_renders(cluster):
    helm(cluster, "lint", str(CHART))
    docs = [
        d for d in yaml.safe_load_all(helm(cluster, "template", "kiln", str(CHART), "-n", "kiln-system")) if d
    ]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Role",  # the leader-election Lease, in the release namespace
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
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

    for values, field in (
        (["--set", "replicaCount=2", "--set", "leaderElection.enabled=false"], "enabled"),
        (["--set", "logFormat=yaml"], "logFormat"),
        (["--set", "artifacts.s3.bucket=Not_A_Bucket"], "bucket"),
        (["--set", "artifacts.s3.endpoint=versitygw:7070"], "endpoint"),
        (["--set", "artifacts.s3.secretName=Bad_Name"], "secretName"),
        (["--set", "artifacts.s3.keyId=AKIA"], "keyId"),  # no credentials in values, ever
        # client-go's checks, at install time instead of a crash-looping operator
        (["--set", "leaderElection.renewDeadlineSeconds=15"], "leaseDurationSeconds must exceed"),
        (["--set", "leaderElection.retryPeriodSeconds=9"], "1.2 x retryPeriodSeconds"),
    ):
        assert field in refused(cluster, *values), values


def test_high_availability_defaults(cluster):
    docs = render(cluster)
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    args = container(docs)["args"]
    assert {
        "--leader-elect",
        "--leader-elect-lease-name=kiln",
        "--leader-elect-namespace=kiln-system",
        "--leader-elect-lease-duration=15",
        "--leader-elect-renew-deadline=10",
        "--leader-elect-retry-period=2",
        "--log-format=json",
    } <= set(args)
    assert env(docs)["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    (term,) = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    lease_role = next(d for d in docs if d["kind"] == "Role")
    assert lease_role["metadata"]["namespace"] == "kiln-system"
    assert {r["resources"][0] for r in lease_role["rules"]} == {"leases"}

    single = render(cluster, "--set", "replicaCount=1", "--set", "leaderElection.enabled=false")
    assert not [d for d in single if d["kind"] in ("PodDisruptionBudget", "Role")]  # no PDB blocking drains
    assert one(single, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not [a for a in container(single)["args"] if a.startswith("--leader-elect")]
    custom = render(cluster, "--set-json", 'affinity={"nodeAffinity": {}}', "--set", "logFormat=text")
    assert one(custom, "Deployment")["spec"]["template"]["spec"]["affinity"] == {"nodeAffinity": {}}
    assert "--log-format=text" in container(custom)["args"]


def test_features_image_default(cluster):
    """Materialization Jobs without spec.materialization.image run the chart's features image."""
    assert env(render(cluster))["KILN_FEATURES_IMAGE"] == "ghcr.io/kiln-dev/kiln-trainer:0.1.0"
    custom = render(
        cluster, "--set", "features.image.repository=reg/trainer", "--set", "features.image.tag=v2"
    )
    assert env(custom)["KILN_FEATURES_IMAGE"] == "reg/trainer:v2"
    assert "KILN_FEATURES_IMAGE" not in env(render(cluster, "--set", "features.image.repository="))


def rbac_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]]


def test_rbac_is_namespaced_with_watch_namespaces_and_never_reads_secrets(cluster):
    clusterwide = render(cluster)
    namespaced = render(cluster, "--set-json", 'watchNamespaces=["team-a","team-b"]')
    for docs in (clusterwide, namespaced):
        for rule in rbac_rules(docs):
            assert "secrets" not in rule["resources"] and "*" not in rule["resources"] + rule["verbs"], rule
            assert "*" not in rule["apiGroups"]
    assert not [d for d in namespaced if d["kind"].startswith("Cluster")]
    roles = {
        (d["kind"], d["metadata"]["namespace"], d["metadata"]["name"])
        for d in namespaced
        if "Role" in d["kind"]
    }
    assert roles == {
        ("Role", "team-a", "kiln"),
        ("RoleBinding", "team-a", "kiln"),
        ("Role", "team-b", "kiln"),
        ("RoleBinding", "team-b", "kiln"),
        ("Role", "kiln-system", "kiln-leader-election"),
        ("RoleBinding", "kiln-system", "kiln-leader-election"),
    }
    for d in namespaced:
        if d["kind"] == "RoleBinding":
            assert d["subjects"] == [{"kind": "ServiceAccount", "name": "kiln", "namespace": "kiln-system"}]
    assert {"--namespace=team-a", "--namespace=team-b"} <= set(container(namespaced)["args"])
    # the cluster-wide role only adds read access to CRDs (kopf's resource scanning) and to
    # Kueue's cluster-scoped objects (priority classes, ResourceFlavors: docs/kueue.md)
    extra = [r for r in rbac_rules(clusterwide) if r not in rbac_rules(namespaced)]
    kueue_reads = [
        {
            "apiGroups": ["kueue.x-k8s.io"],
            "resources": ["resourceflavors", "workloadpriorityclasses"],
            "verbs": ["get"],
        },
        {"apiGroups": ["scheduling.k8s.io"], "resources": ["priorityclasses"], "verbs": ["get"]},
    ]
    assert extra == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch"],
        },
        *kueue_reads,
    ]
    # with watchNamespaces, those reads only when asked for, as their own read-only ClusterRole
    opted = render(cluster, "--set-json", 'watchNamespaces=["team-a"]', "--set", "kueue.clusterReads=true")
    cluster_roles = [d for d in opted if d["kind"] == "ClusterRole"]
    assert [(d["metadata"]["name"], d["rules"]) for d in cluster_roles] == [
        ("kiln-kueue-reader", kueue_reads)
    ]


def test_s3_values_render_the_storage_contract(cluster):
    """/work/notes/S3-CONTRACT.md: the operator's environment for an S3 artifact store."""
    docs = render(
        cluster,
        "--set",
        "artifacts.s3.bucket=kiln-artifacts",
        "--set",
        "artifacts.s3.prefix=/models/",
        "--set",
        "artifacts.s3.endpoint=http://versitygw.storage:7070",
        "--set",
        "artifacts.s3.region=us-east-1",
        "--set",
        "artifacts.s3.secretName=kiln-s3",
    )
    e = env(docs)
    assert e["KILN_ARTIFACT_ROOT"] == "s3://kiln-artifacts/models"
    assert e["KILN_STORAGE_SECRET_NAME"] == "kiln-s3"
    assert e["AWS_ENDPOINT_URL"] == "http://versitygw.storage:7070"
    assert e["AWS_REGION"] == "us-east-1"
    assert container(docs)["envFrom"] == [{"secretRef": {"name": "kiln-s3"}}]
    assert [m["name"] for m in container(docs)["volumeMounts"]] == ["tmp"]  # no volume needed

    # IRSA / workload identity: a bucket and nothing else
    irsa = render(cluster, "--set", "artifacts.s3.bucket=kiln-artifacts")
    e = env(irsa)
    assert e["KILN_ARTIFACT_ROOT"] == "s3://kiln-artifacts"
    assert not {"KILN_STORAGE_SECRET_NAME", "AWS_ENDPOINT_URL", "AWS_REGION"} & set(e)
    assert "envFrom" not in container(irsa)

    # a volume (file://) for single-node use
    vol = render(cluster, "--set-json", 'artifacts.volume={"persistentVolumeClaim":{"claimName":"kiln"}}')
    assert env(vol)["KILN_ARTIFACT_ROOT"] == "file:///var/lib/kiln/artifacts"
    assert {"name": "artifacts", "mountPath": "/var/lib/kiln/artifacts"} in container(vol)["volumeMounts"]
    assert "KILN_ARTIFACT_ROOT" not in env(render(cluster))  # nothing configured: nothing claimed


# --------------------------------------------------------------------------------------------
# the operator with exactly the chart's RBAC


def can(
    kube: client.ApiClient, user: str, verb: str, resource: str, namespace: str | None = None, group: str = ""
) -> bool:
    """The API server's own answer (SubjectAccessReview) to "may ``user`` ``verb`` ``resource``?"."""
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", "system:authenticated"],
            resource_attributes=client.V1ResourceAttributes(
                verb=verb, resource=resource, group=group, namespace=namespace
            ),
        )
    )
    return bool(client.AuthorizationV1Api(kube).create_subject_access_review(review).status.allowed)


def exercise_every_kind(kube: client.ApiClient, ns: str, store: Store) -> None:
    """TrainingJob (gang, registration, TTL), Model retraining (creates a TrainingJob),
    InferenceService (every child, a canary, deletions), FeatureGroup (materialization Jobs and
    their pods' results, the CronJob)."""
    # TrainingJob: Service + pods, registration in its Model, ttlSecondsAfterFinished deletes it
    assert create(
        kube,
        {
            "apiVersion": API_VERSION,
            "kind": "Model",
            "metadata": {"name": "trained", "namespace": ns},
            "spec": {},
        },
    )
    job = copy.deepcopy(JOB)
    job["metadata"] = {"name": "train", "namespace": ns}
    job["spec"].update(numNodes=1, modelRef={"name": "trained"}, ttlSecondsAfterFinished=2)
    create(kube, job)
    wait_for(
        lambda: [
            p
            for p in list_objects(kube, "v1", "Pod", ns, "kiln.dev/trainingjob=train")
            if p["status"].get("phase") == "Running"
        ],
        60,
        message="the training pod running",
    )
    assert get(kube, "v1", "Service", ns, "train") is not None
    finish_pod(kube, ns, "train-node-0", exit_code=0, message=result_message())
    wait_for(
        lambda: (
            ((get(kube, API_VERSION, "Model", ns, "trained") or {}).get("status") or {}).get("latestVersion")
            == 1
        ),
        60,
        message="version 1 registered",
    )
    wait_for(
        lambda: get(kube, API_VERSION, "TrainingJob", ns, "train") is None,
        60,
        message="the TTL to delete the job",
    )
    # Model spec.retraining: a request makes the operator create a TrainingJob
    template = {k: v for k, v in job["spec"].items() if k not in ("modelRef", "ttlSecondsAfterFinished")}
    patch(
        kube, API_VERSION, "Model", ns, "trained", {"spec": {"retraining": {"template": {"spec": template}}}}
    )
    wait_for(
        lambda: ((get(kube, API_VERSION, "Model", ns, "trained") or {}).get("status") or {}).get(
            "retraining"
        ),
        30,
        message="retraining enabled",
    )
    patch(
        kube,
        API_VERSION,
        "Model",
        ns,
        "trained",
        {"metadata": {"annotations": {"kiln.dev/retrain-requested-at": "now"}}},
    )
    wait_for(
        lambda: get(kube, API_VERSION, "TrainingJob", ns, "trained-retrain-1") is not None,
        30,
        message="the retraining TrainingJob",
    )

    # InferenceService: Deployments, Services, ServiceMonitor, HPA, HTTPRoute; a canary promoted
    create_model(kube, ns, [store.version(1)], production=1)
    body = isvc_body(
        ns,
        rollout={
            "trafficRouting": "GatewayAPI",
            "gatewayAPI": {"parentRefs": [{"name": "web"}]},
            "steps": [{"weight": 50, "pauseSeconds": 0}],
        },
        autoscaling={"minReplicas": 1, "maxReplicas": 2},
        monitoring={
            "serviceMonitor": {"labels": {"release": "prometheus"}},
            "alerts": {"errorRatio": {"threshold": 0.1}},
        },
    )
    assert create(kube, body)

    def ready(s: dict[str, Any]) -> bool:
        return (get_condition(s.get("conditions"), "Ready") or {}).get("status") == "True"

    wait_status(kube, ns, ready, 90, message="InferenceService Ready=True")
    for api_version, kind, name in (
        ("apps/v1", "Deployment", f"{MODEL}-stable"),
        ("v1", "Service", MODEL),
        ("monitoring.coreos.com/v1", "ServiceMonitor", MODEL),
        ("monitoring.coreos.com/v1", "PrometheusRule", MODEL),
        ("autoscaling/v2", "HorizontalPodAutoscaler", MODEL),
        ("gateway.networking.k8s.io/v1", "HTTPRoute", MODEL),
    ):
        assert get(kube, api_version, kind, ns, name) is not None, kind
    set_production(kube, ns, [store.version(1), store.version(2)], production=2)
    wait_status(
        kube,
        ns,
        lambda s: s.get("rolloutPhase") == "Promoted" and s.get("stableVersion") == 2,
        90,
        message="v2 promoted",
    )
    wait_for(
        lambda: get(kube, "apps/v1", "Deployment", ns, f"{MODEL}-canary") is None,
        30,
        message="canary deleted",
    )
    # every child kind no longer wanted is deleted (merge patch: null removes a field)
    patch(
        kube,
        API_VERSION,
        "InferenceService",
        ns,
        MODEL,
        {
            "spec": {
                "autoscaling": None,
                "rollout": {"trafficRouting": "ReplicaRatio", "gatewayAPI": None},
                "monitoring": {"serviceMonitor": {"enabled": False}, "alerts": None},
            }
        },
    )
    for api_version, kind in (
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ):
        wait_for(lambda: get(kube, api_version, kind, ns, MODEL) is None, 30, message=f"{kind} deleted")  # noqa: B023

    # FeatureGroup: a materialization Job, deleted when new definitions make it stale; the next
    # one's result read from its pod; the schedule's CronJob applied, then deleted with the schedule
    fg = yaml.safe_load((CHART.parents[1] / "examples" / "featuregroup.yaml").read_text())
    fg["metadata"]["namespace"] = ns
    name = fg["metadata"]["name"]
    assert create(kube, fg)

    def materialization_jobs() -> list[dict[str, Any]]:
        return list_objects(kube, "batch/v1", "Job", ns, f"kiln.dev/featuregroup={name}")

    (stale,) = wait_for(materialization_jobs, 30, message="the backfill Job")
    features = copy.deepcopy(fg["spec"]["features"])
    features[0]["description"] = "Orders in the last 7 days, returns excluded."
    patch(kube, API_VERSION, "FeatureGroup", ns, name, {"spec": {"features": features}})
    (job,) = wait_for(
        lambda: [j for j in materialization_jobs() if j["metadata"]["uid"] != stale["metadata"]["uid"]],
        30,
        message="the stale Job replaced",
    )
    wait_for(
        lambda: get(kube, "batch/v1", "Job", ns, stale["metadata"]["name"]) is None,
        30,
        message="stale Job deleted",
    )
    succeed_featuregroup_run(kube, ns, job)
    wait_for(lambda: get(kube, "batch/v1", "CronJob", ns, name), 30, message="the schedule's CronJob")
    # the CronJob follows spec.schedule alone; the run's result reaches the status on a later reconcile
    wait_for(
        lambda: ((get(kube, API_VERSION, "FeatureGroup", ns, name) or {}).get("status") or {}).get(
            "lastMaterializationTime"
        ),
        30,
        message="the run's result in the FeatureGroup's status",
    )
    patch(kube, API_VERSION, "FeatureGroup", ns, name, {"spec": {"schedule": None}})
    wait_for(lambda: get(kube, "batch/v1", "CronJob", ns, name) is None, 30, message="the CronJob deleted")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("chart-artifacts"))


@pytest.mark.parametrize("mode", ["cluster-wide", "watchNamespaces"])
def test_every_kind_runs_with_exactly_the_chart_rbac(
    mode, cluster, kube, namespace, kiln_crds, store, tmp_path
):
    """Every kind, InferenceService children included, as the chart's ServiceAccount, in both RBAC modes.

    Cluster-wide mode still runs the operator on the test namespace only (``--namespace``): on a
    cluster shared with other test sessions, an all-namespaces operator would reconcile theirs.
    """
    watched = namespace
    release = f"kiln-{secrets.token_hex(3)}"  # the release's full name: cluster-scoped names are unique
    core = client.CoreV1Api(kube)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=release, labels={"kiln.dev/test": "true"}))
    )
    values = ["--set-json", f'watchNamespaces=["{watched}"]'] if mode == "watchNamespaces" else []
    docs = render(cluster, *values, release=release, namespace=release)
    try:
        manifests = [
            d
            for d in docs
            if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
        ]
        cluster.kubectl_run("apply", "-f", "-", input=yaml.safe_dump_all(manifests))
        user = f"system:serviceaccount:{release}:{release}"
        assert not can(kube, user, "get", "secrets", watched) and not can(kube, user, "list", "secrets")
        assert can(kube, user, "create", "pods", watched)
        if mode == "watchNamespaces":
            assert not can(kube, user, "list", "pods") and not can(kube, user, "create", "pods", release)
            assert not can(kube, user, "list", "customresourcedefinitions", group="apiextensions.k8s.io")
        sa = wait_for(lambda: core.read_namespaced_service_account(release, release), 30)
        kubeconfig = serviceaccount_kubeconfig(kube, release, sa.metadata.name)
        args = [a for a in container(docs)["args"] if a != "operator"]
        if mode == "cluster-wide":
            args.append(f"--namespace={watched}")
        with operator_processes(kubeconfig, args, ["op"], release, tmp_path) as (op,):
            wait_for(op.healthy, 60, message="the operator's /healthz")
            lease = wait_for(
                lambda: client.CoordinationV1Api(kube).read_namespaced_lease(release, release),
                60,
                message="the Lease",
            )
            assert lease.spec.holder_identity.startswith("op_")
            exercise_every_kind(kube, watched, store)
            log = op.log()
        assert "Forbidden" not in log and " 403" not in log, log[-5000:]
    finally:
        cluster.kubectl_run(
            "delete", "clusterrole,clusterrolebinding", release, "--ignore-not-found", check=False
        )
        core.delete_namespace(release)
