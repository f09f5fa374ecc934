#!/usr/bin/env python3
"""Kiln end to end on the local cluster's real node: train, register, promote, serve, canary.

Every pod here is real: the kubelet on node ``kiln-real-0`` runs the images hack/images built
from images/*/Dockerfile, in containerd, on a CNI bridge, behind kube-proxy and CoreDNS.

  0. the cluster (``hack/cluster up --real-node``), the images (``hack/images build --import``),
     Kiln installed with ``helm upgrade --install`` from charts/kiln, and Prometheus (built by
     hack/cluster; Debian's has no Kubernetes discovery) on this machine, configured with
     Kubernetes service discovery from the ServiceMonitors that match ``release=prometheus``
     (hack/kilndev/prometheus.py writes what prometheus-operator would);
  1. Model ``digits`` and TrainingJob ``digits-v1``: torchrun in 2 pods, DDP over gloo, node 0
     found through the job's headless Service;
  2. version 1 registered in the Model with its accuracy;
  3. ``kiln promote digits 1 --stage Production``;
  4. InferenceService ``digits`` serving it; held-out digits sent through the Service's
     ClusterIP, accuracy measured from the answers;
  5. ``digits-v2`` trained and promoted while a steady stream of requests runs through the
     Service; the canary is analysed against Prometheus and promoted; failed requests counted;
  6. ``digits-v3``, trained with ``servingFaultInjectionFailRate: 1.0`` (its server answers 500
     on purpose), promoted, and rolled back by the analysis;
  7. bring your own model: examples/cnn, a user's DDP script (torchrun in 2 pods, gloo), exports
     a small CNN with ``kiln.sdk`` (torch.export) to S3; version 1 of Model ``digits-cnn``;
  8. promoted and served by InferenceService ``digits-cnn``; its signature (input ``image`` FP32
     [-1, 1, 8, 8]), one image over REST and gRPC, and every held-out 8x8 image over REST (OIP v2
     JSON);
  9. FeatureGroup ``digits-pixels`` over a Parquet event table in S3 (hack/kilndev/demo_features.py),
     materialized into Redis (hack/cluster's, reached through a Service) by an Indexed Job on the
     real node; the point-in-time join and the online values checked with ``kiln features``;
 10. ``digits-fs-v1`` trained on the join in its pods, put in Production by the promotion policy,
     served by an InferenceService with ``spec.featureGroups``: requests carry ``digit_id`` only;
 11. drift: inverted digits sent to ``digits-fs``; the drift share, the ``KilnDatasetDrift`` alert,
     the retraining TrainingJob the Model's drift trigger creates, its version promoted by policy
     and canaried; no human in the loop.

``--only llm`` (``make demo-llm``) runs the LLM runtime's steps after the same set-up instead:

 12. the image ``kiln-llm`` (vLLM for CPU, ``hack/images build llm``); two tiny Llamas made
     locally (``hack/tiny-llama``, seeds 1 and 2) uploaded to S3; Model ``tiny-llama`` imports
     version 1 (format ``hf-transformers``, every file's digest verified);
 13. InferenceService ``chat`` (``runtime.engine: vllm``) serves it; ``/v1/models`` and a chat
     completion streamed through the Service with the ``openai`` client; the first server-sent
     event through the Service against the pod directly;
 14. version 2 imported and promoted while streams run through the Service: the canary is
     analysed on the engines' time to first token (p95) and error ratio, and promoted; failed
     streams counted (target 0), requests per version read from Prometheus.

Prints progress, a summary table and the figures; ``--json FILE`` writes them for the e2e test.
Exits non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

from kubernetes import config  # noqa: E402

from kiln import API_VERSION, kube, storage  # noqa: E402
from kilndev import demo_features as dfs  # noqa: E402
from kilndev import demo_llm as dl  # noqa: E402
from kilndev import images as kimages  # noqa: E402
from kilndev.prometheus import LocalPrometheus  # noqa: E402

NS = "kiln-demo"
SYSTEM_NS = "kiln-system"
MONITORING_NS = "monitoring"
OUT = REPO / "_out" / "demo"
VENV_BIN = REPO / ".venv" / "bin"
DEMO_D = REPO / "hack" / "demo.d"
#: The bring-your-own-model example: a user's DDP script and its manifests (examples/cnn/README.md).
CNN = REPO / "examples" / "cnn"
#: The demo's bucket in the local S3 server (versitygw, started by hack/cluster) and the prefix
#: under it that is the operator's artifact root (helm values artifacts.s3).
BUCKET = "kiln-demo"
PREFIX = "models"
S3_SECRET = "kiln-s3"
REAL_NODE_SCHEDULING = {
    "nodeSelector": {"kiln.dev/pool": "real"},
    "tolerations": [
        {"key": "kiln.dev/real-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    ],
}
PROMETHEUS_PORT = 19090
#: The feature-store steps: the FeatureGroup, the Model trained on it, where its data lives.
FEATURE_GROUP = "digits-pixels"
FS_MODEL = "digits-fs"
FEATURES_PREFIX = "features/digits"

steps: list[tuple[str, bool, float, str]] = []
figures: dict[str, Any] = {}


# ---------------------------------------------------------------------------------- output
def say(msg: str) -> None:
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


def note(msg: str) -> None:
    print(f"    {msg}", flush=True)


class StepFailed(RuntimeError):
    pass


class Step:
    """A named step: prints its title, times it, records ok/failed and a one-line detail."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.detail = ""

    def __enter__(self) -> Step:
        say(self.name)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        ok = exc is None
        secs = time.monotonic() - self.t0
        steps.append((self.name, ok, secs, self.detail if ok else f"{exc_type.__name__}: {exc}"))
        if not ok:
            print(f"    FAILED: {exc}", flush=True)
        return False


def summary(total: float) -> None:
    print("\n" + "=" * 110)
    print(f"{'step':<58} {'result':<7} {'seconds':>8}  detail")
    for name, ok, secs, detail in steps:
        print(f"{name:<58} {'ok' if ok else 'FAILED':<7} {secs:>8.1f}  {detail}")
    print(f"{'total':<58} {'':<7} {total:>8.1f}")
    print("=" * 110)
    if figures:
        print("figures:")
        for k, v in figures.items():
            print(f"  {k:<52} {v}")


# ---------------------------------------------------------------------------------- helpers
def run(*cmd: str, input: str | None = None, check: bool = True, stream: bool = False) -> str:
    """Run a command; ``stream`` shows its output live (indented)."""
    if stream:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            print("    | " + line.rstrip(), flush=True)
        if proc.wait() != 0 and check:
            raise StepFailed(f"{' '.join(cmd)} exited {proc.returncode}")
        return "".join(lines)
    r = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise StepFailed(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def poll(
    what: str,
    fn: Callable[[], Any],
    timeout: float,
    *,
    progress: Callable[[], str] | None = None,
    interval: float = 0.25,
) -> Any:
    """Call ``fn`` until it returns something truthy; print ``progress()`` whenever it changes.

    Raises StepFailed after ``timeout`` seconds, with the last progress line.
    """
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if progress is not None:
            line = progress()
            if line != last:
                note(f"[{time.strftime('%H:%M:%S')}] {line}")
                last = line
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what} (last: {last})")
        time.sleep(interval)


