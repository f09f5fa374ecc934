"""Bring your own model on the real node: a user's DDP script in 2 pods, registered, served.

- The CNN example as a user runs it (examples/cnn: its Model, TrainingJob and InferenceService
  manifests, with only image, scheduling and storage adapted here): torchrun in 2 pods runs
  /opt/kiln/examples/cnn/train.py from the trainer image, DDP over gloo; rank 0 exports with
  kiln.sdk (torch.export) and publishes to S3; the version is registered with its accuracy,
  promoted, served by kiln-serve, and queried through the Service over REST (plain JSON and
  ``tritonclient.http``) and gRPC (``tritonclient.grpc``): the same answers.
- A PyTorchJob-style start, no launcher (``command: [python, script]``): both pods join the
  group from the pod's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (``env://``), both
  finish, and rank 0's ONNX artifact is registered.

The operator runs in this process (kopf), watching only the test's namespace; pods write to a
fresh bucket of the cluster's versitygw through its in-cluster name, the operator verifies
there through this machine's. Images: hack/images (cached), tag ``$KILN_E2E_IMAGE_TAG`` (default
``dev``: a session sharing the cluster with others may pick its own).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from kubernetes import client

from kiln import API_VERSION, storage
from kiln import kube as kb
from kiln.cli import main as kiln_main
from tests.integration.helpers import run_operator, wait_for
from tests.s3 import S3Bucket

from .conftest import REAL_NODE, Cluster, require_image_builds

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))

from kilndev import images  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.torch, pytest.mark.timeout(900)]

EXAMPLE = REPO / "examples" / "cnn"
TAG = os.environ.get("KILN_E2E_IMAGE_TAG", "dev")
SCHEDULING = {
    "nodeSelector": {"kiln.dev/pool": "real"},
    "tolerations": [{"key": "kiln.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}],
}
SECRET = "s3"
KINDS = ("InferenceService", "TrainingJob", "Model")


def _example_module() -> ModuleType:
    """examples/cnn/train.py as a module: its own data split (what the served model never saw)."""
    spec = importlib.util.spec_from_file_location("cnn_example", EXAMPLE / "train.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def refs(real_cluster: Cluster) -> dict[str, str]:
    """kiln-trainer and kiln-server built from this tree (cached) and in the node's containerd."""
    require_image_builds()
    built = images.build(["trainer", "server"], tag=TAG, import_=True)
    return {name: info.short_ref for name, info in built.items()}


@dataclass
class Env:
    api: client.ApiClient
    cluster: Cluster
    namespace: str
    s3: S3Bucket
    refs: dict[str, str]

    def manifest(self, name: str, **spec: Any) -> dict[str, Any]:
        """An examples/cnn manifest, its spec updated with ``spec``."""
        obj = yaml.safe_load((EXAMPLE / name).read_text())
        obj["metadata"]["namespace"] = self.namespace
        obj["spec"].update(spec)
        return obj

    def storage(self) -> dict[str, Any]:
        assert self.s3.settings.pod_endpoint
        return {"secretRef": {"name": SECRET}, "endpoint": self.s3.settings.pod_endpoint}

    def create(self, obj: dict[str, Any]) -> None:
        kb.create(self.api, obj)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return kb.get(self.api, API_VERSION, kind, self.namespace, name) or {}

    def pods(self, selector: str) -> list[client.V1Pod]:
        return client.CoreV1Api(self.api).list_namespaced_pod(self.namespace, label_selector=selector).items

    def log(self, pod: str) -> str:
        return client.CoreV1Api(self.api).read_namespaced_pod_log(pod, self.namespace)


