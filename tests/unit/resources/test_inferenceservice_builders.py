"""Pure builders of an InferenceService's children (kiln.resources.inferenceservice)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.api.inferenceservice import InferenceServiceSpec
from kiln.resources import inferenceservice as build
from kiln.resources.storage import StorageDefaults
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden"
DIGEST = "sha256:" + "ab" * 32
ISVC: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "digits", "namespace": "ml", "uid": "0c8e6a1e-1111-2222-3333-444455556666"},
}
SPEC: dict[str, Any] = {
    "modelRef": {"name": "digits-model", "stage": "Production"},
    "runtime": {
        "image": "kiln/server:dev",
        "maxBatchSize": 16,
        "maxBatchDelayMilliseconds": 5,
        "cacheSize": 128,
        "artifactVolume": {"persistentVolumeClaim": {"claimName": "artifacts", "readOnly": True}},
        "env": [{"name": "KILN_LOG_LEVEL", "value": "DEBUG"}],
    },
    "replicas": 4,
    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
    "nodeSelector": {"kiln.dev/pool": "serving"},
    "tolerations": [{"key": "kiln.dev/serving", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "serving-high",
    "serviceAccountName": "digits-server",
    "monitoring": {"serviceMonitor": {"labels": {"release": "prometheus"}, "intervalSeconds": 10}},
}
GATEWAY = {
    "trafficRouting": "GatewayAPI",
    "gatewayAPI": {"parentRefs": [{"name": "web", "namespace": "gw"}], "hostnames": ["digits.example.com"]},
}


def spec(**over: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({**SPEC, **over})


def golden(name: str, obj: Any) -> None:
    assert_golden(GOLDEN, name, obj)


def by_kind(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def test_replica_ratio_children_golden():
    objs = build.children(
        ISVC,
        spec(),
        stable=(1, "file:///var/lib/kiln/artifacts/digits/v1", DIGEST),
        stable_replicas=3,
        canary=(2, "file:///var/lib/kiln/artifacts/digits/v2", DIGEST),
        canary_replicas=1,
        canary_weight=20,
    )
    golden("inferenceservice-replicaratio", objs)
    assert sorted(by_kind(objs)) == [
        ("Deployment", "digits-canary"),
        ("Deployment", "digits-stable"),
        ("Service", "digits"),
        ("ServiceMonitor", "digits"),
    ]


def test_gateway_api_children_golden():
    objs = build.children(
        ISVC,
        spec(rollout=GATEWAY),
        stable=(1, "file:///a/1", DIGEST),
        stable_replicas=4,
        canary=(2, "file:///a/2", DIGEST),
        canary_replicas=1,
        canary_weight=20,
    )
    kinds = by_kind(objs)
    golden("inferenceservice-httproute", kinds[("HTTPRoute", "digits")])
    assert sorted(kinds) == [
        ("Deployment", "digits-canary"),
        ("Deployment", "digits-stable"),
        ("HTTPRoute", "digits"),
        ("Service", "digits"),
        ("Service", "digits-canary"),
        ("Service", "digits-stable"),
        ("ServiceMonitor", "digits"),
    ]
    backends = kinds[("HTTPRoute", "digits")]["spec"]["rules"][0]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in backends] == [("digits-stable", 80), ("digits-canary", 20)]
    # the shared Service is stable-only (in-cluster callers bypass the gateway) and not scraped,
    # the per-track Services are: every pod is scraped exactly once
    main = kinds[("Service", "digits")]
    assert main["spec"]["selector"] == {build.LABEL_ISVC: "digits", build.LABEL_TRACK: "stable"}
    assert build.LABEL_SCRAPE not in main["metadata"]["labels"]
    for track in ("stable", "canary"):
        svc = kinds[("Service", f"digits-{track}")]
        assert svc["spec"]["selector"] == {build.LABEL_ISVC: "digits", build.LABEL_TRACK: track}
        assert svc["metadata"]["labels"][build.LABEL_SCRAPE] == "true"


def test_gateway_api_without_canary_routes_everything_to_stable():
    objs = by_kind(
        build.children(ISVC, spec(rollout=GATEWAY), stable=(1, "file:///a/1", DIGEST), stable_replicas=4)
    )
    assert ("Service", "digits-canary") not in objs and ("Deployment", "digits-canary") not in objs
    backends = objs[("HTTPRoute", "digits")]["spec"]["rules"][0]["backendRefs"]
    assert backends == [{"name": "digits-stable", "port": 80, "weight": 100}]


def test_pod_is_hardened_and_probed():
    dep = build.deployment(ISVC, spec(), "canary", 7, "file:///var/lib/kiln/artifacts/d/7", DIGEST, 2)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8080,
        "grpc": 8081,
        "metrics": 9090,
    }
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env[build.ENV_SHUTDOWN_DELAY] == str(build.SHUTDOWN_DELAY_SECONDS)
    assert pod["terminationGracePeriodSeconds"] > build.SHUTDOWN_DELAY_SECONDS + build.DRAIN_TIMEOUT_SECONDS
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["artifacts"] == {
        "name": "artifacts",
        "mountPath": "/var/lib/kiln/artifacts",
        "readOnly": True,
    }
    assert {
        "name": "artifacts",
        "persistentVolumeClaim": {"claimName": "artifacts", "readOnly": True},
    } in pod["volumes"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels[build.LABEL_TRACK] == "canary" and labels[build.LABEL_VERSION] == "7"
    assert labels[build.LABEL_ISVC] == "digits"
    assert dep["spec"]["selector"]["matchLabels"] == {build.LABEL_ISVC: "digits", build.LABEL_TRACK: "canary"}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert dep["metadata"]["ownerReferences"][0]["uid"] == ISVC["metadata"]["uid"]


def test_both_tracks_get_the_same_placement():
    objs = by_kind(
        build.children(
            ISVC,
            spec(),
            stable=(1, "u1", DIGEST),
            stable_replicas=3,
            canary=(2, "u2", DIGEST),
            canary_replicas=1,
        )
    )
    for track in ("stable", "canary"):
        pod = objs[("Deployment", f"digits-{track}")]["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"kiln.dev/pool": "serving"}
        # CPU only: the user's toleration, no GPU one
        assert pod["tolerations"] == SPEC["tolerations"]
        assert pod["priorityClassName"] == "serving-high"
        assert pod["serviceAccountName"] == "digits-server"
        assert pod["automountServiceAccountToken"] is False


PLACEMENT = ("nodeSelector", "tolerations", "priorityClassName", "serviceAccountName")


def test_placement_fields_are_omitted_when_unset():
    bare = InferenceServiceSpec.model_validate({k: v for k, v in SPEC.items() if k not in PLACEMENT})
    pod = build.deployment(ISVC, bare, "stable", 1, "u", DIGEST, 1)["spec"]["template"]["spec"]
    assert not set(PLACEMENT) & set(pod)


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("resources", "tolerations", "expected"),
    [
        # a GPU limit adds the nvidia.com/gpu toleration after the user's
        ({"limits": {"nvidia.com/gpu": 1}}, None, [GPU_TOLERATION]),
        (
            {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
            [{"key": "kiln.dev/serving", "operator": "Exists"}],
            [{"key": "kiln.dev/serving", "operator": "Exists"}, GPU_TOLERATION],
        ),
        # already tolerated: by key, or by an empty key with Exists (tolerates everything)
        (
            {"limits": {"nvidia.com/gpu": 1}},
            [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
            [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
        ),
        ({"limits": {"nvidia.com/gpu": 1}}, [{"operator": "Exists"}], [{"operator": "Exists"}]),
        # no GPU, no toleration
        ({"limits": {"cpu": "2"}}, None, None),
    ],
)
def test_gpu_toleration(resources: dict, tolerations: list | None, expected: list | None):
    over: dict[str, Any] = {"resources": resources}
    over["tolerations"] = tolerations
    s = spec(**over)
    for track in ("stable", "canary"):
        pod = build.deployment(ISVC, s, track, 1, "u", DIGEST, 1)["spec"]["template"]["spec"]
        assert pod.get("tolerations") == expected


def test_server_env():
    env = {e["name"]: e["value"] for e in build.server_env(spec(), 3, "file:///x/3", DIGEST)}
    assert env == {
        "KILN_ARTIFACT_URI": "file:///x/3",
        "KILN_ARTIFACT_DIGEST": DIGEST,
        "KILN_MODEL_NAME": "digits-model",
        "KILN_MODEL_VERSION": "3",
        "KILN_PORT": "8080",
        "KILN_GRPC_PORT": "8081",
        "KILN_METRICS_PORT": "9090",
        "KILN_MAX_BATCH_SIZE": "16",
        "KILN_MAX_BATCH_DELAY_MS": "5",
        "KILN_CACHE_SIZE": "128",
        "KILN_SHUTDOWN_DELAY_SECONDS": "5",
        "KILN_DRAIN_TIMEOUT_SECONDS": "30",
        "KILN_LOG_LEVEL": "DEBUG",
    }
    over = spec(runtime={**SPEC["runtime"], "env": [{"name": "KILN_MAX_BATCH_SIZE", "value": "1"}]})
    env_list = build.server_env(over, 3, "u", DIGEST)
    assert [e["value"] for e in env_list if e["name"] == "KILN_MAX_BATCH_SIZE"] == [
        "1"
    ]  # overridden, not duplicated


def test_env_names_match_the_model_server():
    settings = pytest.importorskip("kiln.server.settings")
    known = set(settings.ENV_VARS.values())
    ours = {e["name"] for e in build.server_env(spec(runtime={"image": "i"}), 1, "u", DIGEST)}
    assert ours <= known, ours - known


def test_services_expose_grpc_beside_http():
    """Every Service of an InferenceService carries the gRPC port, named and marked as HTTP/2 cleartext."""
    for s, count in ((spec(), 1), (spec(rollout=GATEWAY), 3)):
        objs = by_kind(
            build.children(
                ISVC,
                s,
                stable=(1, "u", DIGEST),
                stable_replicas=1,
                canary=(2, "v", DIGEST),
                canary_replicas=1,
            )
        )
        services = [o for (kind, _), o in objs.items() if kind == "Service"]
        assert len(services) == count
        for svc in services:
            ports = {p["name"]: p for p in svc["spec"]["ports"]}
            assert ports["grpc"] == {
                "name": "grpc",
                "port": 8081,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "kubernetes.io/h2c",
            }
            assert ports["http"]["port"] == 80 and "appProtocol" not in ports["http"]


def test_hpa_owns_stable_replicas():
    s = spec(autoscaling={"minReplicas": 2, "maxReplicas": 10, "targetCPUUtilizationPercentage": 70})
    objs = by_kind(build.children(ISVC, s, stable=(1, "u", DIGEST), stable_replicas=None))
    assert "replicas" not in objs[("Deployment", "digits-stable")]["spec"]
    hpa = objs[("HorizontalPodAutoscaler", "digits")]
    golden("inferenceservice-hpa", hpa)
    assert hpa["spec"]["scaleTargetRef"]["name"] == "digits-stable"


def test_service_monitor_can_be_disabled_and_selects_scraped_services():
    s = spec(monitoring={"serviceMonitor": {"enabled": False}})
    assert ("ServiceMonitor", "digits") not in by_kind(
        build.children(ISVC, s, stable=(1, "u", DIGEST), stable_replicas=1)
    )
    sm = build.service_monitor(ISVC, spec())
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["selector"]["matchLabels"] == {build.LABEL_ISVC: "digits", build.LABEL_SCRAPE: "true"}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "10s"}]


def test_every_child_is_labelled_and_owned():
    objs = build.children(
        ISVC,
        spec(
            rollout=GATEWAY,
            autoscaling={"maxReplicas": 3},
            monitoring={"alerts": {"errorRatio": {"threshold": 0.1}}},
            runtime={
                "engine": "vllm",
                "image": "kiln/llm:dev",
                "llm": {"inferencePool": {"endpointPickerRef": {"name": "epp"}}},
            },
        ),
        stable=(1, "u", DIGEST),
        stable_replicas=None,
        canary=(2, "u2", DIGEST),
        canary_replicas=1,
        canary_weight=50,
    )
    assert {(o["apiVersion"], o["kind"]) for o in objs} == set(build.CHILD_KINDS)
    for o in objs:
        assert o["metadata"]["labels"][build.LABEL_ISVC] == "digits"
        assert o["metadata"]["ownerReferences"][0]["controller"] is True


def test_url_and_names():
    assert (
        build.url("digits", "ml", "digits-model")
        == "http://digits.ml.svc.cluster.local/v2/models/digits-model"
    )
    long = "x" * 60
    assert len(build.deployment_name(long, "canary")) <= 63
    assert build.deployment_name(long, "canary") != build.deployment_name(long, "stable")


def test_s3_artifact_gets_a_storage_initializer():
    s = spec(
        storage={"secretRef": {"name": "team-s3"}},
        resources={"limits": {"nvidia.com/gpu": 1, "memory": "1Gi"}},
    )
    d = StorageDefaults(endpoint="http://s3.kiln-s3.svc:9000", region="us-east-1", secret_name="kiln-s3")
    dep = build.deployment(ISVC, s, build.STABLE, 3, "s3://models/digits/digits-v3", DIGEST, 2, d)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    assert init["name"] == "storage-initializer" and init["args"] == ["--fetch-only"]
    assert init["image"] == server["image"]
    init_env = {e["name"]: e["value"] for e in init["env"]}
    server_env = {e["name"]: e["value"] for e in server["env"]}
    assert init_env["KILN_ARTIFACT_URI"] == server_env["KILN_ARTIFACT_URI"] == "s3://models/digits/digits-v3"
    assert init_env["KILN_MODEL_DIR"] == server_env["KILN_MODEL_DIR"] == build.MODEL_DIR
    assert init_env["AWS_ENDPOINT_URL"] == "http://s3.kiln-s3.svc:9000"
    assert init["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    # Only the initializer holds the store's credentials; the server reads the verified copy.
    assert "envFrom" not in server and "AWS_ENDPOINT_URL" not in server_env
    assert {"name": "model", "mountPath": build.MODEL_DIR, "readOnly": True} in server["volumeMounts"]
    assert {"name": "model", "mountPath": build.MODEL_DIR} in init["volumeMounts"]
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert "artifacts" not in {v["name"] for v in pod["volumes"]}  # artifactVolume is for file://
    assert init["resources"] == {"limits": {"memory": "1Gi"}}  # no GPU for a download


def test_file_artifact_has_no_initializer():
    dep = build.deployment(ISVC, spec(), build.STABLE, 3, "file:///var/lib/kiln/artifacts/d/v3", DIGEST, 2)
    assert "initContainers" not in dep["spec"]["template"]["spec"]