class Cluster:
    """kubectl, helm and an API client for the local cluster."""

    def __init__(self, image_tag: str = "dev") -> None:
        self.image_tag = image_tag
        env = json.loads(run(str(REPO / "hack" / "cluster"), "env", "--json"))
        if not env.get("real_node"):
            raise StepFailed("the local cluster has no real node (hack/cluster up --real-node)")
        self.env = env
        self.kubeconfig = env["KUBECONFIG"]
        self.kubectl_bin = env["kubectl"]
        self.helm_bin = env["helm"]
        self.node = env["real_node"]
        self.api_host = env["api_server"].split("//", 1)[1].rsplit(":", 1)[0]
        os.environ["KUBECONFIG"] = self.kubeconfig
        self.api = config.new_client_from_config(config_file=self.kubeconfig)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return run(self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args, input=input, check=check)

    def apply(self, obj: dict[str, Any], namespace: str | None = None) -> None:
        """``kubectl apply --server-side`` of one object (what a person would type); the images
        of TrainingJobs and InferenceServices re-tagged ``image_tag`` (see :func:`retag`)."""
        spec = obj.get("spec") or {}
        if obj.get("kind") == "TrainingJob":
            spec["image"] = retag(spec["image"], self.image_tag)
        elif obj.get("kind") == "InferenceService":
            spec["runtime"]["image"] = retag(spec["runtime"]["image"], self.image_tag)
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", "--server-side", "--force-conflicts", *ns, "-f", "-", input=yaml.safe_dump(obj))

    def get(self, kind: str, name: str, namespace: str | None = NS, api_version: str = API_VERSION) -> dict:
        return kube.get(self.api, api_version, kind, namespace, name) or {}

    def pods(self, selector: str, namespace: str = NS) -> list[dict[str, Any]]:
        return kube.list_objects(self.api, "v1", "Pod", namespace, selector)

    def s3_secret(self, namespace: str) -> dict[str, Any]:
        """The Secret holding the local S3 server's credentials as the AWS SDKs read them."""
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": S3_SECRET, "namespace": namespace},
            "type": "Opaque",
            "stringData": {
                "AWS_ACCESS_KEY_ID": self.env["KILN_S3_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": self.env["KILN_S3_SECRET_ACCESS_KEY"],
            },
        }

    def s3_bucket(self) -> str:
        """Make the demo bucket if missing; this process's kiln.storage then uses the store too."""
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": self.env["KILN_S3_ENDPOINT"],
                "AWS_ACCESS_KEY_ID": self.env["KILN_S3_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": self.env["KILN_S3_SECRET_ACCESS_KEY"],
                "AWS_REGION": self.env["KILN_S3_REGION"],
            }
        )
        client = storage.s3_client()
        try:
            client.head_bucket(Bucket=BUCKET)
        except Exception:
            client.create_bucket(Bucket=BUCKET)
        return f"s3://{BUCKET}"


def pod_phases(pods: list[dict[str, Any]]) -> str:
    parts = []
    for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
        st = p.get("status") or {}
        phase = st.get("phase", "?")
        for c in st.get("containerStatuses") or []:
            waiting = (c.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
                phase = f"{phase}/{waiting['reason']}"
        parts.append(f"{p['metadata']['name']}={phase}")
    return ", ".join(parts) or "no pods yet"


# ---------------------------------------------------------------------------------- traffic
@dataclass
class Answer:
    t: float  # monotonic
    ok: bool
    version: str | None
    correct: bool | None
    error: str = ""


@dataclass
class Traffic:
    """A steady stream of OIP v2 infer requests through the Service's ClusterIP.

    ``rate`` requests per second over ``workers`` threads; each request opens a new TCP
    connection so kube-proxy spreads them over the serving pods (a connection is the unit it
    balances). A request fails on a connection error, a timeout or a non-200 answer.
    """

    host: str
    port: int
    x: Any
    y: Any
    rate: float = 20.0
    workers: int = 4
    model: str = "digits"
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def one(self, i: int) -> Answer:
        body = json.dumps(
            {
                "inputs": [
                    {"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": self.x[i].tolist()}
                ],
                "outputs": [{"name": "predicted_class"}],
            }
        )
        t = time.monotonic()
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
            try:
                conn.request(
                    "POST", f"/v2/models/{self.model}/infer", body, {"Content-Type": "application/json"}
                )
                r = conn.getresponse()
                data = r.read()
            finally:
                conn.close()
        except OSError as e:
            return Answer(t, False, None, None, f"{type(e).__name__}: {e}")
        if r.status != 200:
            return Answer(t, False, None, None, f"HTTP {r.status}: {data[:120]!r}")
        doc = json.loads(data)
        label = int(doc["outputs"][0]["data"][0])
        return Answer(t, True, str(doc.get("model_version")), label == int(self.y[i]))

    def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        period = self.workers / self.rate
        nxt = time.monotonic()
        while not self._stop.is_set():
            a = self.one(rng.randrange(len(self.x)))
            with self._lock:
                self.answers.append(a)
            nxt += period
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def start(self) -> None:
        for i in range(self.workers):
            th = threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"traffic-{i}")
            th.start()
            self._threads.append(th)

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=10)

    def window(self, t0: float, t1: float | None = None) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.t >= t0 and (t1 is None or a.t < t1)]

    def last_versions(self, n: int = 20) -> str:
        with self._lock:
            recent = self.answers[-n:]
        counts: dict[str, int] = {}
        for a in recent:
            key = f"v{a.version}" if a.ok else "failed"
            counts[key] = counts.get(key, 0) + 1
        return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def held_out_rows(labels: Any) -> Any:
    """Row indices of the trainer's own test split of a data set with these ``labels`` (the
    demo's jobs keep the default split: seed 0, default fractions)."""
    from kiln.trainer.config import Hyperparameters
    from kiln.trainer.data import stratified_split

    hp = Hyperparameters()
    return stratified_split(
        labels,
        seed=hp.effective_split_seed,
        validation_fraction=hp.validationFraction,
        test_fraction=hp.testFraction,
    ).test


def held_out_digits() -> tuple[Any, Any]:
    """The trainer's own test split of sklearn's digits (rows it never trained on)."""
    from kiln.trainer.data import load_builtin

    ds = load_builtin("sklearn-digits")
    test = held_out_rows(ds.labels)
    return ds.features[test], ds.labels[test]


