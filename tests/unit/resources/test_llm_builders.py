"""Pure builders of an LLM InferenceService (runtime.engine vllm): kiln.resources.llm and the
LLM branches of kiln.resources.inferenceservice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kiln.api.inferenceservice import InferenceServiceSpec
from kiln.resources import inferenceservice as build
from kiln.resources import llm
from kiln.resources.storage import StorageDefaults
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden"
DIGEST = "sha256:" + "cd" * 32
ISVC: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat", "namespace": "ml", "uid": "0c8e6a1e-1111-2222-3333-444455556666"},
}
SPEC: dict[str, Any] = {
    "modelRef": {"name": "tiny-llama", "stage": "Production"},
    "runtime": {
        "engine": "vllm",
        "image": "kiln/llm:dev",
        "llm": {"maxModelLen": 4096, "dtype": "bfloat16", "quantization": "awq", "maxNumSeqs": 64},
        "env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
    },
    "replicas": 2,
    "resources": {"limits": {"nvidia.com/gpu": "2", "memory": "32Gi"}, "requests": {"cpu": "4"}},
    "monitoring": {"serviceMonitor": {"labels": {"release": "prometheus"}}},
}
S3 = "s3://models/tiny-llama/v3"
FILE = "file:///var/lib/kiln/artifacts/tiny-llama/v3"


def spec(**over: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({**SPEC, **over})


def runtime(**over: Any) -> dict[str, Any]:
    return {**SPEC["runtime"], **over}


def by_kind(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def pod(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]


def test_llm_children_golden():
    """s3:// artifact, 2 GPUs, every runtime.llm setting, an InferencePool, a canary."""
    s = spec(
        runtime=runtime(
            llm={**SPEC["runtime"]["llm"], "inferencePool": {"endpointPickerRef": {"name": "epp"}}}
        )
    )
    objs = build.children(
        ISVC,
        s,
        stable=(3, S3, DIGEST),
        stable_replicas=2,
        canary=(4, S3 + "-4", "sha256:" + "ef" * 32),
        canary_replicas=1,
        defaults=StorageDefaults(endpoint="http://minio:9000", secret_name="s3-creds"),
    )
    assert_golden(GOLDEN, "inferenceservice-llm", objs)
    assert sorted(by_kind(objs)) == [
        ("Deployment", "chat-canary"),
        ("Deployment", "chat-stable"),
        ("InferencePool", "chat"),
        ("Service", "chat"),
        ("ServiceMonitor", "chat"),
    ]


def test_engine_container_renders_the_openai_server():
    dep = build.deployment(ISVC, spec(), build.STABLE, 3, S3, DIGEST, 2)
    (c,) = pod(dep)["containers"]
    assert c["name"] == build.CONTAINER
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = c["args"]
    assert args[: args.index("--shutdown-timeout") + 2] == [
        "--model",
        f"{build.MODEL_DIR}/{'cd' * 32}",
        "--served-model-name",
        "tiny-llama",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--load-format",
        "safetensors",
        "--shutdown-timeout",
        str(llm.DRAIN_SECONDS),
    ]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--dtype"] == "bfloat16"
    assert flags["--max-model-len"] == "4096"
    assert flags["--quantization"] == "awq"
    assert flags["--max-num-seqs"] == "64"
    assert flags["--tensor-parallel-size"] == "2"  # the GPUs asked for
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert env[build.ENV_ARTIFACT_URI] == S3 and env[build.ENV_ARTIFACT_DIGEST] == DIGEST
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod(dep)["terminationGracePeriodSeconds"] == llm.TERMINATION_GRACE_SECONDS
    assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": llm.PRESTOP_SLEEP_SECONDS}}


