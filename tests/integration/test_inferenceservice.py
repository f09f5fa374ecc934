"""InferenceService against a real API server with kwok nodes, a real Prometheus and real model servers.

kwok pods never run a process, so the canary analysis cannot scrape them. Instead the module
starts REAL ``kiln-serve`` processes on loopback (version 2 healthy, version 3 answering every
request 500 through ``--fail-rate 1.0``), drives traffic at them, and a REAL Prometheus (Debian's
``prometheus`` package, installed with apt when missing) scrapes them every second. The
InferenceServices point their analysis at that Prometheus with queries filtered by the canary's
``version`` label, so the operator judges version 2 and 3 by the metrics those versions really
export: 2 is promoted, 3 is rolled back.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kiln import API_VERSION, kube
from kiln.conditions import get_condition, rfc3339

from .health import argocd_health, kstatus
from .helpers import run_operator, wait_for, wait_for_events

MODEL = "digits"
PROMETHEUS_DEB = "prometheus"

# Error ratio of the canary's version over the last 10 s. `or vector(0)`: a healthy server has no
# 5xx series at all, which must read as 0 errors, not as "no data"; with no requests at all the
# denominator is empty and the whole query returns no data (noDataPolicy decides).
ERROR_RATIO = (
    '(sum(rate(kiln_inference_requests_total{model="{{model}}",version="{{version}}",code=~"5.."}[10s])) '
    "or vector(0)) / "
    'sum(rate(kiln_inference_requests_total{model="{{model}}",version="{{version}}"}[10s]))'
)


# --------------------------------------------------------------------------------------------
# real model servers, real Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Artifact:
    path: Path
    digest: str


def make_artifact(directory: Path, seed: int) -> Artifact:
    """A tiny untrained MLP (4 features, 2 classes) as a complete Kiln artifact."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from kiln.artifact import (
        CONFIG_FILE,
        METADATA_FILE,
        WEIGHTS_FILE,
        ArtifactMetadata,
        ModelConfig,
        sha256_file,
        utc_now_rfc3339,
    )
    from kiln.nn import build_model

    config = ModelConfig(
        inputSize=4, hiddenSizes=[8], numClasses=2, inputMean=[0.0] * 4, inputStd=[1.0] * 4, labels=["a", "b"]
    )
    torch.manual_seed(seed)
    model = build_model(config)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    digest = sha256_file(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(config.model_dump_json())
    meta = ArtifactMetadata(modelName=MODEL, weightsDigest=digest, createdAt=utc_now_rfc3339())
    (directory / METADATA_FILE).write_text(meta.model_dump_json())
    return Artifact(directory, digest)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ModelServer:
    version: int
    artifact: Artifact
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    @property
    def infer_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/{MODEL}/infer"


def start_server(
    tmp: Path, art: Artifact, version: int, *extra: str, env: dict[str, str] | None = None
) -> ModelServer:
    port, metrics_port = free_port(), free_port()
    exe = Path(sys.executable).with_name("kiln-serve")
    log = open(tmp / f"kiln-serve-v{version}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            str(exe),
            "--artifact",
            str(art.path),
            "--digest",
            art.digest,
            "--model-name",
            MODEL,
            "--model-version",
            str(version),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--grpc-port",  # not the default 8081: several servers (and test sessions) share loopback
            str(free_port()),
            "--max-batch-delay-ms",
            "0",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = ModelServer(version, art, proc, port, metrics_port)
    wait_for(
        lambda: proc.poll() is not None or http_ok(f"http://127.0.0.1:{port}/v2/health/ready"),
        60,
        message=f"kiln-serve version {version} to be ready",
    )
    assert proc.poll() is None, (tmp / f"kiln-serve-v{version}.log").read_text()
    return server


def ensure_prometheus() -> str:
    """Path of the prometheus binary; installs Debian's package with apt when it is missing."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("prometheus is not installed and apt-get (as root) is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", PROMETHEUS_DEB],
        check=True,
        env=env,
        capture_output=True,
    )
    found = shutil.which("prometheus")
    assert found, "apt-get installed prometheus but it is not on PATH"
    return found


@dataclass
class Prometheus:
    address: str
    proc: subprocess.Popen[bytes]

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            return list(json.loads(r.read())["data"]["result"])


def start_prometheus(tmp: Path, targets: list[str], config: dict[str, Any] | None = None) -> Prometheus:
    """A real Prometheus scraping ``targets`` every second, or running ``config`` when given."""
    binary = ensure_prometheus()
    port = free_port()
    cfg = tmp / "prometheus.yml"
    cfg.write_text(
        json.dumps(  # JSON is YAML
            config
            or {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "kiln-serve", "static_configs": [{"targets": targets}]}],
            }
        )
    )
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc)
    wait_for(
        lambda: proc.poll() is not None or http_ok(f"{prom.address}/-/ready"),
        60,
        message="prometheus to be ready",
    )
    assert proc.poll() is None, (tmp / "prometheus.log").read_text()
    return prom


class Traffic:
    """Background OIP v2 infer requests to each server, about 50 per second each."""

    def __init__(self, servers: list[ModelServer]) -> None:
        self._stop = threading.Event()
        body = json.dumps(
            {
                "inputs": [
                    {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [0.1, 0.2, 0.3, 0.4]}
                ]
            }
        ).encode()
        self._threads = [
            threading.Thread(target=self._run, args=(s.infer_url, body), daemon=True) for s in servers
        ]
        for t in self._threads:
            t.start()

    def _run(self, url: str, body: bytes) -> None:
        while not self._stop.is_set():
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    r.read()
            except (urllib.error.URLError, OSError):
                pass  # the faulty server answers 500 on purpose
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


@dataclass
class Fleet:
    healthy: ModelServer  # version 2
    faulty: ModelServer  # version 3, --fail-rate 1.0
    prometheus: Prometheus


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, store: Store) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("isvc-fleet")
    procs: list[subprocess.Popen[bytes]] = []
    traffic: Traffic | None = None
    try:
        healthy = start_server(tmp, store.artifact(2), 2)
        procs.append(healthy.proc)
        faulty = start_server(tmp, store.artifact(3), 3, "--fail-rate", "1.0")
        procs.append(faulty.proc)
        prom = start_prometheus(tmp, [f"127.0.0.1:{s.metrics_port}" for s in (healthy, faulty)])
        procs.append(prom.proc)
        traffic = Traffic([healthy, faulty])

        def has_rates() -> bool:
            vals = [
                prom.query(ERROR_RATIO.replace("{{model}}", MODEL).replace("{{version}}", v)) for v in "23"
            ]
            return all(len(v) == 1 for v in vals)

        wait_for(has_rates, 60, interval=0.5, message="prometheus to have request rates of versions 2 and 3")
        yield Fleet(healthy, faulty, prom)
    finally:
        if traffic is not None:
            traffic.stop()
        for p in reversed(procs):
            _stop(p)


# --------------------------------------------------------------------------------------------
# objects


class Store:
    """Real artifact directories, one per version (the Model controller verifies what it puts in force)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[int, Artifact] = {}
        self._entries: dict[int, dict[str, Any]] = {}

    def artifact(self, v: int) -> Artifact:
        if v not in self._made:
            self._made[v] = make_artifact(self.root / f"{MODEL}-v{v}", seed=v)
        return self._made[v]

    def version(self, v: int) -> dict[str, Any]:
        """A Model status ``versions[]`` entry for version ``v``."""
        if v not in self._entries:
            art = self.artifact(v)
            self._entries[v] = {
                "version": v,
                "artifactUri": art.path.as_uri(),
                "digest": art.digest,
                "createdAt": rfc3339(),
            }
        return dict(self._entries[v])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("isvc-artifacts"))


def create_model(
    api: client.ApiClient, ns: str, versions: list[dict[str, Any]], production: int | None
) -> None:
    body = {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": MODEL, "namespace": ns},
        "spec": {},
    }
    created = kube.create(api, body)
    assert created is not None
    set_production(api, ns, versions, production)


def set_production(
    api: client.ApiClient, ns: str, versions: list[dict[str, Any]], production: int | None
) -> None:
    """Simulate the registry: ``versions`` are registered and ``production`` was promoted to Production.

    Written to the Model's status as the registry itself records a promotionPolicy pick
    (``policyStages``) and the stages in force (``stages``), so the Model controller, which
    recomputes ``stages`` from spec and policy, keeps them.
    """

    def patch() -> bool:
        model = kube.get(api, API_VERSION, "Model", ns, MODEL)
        assert model is not None
        stages = {"production": production} if production is not None else None
        status: dict[str, Any] = {
            "versions": versions,
            "latestVersion": max(v["version"] for v in versions),
            "policyStages": stages,
            "stages": stages,
        }
        try:
            kube.patch_status(api, model, status, resource_version=model["metadata"]["resourceVersion"])
        except kube.Conflict:
            return False
        return True

    wait_for(patch, 30, message="Model status patch")

    def in_force() -> bool:
        st = (kube.get(api, API_VERSION, "Model", ns, MODEL) or {}).get("status") or {}
        return (st.get("stages") or {}).get("production") == production and len(
            st.get("versions") or []
        ) == len(versions)

    wait_for(in_force, 30, message=f"Model production={production} in force")


def isvc_body(ns: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": MODEL, "namespace": ns},
        "spec": {
            "modelRef": {"name": MODEL, "stage": "Production"},
            "runtime": {
                "image": "kiln/server:dev",
                "imagePullPolicy": "Never",
                "artifactVolume": {"emptyDir": {}},
            },
            "replicas": 2,
            "monitoring": {"serviceMonitor": {"labels": {"release": "prometheus"}}},
        },
    }
    body["spec"].update(copy.deepcopy(spec))
    return body


def create_isvc(api: client.ApiClient, ns: str, **spec: Any) -> None:
    assert kube.create(api, isvc_body(ns, **spec)) is not None


def patch_spec(api: client.ApiClient, ns: str, spec: dict[str, Any]) -> None:
    kube.patch(api, API_VERSION, "InferenceService", ns, MODEL, {"spec": spec})


def isvc(api: client.ApiClient, ns: str) -> dict[str, Any]:
    obj = kube.get(api, API_VERSION, "InferenceService", ns, MODEL)
    assert obj is not None
    return obj


def status(api: client.ApiClient, ns: str) -> dict[str, Any]:
    return dict(isvc(api, ns).get("status") or {})


def cond(api: client.ApiClient, ns: str, type_: str) -> dict[str, Any]:
    return get_condition(status(api, ns).get("conditions"), type_) or {}


def wait_status(
    api: client.ApiClient, ns: str, pred: Any, timeout: float = 60, message: str = "status"
) -> dict:
    def check() -> dict[str, Any] | None:
        st = status(api, ns)
        return st if pred(st) else None

    try:
        return wait_for(check, timeout, interval=0.25, message=message)
    except TimeoutError as e:
        raise AssertionError(f"{e}; last status: {json.dumps(status(api, ns), indent=1)[:6000]}") from None


def deployment(api: client.ApiClient, ns: str, track: str) -> dict[str, Any] | None:
    return kube.get(api, "apps/v1", "Deployment", ns, f"{MODEL}-{track}")


def env_of(dep: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}


def analysis(prom: Prometheus, **over: Any) -> dict[str, Any]:
    return {
        "prometheus": {"address": prom.address},
        "intervalSeconds": 1,
        "failureLimit": 0,
        "inconclusiveLimit": 3,
        "noDataPolicy": "Inconclusive",
        "metrics": [{"name": "error-ratio", "query": ERROR_RATIO, "max": 0.05}],
        **over,
    }


@pytest.fixture
def api(kube: client.ApiClient) -> client.ApiClient:
    return kube


# --------------------------------------------------------------------------------------------
# tests


def test_children_and_status(api, store, namespace, operator):
    ns = namespace
    create_model(api, ns, [store.version(1)], production=1)
    create_isvc(api, ns)
    st = wait_status(
        api,
        ns,
        lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("status") == "True",
        message="Ready=True",
    )
    assert st["stableVersion"] == 1 and st["rolloutPhase"] == "Healthy" and "canaryVersion" not in st
    assert st["url"] == f"http://{MODEL}.{ns}.svc.cluster.local/v2/models/{MODEL}"
    assert st["observedGeneration"] == isvc(api, ns)["metadata"]["generation"]
    assert get_condition(st["conditions"], "ModelLoaded")["status"] == "True"
    assert get_condition(st["conditions"], "CanaryReady")["reason"] == "NoCanary"
    assert get_condition(st["conditions"], "RolloutHealthy")["status"] == "True"

    dep = deployment(api, ns, "stable")
    assert dep is not None and deployment(api, ns, "canary") is None
    assert (
        dep["spec"]["replicas"] == 2 and dep["status"]["readyReplicas"] == 2
    )  # admitted under restricted PSS
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["kiln.dev/model-version"] == "1" and labels["kiln.dev/track"] == "stable"
    env = env_of(dep)
    assert env["KILN_ARTIFACT_URI"] == store.version(1)["artifactUri"]
    assert env["KILN_ARTIFACT_DIGEST"] == store.version(1)["digest"]
    assert env["KILN_MODEL_NAME"] == MODEL and env["KILN_MODEL_VERSION"] == "1"
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {"name": "artifacts", "mountPath": "/var/lib/kiln/artifacts", "readOnly": True} in c[
        "volumeMounts"
    ]

    svc = kube.get(api, "v1", "Service", ns, MODEL)
    assert svc is not None and svc["spec"]["selector"] == {"kiln.dev/inferenceservice": MODEL}
    sm = kube.get(api, "monitoring.coreos.com/v1", "ServiceMonitor", ns, MODEL)
    assert sm is not None and sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    wait_for_events(api, ns, "InferenceService", {"Deployed"})

    # a child deleted by hand comes back (drift), a child no longer wanted goes away
    kube.delete(api, "v1", "Service", ns, MODEL)
    wait_for(lambda: kube.get(api, "v1", "Service", ns, MODEL), 30, message="Service to be recreated")
    patch_spec(api, ns, {"monitoring": {"serviceMonitor": {"enabled": False}}})
    wait_for(
        lambda: kube.get(api, "monitoring.coreos.com/v1", "ServiceMonitor", ns, MODEL) is None,
        30,
        message="ServiceMonitor to be deleted",
    )


def test_model_resolution_errors_and_model_watch(api, store, namespace, operator):
    ns = namespace
    create_isvc(api, ns)
    wait_status(
        api,
        ns,
        lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("reason") == "ModelNotFound",
        message="Ready=False ModelNotFound",
    )
    assert deployment(api, ns, "stable") is None
    create_model(api, ns, [store.version(1)], production=None)  # registered, nothing in Production
    wait_status(
        api,
        ns,
        lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("reason") == "VersionNotResolved",
        message="Ready=False VersionNotResolved",
    )
    assert get_condition(status(api, ns)["conditions"], "ModelLoaded")["status"] == "False"
    set_production(api, ns, [store.version(1)], production=1)  # only a Model event wakes the isvc
    wait_status(
        api,
        ns,
        lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("status") == "True",
        message="Ready=True once Production is set",
    )
    wait_for_events(api, ns, "InferenceService", {"ModelNotFound", "VersionNotResolved"})


def test_rolled_back_canary_is_failed_for_gitops_tools(api, store, namespace, operator):
    """After a rollback, kstatus (Flux, kpt) says Failed and Argo CD Degraded, through a spec change,
    until the model resolves to a new version."""
    ns = namespace
    v1, v2, v3 = store.version(1), store.version(2), store.version(3)
    create_model(api, ns, [v1], production=1)
    create_isvc(api, ns, rollout={"steps": [{"weight": 50, "pauseSeconds": 3600}]})
    wait_status(
        api, ns, lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("status") == "True"
    )
    obj = isvc(api, ns)
    assert kstatus(obj)["status"] == "Current" and argocd_health(obj)["status"] == "Healthy"

    set_production(api, ns, [v1, v2], production=2)
    wait_status(api, ns, lambda s: s.get("canaryVersion") == 2, message="canary 2")
    obj = isvc(api, ns)
    assert kstatus(obj)["status"] == "InProgress" and argocd_health(obj)["status"] == "Progressing"

    patch_spec(api, ns, {"rollout": {"abort": True}})
    st = wait_status(
        api,
        ns,
        lambda s: s.get("rolloutPhase") == "RolledBack" and get_condition(s.get("conditions"), "Stalled"),
        message="rolled back, Stalled",
    )
    stalled = get_condition(st["conditions"], "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "RolledBack"
    assert "canary version 2 was rolled back" in stalled["message"]
    obj = isvc(api, ns)
    assert kstatus(obj) == {"status": "Failed", "message": stalled["message"]}
    health = argocd_health(obj)
    assert health["status"] == "Degraded" and health["message"].startswith("RolledBack: ")

    # a spec change alone does not retry the version: still Failed, for the new generation
    patch_spec(api, ns, {"rollout": {"abort": False}})
    gen = isvc(api, ns)["metadata"]["generation"]
    wait_status(api, ns, lambda s: s.get("observedGeneration") == gen, message="new generation seen")
    assert kstatus(isvc(api, ns))["status"] == "Failed"

    # a new version is a new rollout: no longer stalled
    set_production(api, ns, [v1, v2, v3], production=3)
    wait_status(
        api,
        ns,
        lambda s: s.get("canaryVersion") == 3 and not get_condition(s.get("conditions"), "Stalled"),
        message="canary 3, not Stalled",
    )
    obj = isvc(api, ns)
    assert kstatus(obj)["status"] == "InProgress" and argocd_health(obj)["status"] == "Progressing"


def test_gateway_api_canary_and_hpa(api, store, namespace, operator):
    ns = namespace
    v1, v2 = store.version(1), store.version(2)
    create_model(api, ns, [v1], production=1)
    rollout = {
        "trafficRouting": "GatewayAPI",
        "gatewayAPI": {"parentRefs": [{"name": "web"}]},
        "steps": [{"weight": 25, "pauseSeconds": 3600}],
    }
    create_isvc(api, ns, rollout=rollout, autoscaling={"minReplicas": 2, "maxReplicas": 4})
    wait_status(
        api,
        ns,
        lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("status") == "True",
        message="Ready=True",
    )
    hpa = kube.get(api, "autoscaling/v2", "HorizontalPodAutoscaler", ns, MODEL)
    assert hpa is not None and hpa["spec"]["scaleTargetRef"]["name"] == f"{MODEL}-stable"
    route = kube.get(api, "gateway.networking.k8s.io/v1", "HTTPRoute", ns, MODEL)
    assert route is not None
    assert route["spec"]["rules"][0]["backendRefs"] == [
        {"group": "", "kind": "Service", "name": f"{MODEL}-stable", "port": 80, "weight": 100}
    ]

    set_production(api, ns, [v1, v2], production=2)
    st = wait_status(
        api,
        ns,
        lambda s: s.get("canaryVersion") == 2 and s.get("canaryWeight") == 25,
        message="canary 2 at weight 25",
    )
    assert st["rolloutPhase"] == "Progressing" and st["currentStep"] == 0 and st.get("stepStartTime")
    canary = deployment(api, ns, "canary")
    assert canary is not None and env_of(canary)["KILN_MODEL_VERSION"] == "2"
    assert canary["spec"]["replicas"] == 1  # ceil(2 * 25%)
    assert canary["spec"]["template"]["metadata"]["labels"]["kiln.dev/track"] == "canary"
    route = kube.get(api, "gateway.networking.k8s.io/v1", "HTTPRoute", ns, MODEL)
    weights = {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}
    assert weights == {f"{MODEL}-stable": 75, f"{MODEL}-canary": 25}
    assert kube.get(api, "v1", "Service", ns, f"{MODEL}-canary") is not None
    assert get_condition(st["conditions"], "Ready")["reason"] == "RolloutInProgress"
    assert get_condition(st["conditions"], "CanaryReady")["status"] == "True"

    patch_spec(api, ns, {"rollout": {"steps": [{"weight": 25, "pauseSeconds": 0}]}})  # end the pause
    st = wait_status(api, ns, lambda s: s.get("rolloutPhase") == "Promoted", message="promotion")
    assert st["stableVersion"] == 2 and "canaryVersion" not in st
    assert env_of(deployment(api, ns, "stable"))["KILN_MODEL_VERSION"] == "2"
    wait_for(lambda: deployment(api, ns, "canary") is None, 30, message="canary Deployment deleted")
    wait_for(
        lambda: kube.get(api, "v1", "Service", ns, f"{MODEL}-canary") is None,
        30,
        message="canary Service gone",
    )
    route = kube.get(api, "gateway.networking.k8s.io/v1", "HTTPRoute", ns, MODEL)
    assert [b["name"] for b in route["spec"]["rules"][0]["backendRefs"]] == [f"{MODEL}-stable"]
    wait_for_events(api, ns, "InferenceService", {"RolloutStarted", "Promoting", "Promoted"})


def test_prometheus_guarded_rollouts(api, store, namespace, operator, fleet):
    """Version 2 (healthy) is promoted on its real metrics, version 3 (fails every request) rolled back."""
    ns = namespace
    v1 = store.version(1)
    v2 = store.version(2)
    v3 = store.version(3)
    create_model(api, ns, [v1], production=1)
    create_isvc(
        api,
        ns,
        rollout={"steps": [{"weight": 50, "pauseSeconds": 2}], "analysis": analysis(fleet.prometheus)},
    )
    wait_status(api, ns, lambda s: s.get("stableVersion") == 1, message="stable 1")

    set_production(api, ns, [v1, v2], production=2)
    st = wait_status(api, ns, lambda s: s.get("rolloutPhase") == "Promoted", 90, message="version 2 promoted")
    assert st["stableVersion"] == 2
    results = st["analysis"]["results"]
    assert (
        results[0]["name"] == "error-ratio"
        and results[0]["phase"] == "Successful"
        and results[0]["value"] == 0
    )
    assert st["analysis"]["failures"] == 0 and st["analysis"]["successes"] >= 1

    set_production(api, ns, [v1, v2, v3], production=3)
    st = wait_status(
        api, ns, lambda s: s.get("rolloutPhase") == "RolledBack", 90, message="version 3 rolled back"
    )
    assert st["stableVersion"] == 2 and st["rolledBackVersion"] == 3 and "canaryVersion" not in st
    assert st["canaryWeight"] == 0
    assert st["analysis"]["results"][0]["phase"] == "Failed" and st["analysis"]["results"][0]["value"] == 1.0
    assert st["history"][-1]["phase"] == "RolledBack" and st["history"][-1]["toVersion"] == 3
    assert st["history"][-1]["message"].startswith("AnalysisFailed")
    rh = get_condition(st["conditions"], "RolloutHealthy")
    assert rh["status"] == "False" and rh["reason"] == "RolledBack"
    # Ready says Loading until the stable Deployment, scaled back up to all replicas, is Ready again
    assert get_condition(st["conditions"], "Ready")["reason"] in ("Loading", "RolledBack")
    wait_status(
        api,
        ns,
        lambda s: get_condition(s["conditions"], "Ready")["reason"] == "RolledBack",
        message="Ready=False RolledBack once the stable pods are back",
    )
    wait_for(lambda: deployment(api, ns, "canary") is None, 30, message="canary Deployment deleted")
    assert env_of(deployment(api, ns, "stable"))["KILN_MODEL_VERSION"] == "2"
    wait_for_events(api, ns, "InferenceService", {"RolledBack"})
    # ... and the registry's audit trail says which version failed in serving, where and why
    entry = wait_for(
        lambda: next(
            (
                h
                for h in (kube.get(api, API_VERSION, "Model", ns, MODEL).get("status") or {}).get("history")
                or []
                if h["cause"] == "CanaryRollback"
            ),
            None,
        ),
        30,
        message="CanaryRollback in the Model's history",
    )
    assert entry["inferenceService"] == isvc(api, ns)["metadata"]["name"]
    assert entry["fromVersion"] == 3 and entry["toVersion"] == 2
    assert entry["message"].startswith("AnalysisFailed")

    # the rolled-back version is not retried on later reconciles (a spec change forces one)
    patch_spec(api, ns, {"replicas": 3})
    gen = isvc(api, ns)["metadata"]["generation"]
    st = wait_status(
        api, ns, lambda s: s.get("observedGeneration") == gen, message="reconcile of the new generation"
    )
    assert st["rolloutPhase"] == "RolledBack" and "canaryVersion" not in st
    assert [h["phase"] for h in st["history"] if h.get("toVersion") == 3] == ["Progressing", "RolledBack"]
    assert deployment(api, ns, "canary") is None and deployment(api, ns, "stable")["spec"]["replicas"] == 3


def test_no_data_policies(api, store, namespace, operator, fleet):
    """Version 4 has no server, so its queries return no data: Inconclusive pauses, Pass promotes, Fail rolls back."""
    ns = namespace
    versions = [store.version(1), store.version(4), store.version(5)]
    create_model(api, ns, versions[:1], production=1)
    create_isvc(
        api,
        ns,
        rollout={
            "steps": [{"weight": 50, "pauseSeconds": 1}],
            "analysis": analysis(fleet.prometheus, inconclusiveLimit=1),
        },
    )
    wait_status(api, ns, lambda s: s.get("stableVersion") == 1, message="stable 1")

    set_production(api, ns, versions[:2], production=4)
    st = wait_status(api, ns, lambda s: s.get("rolloutPhase") == "Paused", 60, message="paused on no data")
    rh = get_condition(st["conditions"], "RolloutHealthy")
    assert rh["status"] == "Unknown" and rh["reason"] == "AnalysisInconclusive"
    assert (
        st["canaryVersion"] == 4 and st["analysis"]["failures"] == 0 and st["analysis"]["inconclusive"] >= 2
    )
    assert st["analysis"]["results"][0]["phase"] == "Inconclusive"
    assert deployment(api, ns, "canary") is not None  # paused, not aborted

    patch_spec(api, ns, {"rollout": {"analysis": analysis(fleet.prometheus, noDataPolicy="Pass")}})
    st = wait_status(
        api, ns, lambda s: s.get("rolloutPhase") == "Promoted", 60, message="promoted under Pass"
    )
    assert st["stableVersion"] == 4

    patch_spec(api, ns, {"rollout": {"analysis": analysis(fleet.prometheus, noDataPolicy="Fail")}})
    set_production(api, ns, versions, production=5)
    st = wait_status(
        api, ns, lambda s: s.get("rolloutPhase") == "RolledBack", 60, message="rolled back under Fail"
    )
    assert st["rolledBackVersion"] == 5 and st["stableVersion"] == 4
    assert "noDataPolicy is Fail" in st["analysis"]["results"][0]["message"]


def test_operator_restart_resumes_at_the_same_step(api, store, namespace, cluster, kiln_crds):
    ns = namespace
    v1, v2 = store.version(1), store.version(2)
    steps = [{"weight": 20, "pauseSeconds": 1}, {"weight": 60, "pauseSeconds": 3600}]
    with run_operator(cluster.kubeconfig):
        create_model(api, ns, [v1], production=1)
        create_isvc(api, ns, replicas=5, rollout={"steps": steps})
        wait_status(api, ns, lambda s: s.get("stableVersion") == 1, message="stable 1")
        set_production(api, ns, [v1, v2], production=2)
        before = wait_status(
            api,
            ns,
            lambda s: s.get("currentStep") == 1 and s.get("stepStartTime"),
            60,
            message="step 2 granted",
        )
    assert before["canaryWeight"] == 60 and before["rolloutPhase"] == "Progressing"
    assert deployment(api, ns, "canary")["spec"]["replicas"] == 3  # ceil(5 * 60%)
    assert deployment(api, ns, "stable")["spec"]["replicas"] == 2

    with run_operator(cluster.kubeconfig):
        patch_spec(api, ns, {"monitoring": {"serviceMonitor": {"intervalSeconds": 30}}})  # force a reconcile
        gen = isvc(api, ns)["metadata"]["generation"]
        after = wait_status(
            api, ns, lambda s: s.get("observedGeneration") == gen, message="reconcile after restart"
        )
        for key in (
            "stableVersion",
            "canaryVersion",
            "currentStep",
            "stepStartTime",
            "canaryWeight",
            "rolloutPhase",
        ):
            assert after.get(key) == before.get(key), key
        assert after["history"] == before["history"]  # no second "started" entry
        assert deployment(api, ns, "canary")["spec"]["replicas"] == 3

        patch_spec(api, ns, {"rollout": {"steps": [steps[0], {"weight": 60, "pauseSeconds": 0}]}})
        st = wait_status(
            api, ns, lambda s: s.get("rolloutPhase") == "Promoted", 60, message="promoted after restart"
        )
        assert st["stableVersion"] == 2


def test_llm_runtime_children_and_format_checks(api, store, namespace, operator):
    """runtime.engine vllm (docs/llm.md): the engine's Deployment, Service and ServiceMonitor;
    a version whose format the engine does not serve, and an InferencePool without its CRD (the
    local cluster has none), are Ready=False with their reasons."""
    ns = namespace
    llm_version = {**store.version(1), "format": "hf-transformers"}
    tensor_version = {**store.version(2), "format": "kiln-mlp"}
    create_model(api, ns, [llm_version, tensor_version], production=1)
    runtime = {
        "engine": "vllm",
        "image": "kiln/llm:dev",
        "imagePullPolicy": "Never",
        "artifactVolume": {"emptyDir": {}},
        "llm": {"maxModelLen": 256, "dtype": "float32"},
    }
    create_isvc(api, ns, runtime=runtime)
    # (a shared cluster: another checkout's older CRDs, applied since kiln_crds, prune the field)
    assert isvc(api, ns)["spec"]["runtime"].get("engine") == "vllm", (
        "the InferenceService CRD lacks runtime.engine"
    )
    ready = lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("status") == "True"  # noqa: E731
    st = wait_status(api, ns, ready, message="Ready=True")
    assert st["url"] == f"http://{MODEL}.{ns}.svc.cluster.local/v1"
    dep = deployment(api, ns, "stable")
    assert dep is not None and dep["status"]["readyReplicas"] == 2  # admitted under restricted PSS
    pod = dep["spec"]["template"]["spec"]
    (engine,) = pod["containers"]
    assert engine["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    args = engine["args"]
    assert args[args.index("--served-model-name") + 1] == MODEL
    assert args[args.index("--max-model-len") + 1] == "256"
    assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
    (init,) = pod["initContainers"]
    assert init["command"] == ["kiln-serve"] and init["args"] == ["--fetch-only"]
    svc = kube.get(api, "v1", "Service", ns, MODEL)
    assert svc is not None and {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]} == {
        "http": "http",
        "metrics": "http",
    }
    sm = kube.get(api, "monitoring.coreos.com/v1", "ServiceMonitor", ns, MODEL)
    assert sm is not None
    assert [r["targetLabel"] for r in sm["spec"]["endpoints"][0]["relabelings"]] == [
        "version",
        "track",
        "model",
    ]

    # kiln-serve cannot serve an hf-transformers version: refused, the engine keeps serving
    patch_spec(api, ns, {"runtime": {"engine": "kiln", "llm": None}})
    reason = lambda r: lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("reason") == r  # noqa: E731
    st = wait_status(api, ns, reason("RuntimeFormatMismatch"), message="RuntimeFormatMismatch")
    message = get_condition(st["conditions"], "Ready")["message"]
    assert "hf-transformers" in message and "use runtime.engine vllm" in message
    dep = deployment(api, ns, "stable")
    assert dep is not None and dep["spec"]["template"]["spec"]["containers"][0]["command"][0] == "python3"
    wait_for_events(api, ns, "InferenceService", {"RuntimeFormatMismatch"})

    # back on vLLM with an InferencePool: its CRD is not installed here
    pool = {"inferencePool": {"endpointPickerRef": {"name": "epp"}}}
    patch_spec(api, ns, {"runtime": {"engine": "vllm", "llm": pool}})
    st = wait_status(api, ns, reason("InferencePoolNotInstalled"), message="InferencePoolNotInstalled")
    assert "inference.networking.k8s.io" in get_condition(st["conditions"], "Ready")["message"]
    patch_spec(api, ns, {"runtime": {"llm": {"inferencePool": None}}})
    wait_status(api, ns, ready, message="Ready=True without the pool")