def cnn_held_out() -> tuple[Any, Any]:
    """examples/cnn/train.py's own held-out images ``[n, 1, 8, 8]`` and labels (never trained on)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cnn_example", CNN / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, _, x, y = module.load_data()
    return x, y


def post_json(host: str, port: int, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET (no body) or POST JSON to http://host:port/path; the decoded answer (StepFailed on non-200)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if r.status != 200:
        raise StepFailed(f"{path}: HTTP {r.status}: {data[:300]!r}")
    return dict(json.loads(data))


def query_cnn(ip: str, port: int, grpc_port: int) -> tuple[float, str]:
    """The CNN's signature, one digit shown with its answer (REST, then the same over gRPC with
    ``tritonclient.grpc``), then every held-out image in one REST request: returns the accuracy
    and a one-line summary of the digit shown."""
    import tritonclient.grpc as grpcclient

    base = "/v2/models/digits-cnn"
    md = post_json(ip, port, base)
    note(f"GET http://{ip}:{port}{base}: platform {md['platform']}")
    note(f"  inputs {md['inputs']}")
    note(f"  outputs {md['outputs']}")
    x, y = cnn_held_out()
    one = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x[:1].tolist()}]}
    note(
        f'POST http://{ip}:{port}{base}/infer {{"inputs": [{{"name": "image", "shape": [1, 1, 8, 8], '
        '"datatype": "FP32", "data": <this 8x8 image, pixels in [0, 1]>}]}'
    )
    for row in x[0][0]:
        note("  " + "".join(" .:-=+*#%@"[min(9, int(v * 10))] * 2 for v in row))
    out = {o["name"]: o["data"] for o in post_json(ip, port, f"{base}/infer", one)["outputs"]}
    shown = f"a held-out {int(y[0])} answered predicted_class {out['predicted_class'][0]}"
    note(shown + f" (logit {max(out['logits']):.2f})")
    with grpcclient.InferenceServerClient(f"{ip}:{grpc_port}") as g:
        image = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
        image.set_data_from_numpy(x[:1])
        over_grpc = int(g.infer("digits-cnn", [image]).as_numpy("predicted_class")[0])
    note(f"the same image over gRPC ({ip}:{grpc_port}, tritonclient.grpc): predicted_class {over_grpc}")
    if over_grpc != out["predicted_class"][0]:
        raise StepFailed(f"gRPC answered {over_grpc}, REST {out['predicted_class'][0]}")
    shown += ", the same over gRPC"
    body = {
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    predicted = {o["name"]: o["data"] for o in post_json(ip, port, f"{base}/infer", body)["outputs"]}[
        "predicted_class"
    ]
    acc = sum(int(p == t) for p, t in zip(predicted, y, strict=True)) / len(y)
    note(f"{len(y)} held-out images in one request -> accuracy {acc:.4f}")
    return acc, shown


# ---------------------------------------------------------------------------------- the demo
def retag(image: str, tag: str) -> str:
    """``kiln-<x>:dev`` (what the manifests name) as ``kiln-<x>:<tag>``; other images unchanged."""
    name, _, old = image.rpartition(":")
    return f"{name}:{tag}" if name.startswith("kiln-") and old == "dev" else image


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.c: Cluster
        self.prom: LocalPrometheus | None = None
        self.traffic: Traffic | None = None
        self.streams: dl.StreamLoad | None = None

    # ---- set-up
    def cluster_and_images(self) -> None:
        with Step("cluster with a real node (hack/cluster up --real-node)") as s:
            out = run(str(REPO / "hack" / "cluster"), "up", "--real-node", stream=True)
            self.c = Cluster(self.args.image_tag)
            s.detail = out.strip().splitlines()[-2][:110] if out.strip() else "up"
        with Step("images from images/*/Dockerfile (hack/images build --import)") as s:
            t0 = time.monotonic()
            infos = kimages.build(["operator", "trainer", "server"], tag=self.args.image_tag, import_=True)
            self.images = infos
            s.detail = ", ".join(f"{n} {i.size / 2**30:.2f} GiB" for n, i in infos.items())
            figures["images build+import seconds"] = round(time.monotonic() - t0, 1)

    def install(self) -> None:
        c = self.c
        with Step("install Kiln with helm (charts/kiln) on the real node, artifacts in S3") as s:
            c.kubectl("create", "namespace", SYSTEM_NS, check=False)
            c.apply(c.s3_secret(SYSTEM_NS), SYSTEM_NS)
            # CRDs first: helm installs charts/kiln/crds on install but never upgrades them
            c.kubectl(
                "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "charts" / "kiln" / "crds")
            )
            values = {
                "image": {
                    "repository": "kiln-operator",
                    "tag": self.args.image_tag,
                    "pullPolicy": "IfNotPresent",
                },
                "watchNamespaces": [NS],
                "artifacts": {
                    "s3": {
                        "bucket": BUCKET,
                        "prefix": PREFIX,
                        "endpoint": c.env["KILN_S3_POD_ENDPOINT"],
                        "region": c.env["KILN_S3_REGION"],
                        "secretName": S3_SECRET,
                    }
                },
                # a rebuilt image under the same tag rolls the operator
                "podAnnotations": {"kiln.dev/image-id": self.images["operator"].config_digest},
                **REAL_NODE_SCHEDULING,
            }
            (OUT / "values.yaml").write_text(yaml.safe_dump(values))
            out = run(
                self.c.helm_bin,
                f"--kubeconfig={c.kubeconfig}",
                "upgrade",
                "--install",
                "kiln",
                str(REPO / "charts" / "kiln"),
                "--namespace",
                SYSTEM_NS,
                "--create-namespace",
                "-f",
                str(OUT / "values.yaml"),
                "--wait",
                "--timeout",
                "3m",
            )
            note(out.strip().splitlines()[0] if out.strip() else "")
            pods = c.pods("app.kubernetes.io/name=kiln-operator", SYSTEM_NS)
            note(
                pod_phases(pods) + f" on {', '.join(sorted({p['spec'].get('nodeName', '?') for p in pods}))}"
            )
            s.detail = f"operator Deployment Ready on {c.node}; helm release kiln in {SYSTEM_NS}"

    def namespace(self) -> None:
        c = self.c
        with Step(f"fresh namespace {NS}, its S3 Secret, and bucket s3://{BUCKET}/{PREFIX}") as s:
            if c.get("Namespace", NS, None, "v1"):
                c.kubectl("delete", "namespace", NS, "--wait=false")
                poll("the old namespace to go", lambda: not c.get("Namespace", NS, None, "v1"), 180)
            c.kubectl("create", "namespace", NS)
            c.apply(c.s3_secret(NS), NS)  # what a user does: the store's credentials, by name
            bucket = c.s3_bucket()
            removed = storage.delete_tree(f"s3://{BUCKET}/{PREFIX}")  # artifacts are immutable per job name
            poll(
                "the default ServiceAccount",
                lambda: c.kubectl("-n", NS, "get", "serviceaccount", "default", check=False),
                30,
            )
            s.detail = f"bucket {bucket} ({removed} old objects removed), Secret {S3_SECRET}"

    def prometheus(self) -> None:
        c = self.c
        with Step("Prometheus (Kubernetes SD) scraping what ServiceMonitors select") as s:
            rbac = [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MONITORING_NS}},
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": "prometheus", "namespace": MONITORING_NS},
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": "kiln-demo-prometheus"},
                    "rules": [
                        {
                            "apiGroups": [""],
                            "resources": ["services", "endpoints", "pods"],
                            "verbs": ["get", "list", "watch"],
                        },
                        {
                            "apiGroups": ["discovery.k8s.io"],
                            "resources": ["endpointslices"],
                            "verbs": ["get", "list", "watch"],
                        },
                    ],
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": "kiln-demo-prometheus"},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "kiln-demo-prometheus",
                    },
                    "subjects": [
                        {"kind": "ServiceAccount", "name": "prometheus", "namespace": MONITORING_NS}
                    ],
                },
                # pods reach this machine's Prometheus as http://prometheus.monitoring:9090
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "prometheus", "namespace": MONITORING_NS},
                    "spec": {"ports": [{"name": "web", "port": 9090, "targetPort": PROMETHEUS_PORT}]},
                },
                {
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {
                        "name": "prometheus-host",
                        "namespace": MONITORING_NS,
                        "labels": {"kubernetes.io/service-name": "prometheus"},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "web", "port": PROMETHEUS_PORT, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [c.api_host], "conditions": {"ready": True}}],
                },
            ]
            for obj in rbac:
                c.apply(obj)
            sd_kubeconfig = OUT / "prometheus-sd.kubeconfig"
            run(
                str(REPO / "hack" / "cluster"),
                "sa-kubeconfig",
                MONITORING_NS,
                "prometheus",
                "--duration=24h",
                "-o",
                str(sd_kubeconfig),
            )
            workdir = OUT / "prometheus"
            shutil.rmtree(workdir, ignore_errors=True)
            self.prom = LocalPrometheus(
                workdir,
                binary=c.env["prometheus"],
                listen=f"{c.api_host}:{PROMETHEUS_PORT}",
                kubectl=c.kubectl_bin,
                kubeconfig=c.kubeconfig,
                sd_kubeconfig=str(sd_kubeconfig),
                selector={"release": "prometheus"},
                rule_selector={"release": "prometheus"},  # the InferenceServices' PrometheusRules
                scrape_interval="2s",
            )
            self.prom.start()
            s.detail = f"{self.prom.address}, serviceMonitorSelector release=prometheus, config {workdir}"

    # ---- training
    def train(self, name: str, extra_hp: dict[str, Any] | None = None) -> dict[str, Any]:
        """Apply the MLP's TrainingJob ``name`` and follow it until its version is registered."""
        job = yaml.safe_load((DEMO_D / "trainingjob.yaml").read_text())
        job["metadata"]["name"] = name
        job["spec"]["hyperparameters"].update(extra_hp or {})
        note(f"kubectl apply -f - <<< TrainingJob {name} (hyperparameters {job['spec']['hyperparameters']})")
        return self.follow(job, time.monotonic(), apply=True)

    def follow(self, job: dict[str, Any], t0: float, *, apply: bool = False) -> dict[str, Any]:
        """Follow TrainingJob ``job`` (applied at ``t0``; applied now with ``apply``) until its
        version is registered; returns its version, artifact, accuracy and timings."""
        c = self.c
        name = job["metadata"]["name"]
        if apply:
            c.apply(job, NS)
        sel = f"kiln.dev/trainingjob={name}"
        pods = lambda: c.pods(sel)  # noqa: E731
        job_state = lambda: c.get("TrainingJob", name).get("status") or {}  # noqa: E731

        def progress() -> str:
            st = job_state()
            return f"job {st.get('phase', '-')}; pods: {pod_phases(pods())}"

        poll(
            "2 trainer pods Running",
            lambda: (
                lambda ps: (
                    len(ps) == 2 and all(p["status"].get("phase") in ("Running", "Succeeded") for p in ps)
                )
            )(pods()),
            240,
            progress=progress,
        )
        running = time.monotonic() - t0
        ps = pods()
        note(
            "scheduled on "
            + ", ".join(
                f"{p['metadata']['name']}@{p['spec'].get('nodeName')} ({p['status'].get('podIP')})"
                for p in ps
            )
        )

        def done() -> bool:
            phase = job_state().get("phase")
            if phase == "Failed":
                raise StepFailed(
                    f"TrainingJob {name} failed: {json.dumps(job_state().get('conditions'))[:600]}"
                )
            return bool(
                phase == "Succeeded"
                or (all(p["status"].get("phase") == "Succeeded" for p in pods()) and len(pods()) == 2)
            )

        poll(f"{name} to finish training", done, 600, progress=progress, interval=0.5)
        trained = time.monotonic() - t0
        st = poll(
            f"{name}'s version to be registered",
            lambda: (lambda s: s if s.get("registeredVersion") else None)(job_state()),
            120,
            progress=progress,
        )
        registered = time.monotonic() - t0
        logs = c.kubectl("-n", NS, "logs", f"{name}-node-0", "--tail=3", check=False).strip()
        for line in logs.splitlines():
            note(f"{name}-node-0 log: {line[:150]}")
        result = st.get("result") or {}
        return {
            "version": st["registeredVersion"],
            "artifact": result.get("artifactUri"),
            "accuracy": (result.get("metrics") or {}).get("accuracy"),
            "running_s": round(running, 1),
            "trained_s": round(trained, 1),
            "registered_s": round(registered, 1),
            "nodes": sorted({p["spec"].get("nodeName") for p in ps}),
        }

    def promote(self, version: int, model: str = "digits") -> float:
        c = self.c
        t0 = time.monotonic()
        out = run(str(VENV_BIN / "kiln"), "promote", model, str(version), "--stage", "Production", "-n", NS)
        note(out.strip())
        poll(
            f"status.stages.production == {version}",
            lambda: (
                ((c.get("Model", model).get("status") or {}).get("stages") or {}).get("production") == version
            ),
            60,
        )
        return time.monotonic() - t0

    def isvc_state(self, name: str = "digits") -> dict[str, Any]:
        return self.c.get("InferenceService", name).get("status") or {}

    def isvc_progress(self, name: str = "digits") -> str:
        st = self.isvc_state(name)
        an = st.get("analysis") or {}
        t = self.traffic
        return (
            f"stable v{st.get('stableVersion')} canary v{st.get('canaryVersion')} weight {st.get('canaryWeight')}% "
            f"phase {st.get('rolloutPhase')} step {st.get('currentStep')} analysis "
            f"ok={an.get('successes', 0)} failed={an.get('failures', 0)} inconclusive={an.get('inconclusive', 0)}"
            f"; pods: {pod_phases(self.c.pods(f'kiln.dev/inferenceservice={name}'))}"
            + (f"; answers {t.last_versions()}" if t and name == "digits" else "")
        )

    # ---- the steps
    def main(self) -> None:
        c = self.c
        with Step("1. Model `digits` + TrainingJob digits-v1: DDP across 2 real pods") as s:
            c.apply(yaml.safe_load((REPO / "examples" / "model.yaml").read_text()), NS)
            v1 = self.train("digits-v1")
            figures["v1: apply -> pods Running s"] = v1["running_s"]
            figures["v1: apply -> training done s"] = v1["trained_s"]
            figures["v1: apply -> version registered s"] = v1["registered_s"]
            s.detail = (
                f"pods Running {v1['running_s']}s, trained {v1['trained_s']}s after apply, on {v1['nodes']}"
            )
        with Step("2. version 1 registered in the Model") as s:
            note(c.kubectl("-n", NS, "get", "ktj,kmodel").strip().replace("\n", "\n    "))
            note(
                run(str(VENV_BIN / "kiln"), "versions", "digits", "-n", NS, check=False)
                .strip()
                .replace("\n", "\n    ")
            )
            if v1["version"] != 1 or (v1["accuracy"] or 0) < 0.9:
                raise StepFailed(f"expected version 1 with accuracy >= 0.9, got {v1}")
            if not str(v1["artifact"]).startswith(f"s3://{BUCKET}/{PREFIX}/"):
                raise StepFailed(f"expected the artifact in s3://{BUCKET}/{PREFIX}/, got {v1['artifact']}")
            files = storage.list_files(v1["artifact"])
            note(f"{v1['artifact']}: {', '.join(files)}")
            if "kiln-registration.json" not in files:
                raise StepFailed(f"no registration record next to {v1['artifact']}: {files}")
            figures["v1: registered accuracy"] = v1["accuracy"]
            figures["v1: artifact"] = v1["artifact"]
            s.detail = f"version {v1['version']}, test accuracy {v1['accuracy']:.4f}, in {v1['artifact']}"
        with Step("3. promote version 1 to Production") as s:
            secs = self.promote(1)
            s.detail = f"status.stages.production = 1 after {secs:.1f}s"

        with Step("4. InferenceService `digits` serving v1; held-out digits via the Service") as s:
            isvc = yaml.safe_load((DEMO_D / "inferenceservice.yaml").read_text())
            t0 = time.monotonic()
            c.apply(isvc, NS)
            poll(
                "InferenceService Ready with v1",
                lambda: (lambda st: st.get("stableVersion") == 1 and _ready(st))(self.isvc_state()),
                240,
                progress=self.isvc_progress,
            )
            figures["isvc: apply -> Ready s"] = round(time.monotonic() - t0, 1)
            svc = c.get("Service", "digits", NS, "v1")
            ip = svc["spec"]["clusterIP"]
            port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
            x, y = held_out_digits()
            self.traffic = Traffic(ip, port, x, y)
            answers = [self.traffic.one(i) for i in range(len(x))]
            failed = [a for a in answers if not a.ok]
            if failed:
                raise StepFailed(f"{len(failed)} of {len(x)} requests failed, e.g. {failed[0].error}")
            acc = sum(bool(a.correct) for a in answers) / len(answers)
            figures["v1: accuracy measured through the Service"] = round(acc, 4)
            note(f"{len(x)} held-out digits -> http://{ip}:{port}/v2/models/digits/infer: accuracy {acc:.4f}")
            if abs(acc - v1["accuracy"]) > 0.005:
                raise StepFailed(f"accuracy through the Service {acc:.4f} != registered {v1['accuracy']:.4f}")
            s.detail = f"Service {ip}:{port}, {len(x)} requests, accuracy {acc:.4f} (registered {v1['accuracy']:.4f})"

        self.traffic.start()
        with Step("5. v2 trained, promoted, canary under steady load, promoted") as s:
            v2 = self.train("digits-v2", {"seed": 1, "splitSeed": 0, "epochs": 40})
            if v2["version"] != 2:
                raise StepFailed(f"expected version 2, got {v2}")
            t_promote = time.monotonic()
            self.promote(2)
            first_v2 = poll(
                "the canary (v2) to answer through the Service",
                lambda: next((a for a in self.traffic.window(t_promote) if a.ok and a.version == "2"), None),
                240,
                progress=self.isvc_progress,
            )
            figures["v2: promotion -> canary serving s"] = round(first_v2.t - t_promote, 1)
            poll(
                "v2 promoted to stable",
                lambda: (
                    lambda st: (
                        st.get("stableVersion") == 2 and st.get("rolloutPhase") == "Promoted" and _ready(st)
                    )
                )(self.isvc_state()),
                300,
                progress=self.isvc_progress,
                interval=0.5,
            )
            promoted = time.monotonic()
            # settle: the old stable pods drain; everything answered must be v2 from here
            poll(
                "every answer from v2",
                lambda: (lambda w: len(w) >= 20 and all(a.ok and a.version == "2" for a in w))(
                    self.traffic.window(time.monotonic() - 2)
                ),
                120,
                progress=self.isvc_progress,
            )
            window = self.traffic.window(t_promote)
            failed = [a for a in window if not a.ok]
            figures["v2: promotion -> promoted s"] = round(promoted - t_promote, 1)
            figures["v2: requests during rollout"] = len(window)
            figures["v2: failed requests during rollout (target 0)"] = len(failed)
            for a in failed[:5]:
                note(f"failed request: {a.error}")
            if failed:
                raise StepFailed(f"{len(failed)} of {len(window)} requests failed during the rollout")
            s.detail = (
                f"v2 (acc {v2['accuracy']:.4f}) promoted {promoted - t_promote:.0f}s after promotion; "
                f"{len(window)} requests, 0 failed"
            )

        with Step("6. v3 (fails requests on purpose) rolled back by the analysis") as s:
            v3 = self.train(
                "digits-v3", {"seed": 2, "splitSeed": 0, "epochs": 10, "servingFaultInjectionFailRate": 1.0}
            )
            if v3["version"] != 3:
                raise StepFailed(f"expected version 3, got {v3}")
            t_promote = time.monotonic()
            self.promote(3)
            failing: dict[str, float] = {}

            def rolled_back() -> bool:
                st = self.isvc_state()
                if (st.get("analysis") or {}).get("failures", 0) > 0 and "t" not in failing:
                    failing["t"] = time.monotonic()
                return bool(
                    st.get("rolloutPhase") == "RolledBack"
                    and st.get("stableVersion") == 2
                    and not st.get("canaryVersion")
                    and not c.pods("kiln.dev/inferenceservice=digits,kiln.dev/track=canary")
                )

            poll("v3 rolled back", rolled_back, 300, progress=self.isvc_progress, interval=0.5)
            done = time.monotonic()
            window = self.traffic.window(t_promote, done)
            failed = [a for a in window if not a.ok]
            after = poll(
                "40 answers after the rollback, all from v2",
                lambda: (lambda w: w if len(w) >= 40 else None)(self.traffic.window(done)),
                60,
            )
            bad_after = [a for a in after if not a.ok or a.version != "2"]
            st = self.isvc_state()
            hist = (c.get("Model", "digits").get("status") or {}).get("history") or []
            rollback_entries = [h for h in hist if h.get("cause") == "CanaryRollback"]
            figures["v3: failing analysis -> rollback complete s"] = (
                round(done - failing["t"], 1) if "t" in failing else None
            )
            figures["v3: requests failed by the broken canary"] = len(failed)
            figures["v3: failed/non-v2 answers after rollback"] = len(bad_after)
            note(
                f"InferenceService: rolledBackVersion={st.get('rolledBackVersion')} history={st.get('history', [])[-1:]}"
            )
            note(f"Model history: {rollback_entries[-1:]}")
            if bad_after:
                raise StepFailed(f"{len(bad_after)} answers after the rollback were not v2: {bad_after[0]}")
            if not rollback_entries:
                raise StepFailed("no CanaryRollback entry in the Model's history")
            s.detail = (
                f"rolled back {done - failing.get('t', t_promote):.1f}s after the first failed measurement; "
                f"{len(failed)} requests failed on the canary; stable v2 kept serving"
            )
        self.traffic.stop()
        self.cnn()
        self.feature_steps()

    def cnn(self) -> None:
        """Steps 7 and 8: examples/cnn, a user's own DDP script, trained in 2 pods, registered,
        promoted and served; its signature and answers over REST."""
        c = self.c
        with Step("7. examples/cnn: your own DDP script in 2 pods, registered") as s:
            c.apply(yaml.safe_load((CNN / "model.yaml").read_text()), NS)
            job = yaml.safe_load((CNN / "trainingjob.yaml").read_text())
            job["spec"].update(imagePullPolicy="IfNotPresent", **REAL_NODE_SCHEDULING)
            spec = job["spec"]
            note(
                f"kubectl apply -f examples/cnn/trainingjob.yaml  # {' '.join(spec['command'] + spec['args'])}"
            )
            cnn = self.follow(job, time.monotonic(), apply=True)
            logs = c.kubectl("-n", NS, "logs", f"{job['metadata']['name']}-node-1", "--tail=1", check=False)
            if logs.strip():
                note(f"{job['metadata']['name']}-node-1 log: {logs.strip()[:150]}")
            if cnn["version"] != 1 or (cnn["accuracy"] or 0) < 0.9:
                raise StepFailed(f"expected digits-cnn version 1 with accuracy >= 0.9, got {cnn}")
            if not str(cnn["artifact"]).startswith(f"s3://{BUCKET}/{PREFIX}/digits-cnn/"):
                raise StepFailed(
                    f"expected the artifact in s3://{BUCKET}/{PREFIX}/digits-cnn/, got {cnn['artifact']}"
                )
            meta = json.loads(storage.read_bytes(storage.parse(cnn["artifact"]).join("metadata.json")))
            note(f"{cnn['artifact']}: format {meta['format']}, files {sorted(meta['files'])}")
            figures["cnn: apply -> version registered s"] = cnn["registered_s"]
            figures["cnn: registered accuracy"] = round(cnn["accuracy"], 4)
            figures["cnn: artifact"] = f"{cnn['artifact']} ({meta['format']})"
            s.detail = (
                f"2 pods (torchrun), registered {cnn['registered_s']}s after apply, "
                f"test accuracy {cnn['accuracy']:.4f}, {meta['format']}"
            )
        with Step("8. digits-cnn promoted, served, queried (REST and gRPC)") as s:
            self.promote(1, "digits-cnn")
            isvc = yaml.safe_load((CNN / "inferenceservice.yaml").read_text())
            isvc["spec"]["runtime"]["imagePullPolicy"] = "IfNotPresent"
            isvc["spec"].update(REAL_NODE_SCHEDULING)
            t0 = time.monotonic()
            c.apply(isvc, NS)
            poll(
                "InferenceService digits-cnn Ready with v1",
                lambda: (lambda st: st.get("stableVersion") == 1 and _ready(st))(
                    self.isvc_state("digits-cnn")
                ),
                240,
                progress=lambda: self.isvc_progress("digits-cnn"),
            )
            figures["cnn: isvc apply -> Ready s"] = round(time.monotonic() - t0, 1)
            svc = c.get("Service", "digits-cnn", NS, "v1")
            ip = svc["spec"]["clusterIP"]
            port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
            grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
            acc, shown = query_cnn(ip, port, grpc_port)
            figures["cnn: accuracy measured through the Service"] = round(acc, 4)
            if abs(acc - cnn["accuracy"]) > 0.005:
                raise StepFailed(
                    f"accuracy through the Service {acc:.4f} != registered {cnn['accuracy']:.4f}"
                )
            s.detail = f"Service {ip}:{port}, accuracy {acc:.4f} over REST (registered {cnn['accuracy']:.4f}); {shown}"

    def feature_steps(self) -> None:
        """Steps 9-11, on sklearn's digits loaded once."""
        from kiln.trainer.data import load_builtin

        ds = load_builtin("sklearn-digits")
        self.features(ds)
        self.drift(ds)

    def features(self, ds: Any) -> None:
        """Steps 9 and 10: a FeatureGroup over S3 Parquet, materialized into Redis by a Job on the
        real node; a version trained on its point-in-time join; served with entity keys only."""
        c = self.c
        from datetime import UTC, datetime

        import pyarrow.parquet as pq

        now = datetime.now(UTC).replace(microsecond=0)
        base = f"s3://{BUCKET}/{FEATURES_PREFIX}"
        with Step(f"9. FeatureGroup {FEATURE_GROUP}: materialized into Redis by Jobs on the real node") as s:
            for key, table in (
                ("pixels.parquet", dfs.source_table(ds.features, now)),
                ("labels.parquet", dfs.entity_table(ds.labels, now)),
            ):
                pq.write_table(table, OUT / key)
                storage.write_bytes(f"{base}/{key}", (OUT / key).read_bytes())
                note(f"{base}/{key}: {table.num_rows} rows, columns {', '.join(table.column_names[:4])}, ...")
            fg = dfs.feature_group(
                FEATURE_GROUP,
                source_uri=f"{base}/pixels.parquet",
                redis_address=c.env["KILN_REDIS_POD_ADDRESS"],
                start_time=now - dfs.INVERTED_AGO - dfs.CURRENT_AGO,
                scheduling=REAL_NODE_SCHEDULING,
            )
            t0 = time.monotonic()
            c.apply(fg, NS)
            st = poll(
                f"FeatureGroup {FEATURE_GROUP} Ready (backfill done)",
                lambda: (lambda st: st if _ready(st) else None)(
                    c.get("FeatureGroup", FEATURE_GROUP).get("status") or {}
                ),
                300,
                progress=lambda: self.fg_progress(),
            )
            figures["features: apply -> materialized s"] = round(time.monotonic() - t0, 1)
            run_ = st.get("lastRun") or {}
            figures["features: rows written to Redis"] = run_.get("rowsWritten")
            note(
                f"backfill {run_.get('jobName')}: {run_.get('windows')} windows, {run_.get('rowsWritten')} rows, "
                f"{run_.get('durationSeconds')}s; watermark {st.get('lastMaterializationTime')}"
            )
            pit = self.check_point_in_time(ds, now)
            self.check_online(ds)
            s.detail = (
                f"{run_.get('rowsWritten')} rows in Redis, {run_.get('windows')} windows; point-in-time "
                f"join: {pit}"
            )
        with Step(f"10. {FS_MODEL}: trained on the join, served with entity keys only") as s:
            self.train_and_serve_on_features(ds, base)
            s.detail = (
                f"registered accuracy {figures['features: registered accuracy']}, through the Service by "
                f"digit_id {figures['features: accuracy by entity key through the Service']}"
            )

    def fg_progress(self) -> str:
        st = self.c.get("FeatureGroup", FEATURE_GROUP).get("status") or {}
        ready = next((x for x in st.get("conditions") or [] if x.get("type") == "Ready"), {})
        return (
            f"Ready={ready.get('status')}/{ready.get('reason')}; active {(st.get('activeRun') or {}).get('jobName')}; "
            f"pods: {pod_phases(self.c.pods(f'kiln.dev/featuregroup={FEATURE_GROUP}'))}"
        )

    def check_point_in_time(self, ds: Any, now: Any) -> str:
        """``kiln features get-historical`` on this machine for the labels as of three times:
        before any event (no value), between the two rows (the inverted one), after both (the
        current one). Returns a one-line summary; StepFailed on a wrong value."""
        import numpy as np
        import pyarrow.parquet as pq

        cases = {
            "now-4h": (dfs.INVERTED_AGO + dfs.CURRENT_AGO, None),
            "now-2h": (dfs.INVERTED_AGO - dfs.CURRENT_AGO, dfs.expected_features(ds.features, inverted=True)),
            "now-30m": (dfs.LABELS_AGO, dfs.expected_features(ds.features)),
        }
        out = []
        for label, (ago, want) in cases.items():
            entities, result = OUT / f"entities-{label}.parquet", OUT / f"pit-{label}.parquet"
            pq.write_table(dfs.entity_table(ds.labels, now, ago), entities)
            run(str(VENV_BIN / "kiln"), "features", "get-historical", FEATURE_GROUP, "-n", NS,
                "--entities", str(entities), "-o", str(result))  # fmt: skip
            table = pq.read_table(result)
            got = np.column_stack(
                [
                    table.column(n).to_numpy(zero_copy_only=False).astype(np.float64)
                    for n in dfs.pixel_names("pixel")
                ]
            )
            if want is None:
                ok, what = bool(np.isnan(got).all()), "no value (null)"
            else:
                ok, what = (
                    bool(np.allclose(got, want, atol=1e-6)),
                    ("the now-3h row (inverted)" if label == "now-2h" else "the now-1h row"),
                )
            note(f"labels as of {label}: {len(got)} rows, every feature = {what}: {'yes' if ok else 'NO'}")
            if not ok:
                raise StepFailed(f"point-in-time join as of {label}: expected {what}")
            out.append(f"{label} -> {what.split(' (')[0]}")
        return "; ".join(out)

    def check_online(self, ds: Any) -> None:
        """``kiln features get-online`` for two digits: PRESENT, the now-1h values, scaled."""
        import numpy as np

        out = run(str(VENV_BIN / "kiln"), "features", "get-online", FEATURE_GROUP, "-n", NS,
                  "-e", "digit_id=0", "-e", "digit_id=1796", "--redis", self.c.env["KILN_REDIS_ADDRESS"])  # fmt: skip
        rows = json.loads(out)
        want = dfs.expected_features(ds.features)
        for row in rows:
            i = int(row["entity"]["digit_id"])
            values = np.array([float(row["values"][n]) for n in dfs.pixel_names("pixel")])
            statuses = set(row["statuses"].values())
            note(
                f"get-online digit_id={i}: statuses {sorted(statuses)}, event time {row['eventTimestamp']}, "
                f"pixel_3_3..3_6 {values[27:31].round(3).tolist()}"
            )
            if statuses != {"PRESENT"} or not np.allclose(values, want[i], atol=1e-6):
                raise StepFailed(f"online values of digit_id={i} are not the now-1h row's: {row}")

    def train_and_serve_on_features(self, ds: Any, base: str) -> None:
        """TrainingJob on the FeatureGroup (lineage checked), promoted, served by an
        InferenceService with spec.featureGroups; the held-out digits asked for by digit_id."""
        c = self.c
        model = yaml.safe_load((REPO / "examples" / "model.yaml").read_text())
        model["metadata"]["name"] = FS_MODEL
        # no `kiln promote` for this one: a version with accuracy >= 0.9 goes to Production by itself
        model["spec"]["promotionPolicy"] = [{"stage": "Production", "metric": "accuracy", "min": 0.9}]
        self.fs_model = model
        c.apply(model, NS)
        job = yaml.safe_load((DEMO_D / "trainingjob.yaml").read_text())
        job["metadata"]["name"] = f"{FS_MODEL}-v1"
        job["spec"]["modelRef"]["name"] = FS_MODEL
        self.fs_dataset = {
            "featureGroupRef": {"name": FEATURE_GROUP},
            "entityUri": f"{base}/labels.parquet",
            "labelColumn": dfs.LABEL,
            "timestampColumn": dfs.TIMESTAMP,
        }
        job["spec"]["dataset"] = self.fs_dataset
        note(f"kubectl apply -f - <<< TrainingJob {FS_MODEL}-v1 (dataset {job['spec']['dataset']})")
        v1 = self.follow(job, time.monotonic(), apply=True)
        version = next(
            v
            for v in (c.get("Model", FS_MODEL).get("status") or {}).get("versions") or []
            if v["version"] == 1
        )
        lineage = version.get("lineage") or {}
        note(f"version 1 lineage: featureGroup {lineage.get('featureGroup')}, schema digest "
             f"{lineage.get('featureGroupSchemaDigest')}")  # fmt: skip
        if lineage.get("featureGroup") != FEATURE_GROUP or not lineage.get("featureGroupSchemaDigest"):
            raise StepFailed(f"version 1 does not record the FeatureGroup it was trained on: {lineage}")
        figures["features: registered accuracy"] = round(v1["accuracy"], 4)
        poll(
            "the promotion policy to put version 1 in Production",
            lambda: (
                ((c.get("Model", FS_MODEL).get("status") or {}).get("stages") or {}).get("production") == 1
            ),
            60,
        )
        note("promotionPolicy (accuracy >= 0.9) put version 1 in Production")
        isvc = yaml.safe_load((DEMO_D / "inferenceservice.yaml").read_text())
        isvc["metadata"]["name"] = FS_MODEL
        isvc["spec"]["modelRef"]["name"] = FS_MODEL
        isvc["spec"]["replicas"] = 1
        isvc["spec"]["featureGroups"] = [{"name": FEATURE_GROUP}]
        c.apply(isvc, NS)
        poll(
            f"InferenceService {FS_MODEL} Ready with v1",
            lambda: (lambda st: st.get("stableVersion") == 1 and _ready(st))(self.isvc_state(FS_MODEL)),
            240,
            progress=lambda: self.isvc_progress(FS_MODEL),
        )
        test = held_out_rows(ds.labels)  # the rows the join's training never saw (same order)
        svc = c.get("Service", FS_MODEL, NS, "v1")
        ip = svc["spec"]["clusterIP"]
        port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
        body = {
            "inputs": [{"name": dfs.ENTITY, "datatype": "INT64", "shape": [len(test)], "data": test.tolist()}]
        }
        note(f'POST http://{ip}:{port}/v2/models/{FS_MODEL}/infer {{"inputs": [{{"name": "digit_id", '
             f'"datatype": "INT64", "shape": [{len(test)}], "data": <the held-out digit ids>}}]}}')  # fmt: skip
        doc = post_json(ip, port, f"/v2/models/{FS_MODEL}/infer", body)
        predicted = {o["name"]: o["data"] for o in doc["outputs"]}["predicted_class"]
        statuses = json.loads((doc.get("parameters") or {}).get("kiln.dev/feature-statuses", "{}"))
        counts: dict[str, int] = {}
        for st in statuses.get(FEATURE_GROUP, []):
            counts[st] = counts.get(st, 0) + 1
        acc = sum(int(p == int(ds.labels[i])) for p, i in zip(predicted, test, strict=True)) / len(test)
        note(
            f"{len(test)} held-out digits asked for by digit_id: accuracy {acc:.4f}; feature statuses {counts}"
        )
        figures["features: accuracy by entity key through the Service"] = round(acc, 4)
        if counts != {"PRESENT": len(test)}:
            raise StepFailed(f"expected every row's features PRESENT, got {counts}")
        if abs(acc - v1["accuracy"]) > 0.005:
            raise StepFailed(f"accuracy by entity key {acc:.4f} != registered {v1['accuracy']:.4f}")

    def drift(self, ds: Any) -> None:
        """Step 11, the loop closed with no human in it: inverted digits sent to ``digits-fs``
        raise its drift gauges, the PrometheusRule's alert fires, the Model's drift trigger starts
        a retraining TrainingJob, whose version the promotion policy puts in Production and the
        InferenceService canaries (analysed, promoted)."""
        c = self.c
        share = f'max(kiln_drift_share{{namespace="{NS}",model="{FS_MODEL}"}})'
        with Step("11. drift: inverted digits -> alert -> retraining -> new version canaried") as s:
            template = yaml.safe_load((DEMO_D / "trainingjob.yaml").read_text())["spec"]
            template.pop("modelRef")
            template["dataset"] = self.fs_dataset
            template["hyperparameters"]["seed"] = 7
            model = dict(self.fs_model)
            model["spec"] = dict(model["spec"], retraining={
                "template": {"spec": template},
                "triggers": {"drift": {
                    "prometheus": {"address": "http://prometheus.monitoring:9090"},
                    "query": 'max(kiln_drift_share{namespace="{{namespace}}",model="{{model}}"})',
                    "threshold": 0.5, "forSeconds": 10, "intervalSeconds": 5,
                }},
                "cooldownSeconds": 3600,
            })  # fmt: skip
            c.apply(model, NS)
            note(f"Model {FS_MODEL}: spec.retraining.triggers.drift: {share} > 0.5 for 10s (cooldown 1h)")
            baseline = poll("the drift share of the held-out traffic", lambda: self.prom_value(share), 60)
            note(f"drift share of step 10's held-out digits (in distribution): {baseline:.3f}")
            figures["drift: share before (in-distribution traffic)"] = round(baseline, 3)
            svc = c.get("Service", FS_MODEL, NS, "v1")
            port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
            x = dfs.expected_features(ds.features, inverted=True)
            self.traffic = Traffic(svc["spec"]["clusterIP"], port, x, ds.labels, model=FS_MODEL)
            t0 = time.monotonic()
            self.traffic.start()
            note(f"sending inverted digits (each pixel 1 - x) to {FS_MODEL} at 20 requests/s")
            drifted = poll(
                "the drift share over 0.5", lambda: (v := self.prom_value(share)) and v > 0.5 and v, 120
            )
            figures["drift: share while inverted digits are served"] = round(drifted, 3)
            figures["drift: inverted traffic -> share over 0.5 s"] = round(time.monotonic() - t0, 1)
            psi = self.prom_value(
                f'max(kiln_feature_drift{{namespace="{NS}",model="{FS_MODEL}",method="psi"}})'
            )
            note(
                f"drift share {drifted:.3f} after {time.monotonic() - t0:.1f}s; max feature PSI {psi or 0:.2f}"
            )
            alert = poll("the alert KilnDatasetDrift firing", lambda: self.firing("KilnDatasetDrift"), 120)
            figures["drift: inverted traffic -> alert firing s"] = round(time.monotonic() - t0, 1)
            note(
                f"alert {alert['labels']['alertname']} firing: {alert['annotations'].get('summary', '')[:120]}"
            )
            run_ = poll(
                "the retraining TrainingJob",
                lambda: ((c.get("Model", FS_MODEL).get("status") or {}).get("retraining") or {}).get(
                    "lastRun"
                ),
                120,
            )
            figures["drift: inverted traffic -> retraining job created s"] = round(time.monotonic() - t0, 1)
            note(
                f"TrainingJob {run_['name']} created by the Model (triggers {run_['triggers']}): {run_.get('message', '')[:120]}"
            )
            # the Model records the run, then creates its TrainingJob
            job = poll(f"TrainingJob {run_['name']}", lambda: c.get("TrainingJob", run_["name"]), 30)
            v2 = self.follow(job, t0)
            poll(
                f"the promotion policy to put version {v2['version']} in Production",
                lambda: (
                    ((c.get("Model", FS_MODEL).get("status") or {}).get("stages") or {}).get("production")
                    == v2["version"]
                ),
                60,
            )
            poll(
                f"version {v2['version']} canaried and promoted",
                lambda: (
                    lambda st: (
                        st.get("stableVersion") == v2["version"] and st.get("rolloutPhase") == "Promoted"
                    )
                )(self.isvc_state(FS_MODEL)),
                300,
                progress=lambda: self.isvc_progress(FS_MODEL),
                interval=0.5,
            )
            serving = round(time.monotonic() - t0, 1)
            window = self.traffic.window(t0)
            self.traffic.stop()
            failed = [a for a in window if not a.ok]
            figures["drift: inverted traffic -> new version serving s"] = serving
            figures["drift: failed requests during the loop"] = len(failed)
            hist = (c.get("Model", FS_MODEL).get("status") or {}).get("history") or []
            for h in hist[-3:]:
                note(f"Model history: {h.get('cause')}: {h.get('message', '')[:140]}")
            if failed:
                raise StepFailed(
                    f"{len(failed)} of {len(window)} requests failed during the loop: {failed[0].error}"
                )
            s.detail = (
                f"share {baseline:.2f} -> {drifted:.2f}; alert, retraining {run_['name']}, v{v2['version']} "
                f"(acc {v2['accuracy']:.3f}) serving {serving}s after the drift began; {len(window)} requests, 0 failed"
            )

    # ---- the LLM steps (--only llm)
    def llm_steps(self) -> None:
        """Steps 12-14: an LLM in the registry, served by vLLM, streamed through the Service with the
        ``openai`` client, and a second version canaried under a time-to-first-token guard."""
        versions = self.llm_versions()
        base = self.llm_serve()
        self.llm_canary(versions, base)

    def llm_versions(self) -> dict[int, tuple[str, str]]:
        """Step 12: the LLM image, two tiny Llama versions in S3 (n -> (URI, digest)), version 1
        imported."""
        c = self.c
        with Step("12. LLM: image kiln-llm (vLLM), two tiny Llamas in S3, Model `tiny-llama` v1") as s:
            t0 = time.monotonic()
            info = kimages.build(["llm"], tag=self.args.image_tag, import_=True)["llm"]
            figures["llm image build+import seconds"] = round(time.monotonic() - t0, 1)
            python = dl.vllm_python()
            versions: dict[int, tuple[str, str]] = {}
            for n in (1, 2):
                local = OUT / dl.MODEL / f"v{n}"
                shutil.rmtree(local, ignore_errors=True)
                digest = dl.make_version(python, local, seed=n)
                uri = f"s3://{BUCKET}/{PREFIX}/{dl.MODEL}/v{n}"
                storage.upload_dir(local, uri, last=["metadata.json"])
                versions[n] = (uri, digest)
                note(f"v{n}: {', '.join(sorted(p.name for p in local.iterdir()))} -> {uri} ({digest[:19]})")
            c.apply(self.llm_model(versions, [1]), NS)
            v1 = poll("tiny-llama version 1 registered", lambda: self.llm_version(1), 120)
            if v1.get("format") != "hf-transformers":
                raise StepFailed(f"version 1 has format {v1.get('format')!r}, not hf-transformers")
            s.detail = f"image {info.size / 2**30:.2f} GiB; v1 registered ({v1['format']}), v2 uploaded"
        return versions

    def llm_model(self, versions: dict[int, tuple[str, str]], imported: list[int]) -> dict[str, Any]:
        """Model tiny-llama importing ``imported`` of ``versions`` (n -> (URI, digest)), v1 in Production."""
        entries = [{"artifactUri": versions[n][0], "digest": versions[n][1]} for n in imported]
        return {
            "apiVersion": API_VERSION,
            "kind": "Model",
            "metadata": {"name": dl.MODEL},
            "spec": {"import": entries, "stages": {"production": 1}},
        }

    def llm_version(self, n: int) -> dict[str, Any] | None:
        status = self.c.get("Model", dl.MODEL).get("status") or {}
        return next((v for v in status.get("versions") or [] if v.get("version") == n), None)

    def llm_serve(self) -> str:
        """Step 13: InferenceService `chat` serving v1; a streamed chat completion through the
        Service; the first server-sent event through the Service against the pod directly."""
        c = self.c
        with Step("13. InferenceService `chat` (vLLM) serves v1: openai client streams via the Service") as s:
            t0 = time.monotonic()
            c.apply(yaml.safe_load((DEMO_D / "llm-inferenceservice.yaml").read_text()), NS)
            poll(
                "InferenceService chat Ready with v1",
                lambda: (lambda st: st.get("stableVersion") == 1 and _ready(st))(self.isvc_state(dl.ISVC)),
                900,
                progress=lambda: self.isvc_progress(dl.ISVC),
                interval=1.0,
            )
            figures["llm: apply -> Ready s"] = round(time.monotonic() - t0, 1)
            svc = c.get("Service", dl.ISVC, NS, "v1")
            port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
            base = f"http://{svc['spec']['clusterIP']}:{port}/v1"
            import openai

            with openai.OpenAI(base_url=base, api_key="unused", max_retries=0) as client:
                served = [m.id for m in client.models.list()]
            if served != [dl.MODEL]:
                raise StepFailed(f"/v1/models lists {served}, expected [{dl.MODEL!r}]")
            one = dl.stream_chat(base, max_tokens=24)
            if not one.ok:
                raise StepFailed(f"streamed chat completion failed: {one.error}")
            note(f"{base}/chat/completions (stream): {one.chunks} chunks, first text after {one.ttft:.3f}s")
            note(f"  {dl.PROMPT!r} -> {one.text!r} (random weights: the text is noise)")
            pod = next(p for p in c.pods(f"kiln.dev/inferenceservice={dl.ISVC}") if p["status"].get("podIP"))
            direct = f"http://{pod['status']['podIP']}:8080/v1"
            self.llm_first_bytes(base, direct)
            s.detail = f"{one.chunks} chunks streamed through {base}; models {served}"
        return base

    def llm_first_bytes(self, via_service: str, direct: str, n: int = 20) -> None:
        """The first server-sent event of ``n`` streams through the Service and ``n`` to the pod,
        alternated; p50/p95 of each into the figures."""
        import numpy as np

        times: dict[str, list[float]] = {"service": [], "pod": []}
        for _ in range(n):
            for where, url in (("service", via_service), ("pod", direct)):
                st = dl.stream_chat(url, max_tokens=4)
                if not st.ok or st.first_chunk is None:
                    raise StepFailed(f"a stream to the {where} failed: {st.error}")
                times[where].append(st.first_chunk)
        for where, values in times.items():
            p50, p95 = (float(np.percentile(values, q)) * 1e3 for q in (50, 95))
            figures[f"llm: first event via the {where} p50/p95 ms ({n} streams)"] = f"{p50:.1f} / {p95:.1f}"
            note(f"first server-sent event via the {where}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")

    def llm_canary(self, versions: dict[int, tuple[str, str]], base: str) -> None:
        """Step 14: v2 imported and promoted while streams run through the Service; the canary is
        analysed on the engines' time to first token and error ratio, and promoted."""
        c = self.c
        with Step("14. LLM v2 canaried under streaming load (TTFT p95 guard), promoted") as s:
            self.streams = load = dl.StreamLoad(base).start()
            c.apply(self.llm_model(versions, [1, 2]), NS)
            poll("tiny-llama version 2 registered", lambda: self.llm_version(2), 120)
            t_promote = time.monotonic()
            self.promote(2, model=dl.MODEL)
            poll(
                "v2 promoted to stable",
                lambda: (
                    lambda st: (
                        st.get("stableVersion") == 2 and st.get("rolloutPhase") == "Promoted" and _ready(st)
                    )
                )(self.isvc_state(dl.ISVC)),
                900,
                progress=lambda: f"{self.isvc_progress(dl.ISVC)}; {load.summary(t_promote)}",
                interval=1.0,
            )
            promoted = time.monotonic()
            load.stop()
            window = load.window(t_promote)
            failed = [st for st in window if not st.ok]
            an = self.isvc_state(dl.ISVC).get("analysis") or {}
            served = self.prom_by_version(
                f'sum by (version) (vllm:request_success_total{{namespace="{NS}"}})'
            )
            figures["llm v2: promotion -> promoted s"] = round(promoted - t_promote, 1)
            figures["llm v2: streams during the rollout / failed (target 0)"] = (
                f"{len(window)} / {len(failed)}"
            )
            figures["llm v2: analysis measurements ok/failed/inconclusive"] = (
                f"{an.get('successes', 0)}/{an.get('failures', 0)}/{an.get('inconclusive', 0)}"
            )
            figures["llm: requests per version (Prometheus)"] = served
            for st in failed[:5]:
                note(f"failed stream: {st.error}")
            if failed:
                raise StepFailed(f"{len(failed)} of {len(window)} streams failed during the rollout")
            if not an.get("successes"):
                raise StepFailed(f"the canary was promoted without a successful analysis: {an}")
            if set(served) != {"1", "2"}:
                raise StepFailed(f"expected requests answered by both versions, Prometheus has {served}")
            s.detail = (
                f"promoted {promoted - t_promote:.0f}s after promotion; {len(window)} streams, 0 failed; "
                f"per version {served}"
            )

    def prom_by_version(self, promql: str) -> dict[str, int]:
        """``promql`` (a sum by version) on the demo's Prometheus: version -> value."""
        assert self.prom is not None
        return {r["metric"].get("version", "?"): round(float(r["value"][1])) for r in self.prom.query(promql)}

    def prom_value(self, promql: str) -> float | None:
        """The value of a one-sample PromQL query on the demo's Prometheus (None: no sample)."""
        assert self.prom is not None
        result = self.prom.query(promql)
        return float(result[0]["value"][1]) if result else None

    def firing(self, alertname: str) -> dict[str, Any] | None:
        """The firing alert ``alertname`` of namespace kiln-demo, from Prometheus's /api/v1/alerts."""
        assert self.prom is not None
        return next(
            (
                a
                for a in self.prom.alerts()
                if a["labels"].get("alertname") == alertname
                and a["labels"].get("namespace") == NS
                and a.get("state") == "firing"
            ),
            None,
        )

    def close(self) -> None:
        if self.traffic:
            self.traffic.stop()
        if self.streams:
            self.streams.stop()
        if self.prom:
            self.prom.stop()