def test_s3_model_is_fetched_and_verified_by_kiln_serve():
    dep = build.deployment(ISVC, spec(), build.STABLE, 3, S3, DIGEST, 2, StorageDefaults(secret_name="creds"))
    (init,) = pod(dep)["initContainers"]
    assert init["name"] == build.STORAGE_INITIALIZER
    assert init["image"] == "kiln/llm:dev"
    assert init["command"] == ["kiln-serve"] and init["args"] == ["--fetch-only"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env[build.ENV_ARTIFACT_URI] == S3 and env[build.ENV_MODEL_DIR] == build.MODEL_DIR
    assert init["envFrom"] == [{"secretRef": {"name": "creds", "optional": True}}]
    assert "nvidia.com/gpu" not in init["resources"]["limits"]  # GPUs stay with the engine
    assert {"name": build.MODEL_VOLUME, "mountPath": build.MODEL_DIR} in init["volumeMounts"]  # it writes
    engine_mount = {"name": build.MODEL_VOLUME, "mountPath": build.MODEL_DIR, "readOnly": True}
    assert engine_mount in pod(dep)["containers"][0]["volumeMounts"]
    # only the fetcher gets the store's credentials
    assert "envFrom" not in pod(dep)["containers"][0]


def test_file_model_is_verified_in_place_on_the_artifact_volume():
    vol = {"persistentVolumeClaim": {"claimName": "artifacts", "readOnly": True}}
    s = spec(runtime=runtime(artifactVolume=vol, storageInitializerImage="kiln/server:dev"))
    dep = build.deployment(ISVC, s, build.STABLE, 3, FILE, DIGEST, 2)
    (c,) = pod(dep)["containers"]
    assert c["args"][1] == "/var/lib/kiln/artifacts/tiny-llama/v3"
    (init,) = pod(dep)["initContainers"]
    assert init["image"] == "kiln/server:dev"
    mount = {"name": "artifacts", "mountPath": "/var/lib/kiln/artifacts", "readOnly": True}
    assert mount in init["volumeMounts"] and mount in c["volumeMounts"]
    assert {"name": "artifacts", **vol} in pod(dep)["volumes"]


def test_no_tensor_parallelism_without_gpus_and_defaults_without_llm_block():
    s = spec(resources={"requests": {"cpu": "2"}}, runtime={"engine": "vllm", "image": "kiln/llm:dev"})
    args = build.deployment(ISVC, s, build.STABLE, 1, FILE, DIGEST, 1)["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--tensor-parallel-size" not in args and "--dtype" not in args
    assert llm.tensor_parallel_size(s) == 1
    extra = spec(runtime=runtime(llm={"extraArgs": ["--enable-prefix-caching"], "dtype": "float32"}))
    args = build.deployment(ISVC, extra, build.STABLE, 1, FILE, DIGEST, 1)["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert args[-1] == "--enable-prefix-caching"
    assert args[args.index("--dtype") + 1] == "float32"


def test_service_targets_the_engine_port_for_metrics_too():
    svc = build.service(ISVC, spec())
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "metrics", "port": 9090, "targetPort": "http", "protocol": "TCP"},
    ]
    assert build.url("chat", "ml", "tiny-llama", openai=True) == "http://chat.ml.svc.cluster.local/v1"


def test_service_monitor_labels_engine_series_with_version_and_model():
    (endpoint,) = build.service_monitor(ISVC, spec())["spec"]["endpoints"]
    assert endpoint["relabelings"] == [
        {
            "sourceLabels": ["__meta_kubernetes_pod_label_kiln_dev_model_version"],
            "targetLabel": "version",
            "action": "replace",
        },
        {
            "sourceLabels": ["__meta_kubernetes_pod_label_kiln_dev_track"],
            "targetLabel": "track",
            "action": "replace",
        },
        {"targetLabel": "model", "replacement": "tiny-llama", "action": "replace"},
    ]


def test_inference_pool_only_when_asked():
    assert "InferencePool" not in {
        o["kind"] for o in build.children(ISVC, spec(), stable=(1, S3, DIGEST), stable_replicas=1)
    }
    s = spec(runtime=runtime(llm={"inferencePool": {"endpointPickerRef": {"name": "epp", "port": 9003}}}))
    pool = build.inference_pool(ISVC, s)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"] == {
        "selector": {"matchLabels": {build.LABEL_ISVC: "chat"}},
        "targetPorts": [{"number": 8080}],
        "endpointPickerRef": {"name": "epp", "port": {"number": 9003}, "failureMode": "FailClose"},
    }
    assert (llm.INFERENCE_POOL_API_VERSION, "InferencePool") in build.CHILD_KINDS


def test_kiln_engine_pods_are_unchanged_by_the_llm_fields():
    s = InferenceServiceSpec.model_validate(
        {"modelRef": {"name": "m", "version": 1}, "runtime": {"image": "kiln/server"}}
    )
    (c,) = pod(build.deployment(ISVC, s, build.STABLE, 1, FILE, DIGEST, 1))["containers"]
    assert "command" not in c and c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert [p["name"] for p in build.service(ISVC, s)["spec"]["ports"]] == ["http", "grpc", "metrics"]


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"runtime": {"image": "x", "llm": {"maxModelLen": 256}}}, "runtime.llm applies to LLM engines"),
        ({"runtime": {"image": "x", "engine": "tgi"}}, "engine"),
        ({"runtime": {"image": "x", "engine": "vllm", "llm": {"dtype": "float8"}}}, "dtype"),
        ({"runtime": {"image": "x", "engine": "vllm", "llm": {"maxModelLen": 8}}}, "maxModelLen"),
        (
            {"runtime": {"image": "x", "engine": "vllm"}, "featureGroups": [{"name": "fg"}]},
            "featureGroups apply",
        ),
    ],
)
def test_invalid_llm_specs_are_refused(over: dict[str, Any], message: str):
    with pytest.raises(ValidationError, match=message):
        InferenceServiceSpec.model_validate({"modelRef": {"name": "m", "version": 1}, **over})