@pytest.fixture
def env(
    real_cluster: Cluster,
    kube: client.ApiClient,
    namespace: str,
    kiln_crds: list[str],
    s3: S3Bucket,
    refs: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    """The operator (in-process, this namespace only) with its artifact root in the test's
    bucket; the pods' credentials in Secret ``s3``. Kiln's objects are deleted while the operator
    still runs (their finalizers), then the namespace goes."""
    for key, value in s3.settings.aws_env().items():  # the operator's own S3 access
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", s3.uri("models"))
    secret = {
        "AWS_ACCESS_KEY_ID": s3.settings.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3.settings.secret_access_key,
    }
    client.CoreV1Api(kube).create_namespaced_secret(
        namespace, {"metadata": {"name": SECRET}, "type": "Opaque", "stringData": secret}
    )
    with run_operator(real_cluster.kubeconfig, namespace=namespace):
        yield Env(kube, real_cluster, namespace, s3, refs)
        for kind in KINDS:
            for obj in kb.list_objects(kube, API_VERSION, kind, namespace):
                kb.delete(kube, API_VERSION, kind, namespace, obj["metadata"]["name"])
        wait_for(
            lambda: not any(kb.list_objects(kube, API_VERSION, kind, namespace) for kind in KINDS),
            60,
            message="Kiln's objects to be deleted",
        )


def train(env: Env, name: str, model: str, timeout: float = 420, **spec: Any) -> dict[str, Any]:
    """Create TrainingJob ``name`` (examples/cnn/trainingjob.yaml + ``spec``) on the real node and
    wait for its version; returns its status, with the seconds it took under ``_seconds`` and what
    was seen of each pod while it ran under ``_pods`` (name -> node, last phase, its rank line)."""
    job = env.manifest(
        "trainingjob.yaml",
        image=env.refs["trainer"],
        imagePullPolicy="Never",
        modelRef={"name": model},
        storage=env.storage(),
        **SCHEDULING,
        **spec,
    )
    job["metadata"]["name"] = name
    t0 = time.monotonic()
    env.create(job)
    seen: dict[str, dict[str, Any]] = {}

    def registered() -> dict[str, Any] | None:
        # The operator deletes ranks still running once rank 0 has succeeded (their GPUs are
        # freed), so each rank's log line is read while its pod is there.
        for p in env.pods(f"kiln.dev/trainingjob={name}"):
            rec = seen.setdefault(p.metadata.name, {"line": None})
            rec.update(node=p.spec.node_name, phase=p.status.phase)
            rank = int(p.metadata.name.rsplit("-", 1)[1])
            if rec["line"] is None and p.status.phase in ("Running", "Succeeded"):
                want = f"rank {rank} of 2 on cpu"
                rec["line"] = want if want in env.log(p.metadata.name) else None
        st = env.get("TrainingJob", name).get("status") or {}
        if st.get("phase") == "Failed":
            logs = {
                p.metadata.name: env.log(p.metadata.name)[-1500:]
                for p in env.pods(f"kiln.dev/trainingjob={name}")
            }
            raise AssertionError(f"TrainingJob {name} failed: {st.get('conditions')} {logs}")
        return st if st.get("registeredVersion") else None

    st = wait_for(registered, timeout, interval=1, message=f"TrainingJob {name}'s version registered")
    st["_seconds"] = round(time.monotonic() - t0, 1)
    st["_pods"] = seen
    return st


def assert_two_ranks_ran(env: Env, job: str, st: dict[str, Any]) -> client.V1Pod:
    """Both pods ran on the real node, each a rank of a world of two (its log line seen while it
    ran); rank 0 exited 0 and is kept. Rank 1 exits 0 too, or, still finishing when rank 0
    succeeded, was deleted by the operator: never Failed. Returns rank 0's pod."""
    seen = st["_pods"]
    assert sorted(seen) == [f"{job}-node-0", f"{job}-node-1"], seen
    for rank in (0, 1):
        rec = seen[f"{job}-node-{rank}"]
        assert rec["node"] == REAL_NODE and rec["phase"] != "Failed", seen
        assert rec["line"] == f"rank {rank} of 2 on cpu", seen
    rank0 = next(p for p in env.pods(f"kiln.dev/trainingjob={job}") if p.metadata.name == f"{job}-node-0")
    assert rank0.status.phase == "Succeeded", env.log(rank0.metadata.name)[-2000:]
    return rank0


def artifact_metadata(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.parse(uri).join("metadata.json")))


def figure(line: str) -> None:
    """Print a measured figure on the real stdout: the in-process operator (kopf's KopfRunner, a
    click CliRunner) replaces sys.stdout while it runs, and -s does not see what goes there."""
    sys.__stdout__.write(f"\n{line}\n")
    sys.__stdout__.flush()


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return dict(json.loads(r.read()))