def _ready(status: dict[str, Any]) -> bool:
    return any(
        cond.get("type") == "Ready" and cond.get("status") == "True"
        for cond in status.get("conditions") or []
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write steps and figures here")
    p.add_argument(
        "--image-tag",
        default="dev",
        help="tag of the images built, imported and run (default dev, as the manifests say); another "
        "tag keeps a demo from replacing the kiln-*:dev images others on the same cluster run",
    )
    p.add_argument(
        "--only",
        choices=["features", "llm"],
        help="after the set-up, run only these steps: features (9-11, also in the full demo) or llm "
        "(12-14, only here: the LLM runtime needs a 7 GB image and the vLLM venv)",
    )
    args = p.parse_args()
    if os.environ.get("KILN_DEMO_CLUSTER", "local") != "local":
        print(
            "hack/demo runs on the local cluster (hack/cluster up --real-node) only: its Prometheus and "
            "load generator run on this machine and must reach the pod and Service networks, which a "
            "kind cluster's are not. On kind, follow what hack/kind-up.sh prints.",
            file=sys.stderr,
        )
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    demo = Demo(args)
    ok = True
    try:
        demo.cluster_and_images()
        demo.namespace()  # first: with watchNamespaces the chart puts its Role in this namespace
        demo.install()
        demo.prometheus()
        if args.only == "features":
            demo.feature_steps()
        elif args.only == "llm":
            demo.llm_steps()
        else:
            demo.main()
    except StepFailed:
        ok = False
    except Exception as e:  # a bug or an unexpected API answer: still print the summary
        ok = False
        steps.append(("unexpected error", False, 0.0, f"{type(e).__name__}: {e}"))
        import traceback

        traceback.print_exc()
    finally:
        demo.close()
    total = time.monotonic() - t0
    figures["demo wall time s"] = round(total, 1)
    summary(total)
    ok = ok and all(s[1] for s in steps)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "ok": ok,
                    "steps": [
                        {"name": n, "ok": o, "seconds": round(t, 1), "detail": d} for n, o, t, d in steps
                    ],
                    "figures": figures,
                },
                indent=1,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