def test_cnn_example_trained_by_ddp_registered_promoted_and_served(env: Env) -> None:
    t0 = time.monotonic()
    env.create(env.manifest("model.yaml"))
    st = train(env, "digits-cnn-v1", "digits-cnn")
    assert_two_ranks_ran(env, "digits-cnn-v1", st)
    assert st["registeredVersion"] == 1
    accuracy = st["result"]["metrics"]["accuracy"]
    assert accuracy >= 0.9, st["result"]
    uri = st["result"]["artifactUri"]
    assert uri == env.s3.uri("models/digits-cnn/digits-cnn-v1")
    meta = artifact_metadata(uri)
    assert meta["format"] == "torch-export" and list(meta["files"]) == ["model.pt2"]
    assert meta["hyperparameters"]["worldSize"] == 2
    version = env.get("Model", "digits-cnn")["status"]["versions"][0]
    assert (version["version"], version["artifactUri"]) == (1, uri)
    trained = time.monotonic() - t0

    assert (
        kiln_main(
            [
                "promote",
                "digits-cnn",
                "1",
                "--stage",
                "Production",
                "-n",
                env.namespace,
                "--kubeconfig",
                env.cluster.kubeconfig,
            ]
        )
        == 0
    )
    isvc = env.manifest(
        "inferenceservice.yaml",
        storage=env.storage(),
        monitoring={"serviceMonitor": {"enabled": False}},
        **SCHEDULING,
    )
    isvc["spec"]["runtime"].update(image=env.refs["server"], imagePullPolicy="Never")
    t1 = time.monotonic()
    env.create(isvc)

    def ready() -> bool:
        st = env.get("InferenceService", "digits-cnn").get("status") or {}
        return st.get("stableVersion") == 1 and any(
            c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or []
        )

    wait_for(ready, 240, interval=0.5, message="InferenceService digits-cnn Ready with version 1")
    served = time.monotonic() - t1
    svc = client.CoreV1Api(env.api).read_namespaced_service("digits-cnn", env.namespace)
    port = next(p.port for p in svc.spec.ports if p.name == "http")
    base = f"http://{svc.spec.cluster_ip}:{port}/v2/models/digits-cnn"

    # the model's own signature, as the artifact records it
    md = get(base)
    assert md["platform"] == "pytorch_torch_export"
    assert md["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert md["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
    ]

    # every held-out image in one request: the served model scores what the pods measured
    _, _, x_test, y_test = _example_module().load_data()
    answer = post(
        f"{base}/infer",
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(x_test.shape),
                    "datatype": "FP32",
                    "data": x_test.ravel().tolist(),
                }
            ]
        },
    )
    out = {o["name"]: o for o in answer["outputs"]}
    assert out["logits"]["shape"] == [len(y_test), 10] and out["predicted_class"]["shape"] == [len(y_test)]
    predicted = out["predicted_class"]["data"]
    served_accuracy = sum(int(p == y) for p, y in zip(predicted, y_test, strict=True)) / len(y_test)
    assert abs(served_accuracy - accuracy) <= 0.005, (served_accuracy, accuracy)
    logits = out["logits"]["data"]
    assert predicted == [max(range(10), key=lambda k: logits[10 * i + k]) for i in range(len(y_test))]

    # Triton's HTTP client, unchanged (binary tensors both ways): the same classes
    triton = httpclient.InferenceServerClient(f"{svc.spec.cluster_ip}:{port}")
    assert triton.is_model_ready("digits-cnn")
    first = httpclient.InferInput("image", [16, 1, 8, 8], "FP32")
    first.set_data_from_numpy(x_test[:16])
    result = triton.infer("digits-cnn", [first], outputs=[httpclient.InferRequestedOutput("predicted_class")])
    assert result.as_numpy("predicted_class").tolist() == predicted[:16]
    # and Triton's gRPC client through the Service's `grpc` port: the same signature and answers
    grpc_port = next(p.port for p in svc.spec.ports if p.name == "grpc")
    with grpcclient.InferenceServerClient(f"{svc.spec.cluster_ip}:{grpc_port}") as g:
        meta = g.get_model_metadata("digits-cnn", as_json=True)
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("image", "FP32", ["-1", "1", "8", "8"])
        ]
        image = grpcclient.InferInput("image", [16, 1, 8, 8], "FP32")
        image.set_data_from_numpy(x_test[:16])
        answer_grpc = g.infer("digits-cnn", [image])
        assert answer_grpc.as_numpy("predicted_class").tolist() == predicted[:16]
        assert answer_grpc.as_numpy("logits").shape == (16, 10)
    figure(
        f"[cnn] trained+registered {trained:.1f}s (job {st['_seconds']}s), isvc Ready {served:.1f}s; "
        f"accuracy registered {accuracy:.4f}, served {served_accuracy:.4f} on {len(y_test)} images"
    )


def test_pytorchjob_style_script_without_launcher_trains_on_two_pods(env: Env) -> None:
    """``command: [python, script]``: no torchrun; the script's init_process_group("env://") reads
    the pod's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Exported as ONNX this time."""
    env.create(env.manifest("model.yaml") | {"metadata": {"name": "pytorchjob", "namespace": env.namespace}})
    st = train(
        env,
        "pytorchjob-v1",
        "pytorchjob",
        command=["python", "/opt/kiln/examples/cnn/train.py"],
        args=["--epochs", "3", "--format", "onnx"],
    )
    rank0 = assert_two_ranks_ran(env, "pytorchjob-v1", st)
    container = rank0.spec.containers[0]
    assert container.command == ["python", "/opt/kiln/examples/cnn/train.py"]
    envs = {e.name: e.value for e in container.env}
    assert (envs["RANK"], envs["WORLD_SIZE"]) == ("0", "2")
    assert envs["MASTER_ADDR"] == f"pytorchjob-v1-node-0.pytorchjob-v1.{env.namespace}.svc"
    # the result the operator registered is rank 0's termination message
    message = json.loads(rank0.status.container_statuses[0].state.terminated.message)
    assert (
        message["artifactUri"] == st["result"]["artifactUri"] == env.s3.uri("models/pytorchjob/pytorchjob-v1")
    )
    assert st["registeredVersion"] == 1 and st["result"]["metrics"]["accuracy"] > 0.5
    meta = artifact_metadata(st["result"]["artifactUri"])
    assert meta["format"] == "onnx" and "model.onnx" in meta["files"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    figure(f"[pytorchjob] 2 pods trained and registered in {st['_seconds']}s")
