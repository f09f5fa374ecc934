#!/usr/bin/env python3
"""Kiln demo on the local cluster (kwok nodes): train with DDP, register, promote.

kwok simulates nodes: the scheduler places pods on them and kwok reports them Running, but no
container runs. So this demo plays the kubelet for the trainer pods, honestly and visibly: it
runs each pod's own command (torchrun, from the trainer image's entrypoint) with that pod's own
environment (PET_*, KILN_*) as a process on this machine, then reports each process's exit code
and termination message in the pod's status, as a kubelet reports a container's. Everything
else is real: the API server, scheduler, the operator deciding from pod status, the registry.
Two pod settings need this machine's equivalent, and the demo prints them: node 0's DNS name
becomes 127.0.0.1 (no cluster DNS without a real node) and the artifact root becomes a local
directory (the pods' volume).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the kubelet stand-in lives with the integration-test helpers

from kubernetes import config  # noqa: E402
from tests.integration.helpers import finish_pod, wait_for  # noqa: E402

from kiln import API_VERSION, kube  # noqa: E402
from kiln.artifact import uri_to_path, verify_artifact  # noqa: E402

NS = "kiln-demo"
OUT = REPO / "_out" / "demo"
VENV_BIN = REPO / ".venv" / "bin"
steps: list[tuple[str, bool, float, str]] = []


def say(msg: str) -> None:
    print(f"\n\033[1m==> {msg}\033[0m", flush=True)


def run(*cmd: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


class Step:
    def __init__(self, name: str) -> None:
        self.name = name
        self.detail = ""

    def __enter__(self) -> Step:
        say(self.name)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        ok = exc is None
        steps.append(
            (self.name, ok, time.monotonic() - self.t0, self.detail if ok else f"{exc_type.__name__}: {exc}")
        )
        if not ok:
            print(f"    FAILED: {exc}", flush=True)
            summary()
            sys.exit(1)
        return False


def summary() -> None:
    print("\n" + "=" * 100)
    print(f"{'step':<52} {'result':<7} {'seconds':>8}  detail")
    for name, ok, secs, detail in steps:
        print(f"{name:<52} {'ok' if ok else 'FAILED':<7} {secs:>8.1f}  {detail}")
    print("=" * 100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    env_info = json.loads(run(str(REPO / "hack" / "cluster"), "env", "--json"))
    kubeconfig, kubectl = env_info["KUBECONFIG"], env_info["kubectl"]
    os.environ["KUBECONFIG"] = kubeconfig
    api = config.new_client_from_config(config_file=kubeconfig)
    k = lambda *a: run(kubectl, f"--kubeconfig={kubeconfig}", *a)  # noqa: E731
    OUT.mkdir(parents=True, exist_ok=True)
    demo_start = time.monotonic()

    with Step("install the CRDs (generated from kiln.api)") as s:
        k("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        k("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
        s.detail = "4 CRDs established"

    with Step("start the Kiln operator") as s:
        health, metrics = free_port(), free_port()
        log = open(OUT / "operator.log", "w")  # noqa: SIM115 - kept open for the process' life
        operator = subprocess.Popen(
            [
                str(VENV_BIN / "kiln"),
                "operator",
                "--standalone",
                f"--health-port={health}",
                f"--metrics-port={metrics}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        wait_for(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2).status == 200,
            60,
            message="operator /healthz",
        )
        s.detail = f"pid {operator.pid}, /healthz :{health}, /metrics :{metrics}, log {OUT / 'operator.log'}"

    try:
        with Step(f"fresh namespace {NS}") as s:
            if kube.get(api, "v1", "Namespace", None, NS):
                kube.delete(api, "v1", "Namespace", None, NS)
                wait_for(
                    lambda: kube.get(api, "v1", "Namespace", None, NS) is None,
                    120,
                    message="old namespace gone",
                )
            k("create", "namespace", NS)
            shutil.rmtree(OUT / "artifacts", ignore_errors=True)  # artifacts are immutable per job name
            wait_for(
                lambda: k("-n", NS, "get", "serviceaccount", "default"), 30, message="default ServiceAccount"
            )

        with Step("1. Model `digits` and a 2-node DDP TrainingJob") as s:
            k("-n", NS, "apply", "-f", str(REPO / "examples" / "model.yaml"))
            t_apply = time.monotonic()
            k("-n", NS, "apply", "-f", str(REPO / "hack" / "demo.d" / "trainingjob.yaml"))
            pods = wait_for(
                lambda: (
                    lambda ps: (
                        ps
                        if len(ps) == 2 and all(p["status"].get("phase") == "Running" for p in ps)
                        else None
                    )
                )(kube.list_objects(api, "v1", "Pod", NS, "kiln.dev/trainingjob=digits-v1")),
                60,
                message="2 trainer pods Running",
            )
            t_running = time.monotonic() - t_apply
            print(k("-n", NS, "get", "pods", "-o", "wide", "-l", "kiln.dev/trainingjob=digits-v1"))
            s.detail = f"pods Running {t_running:.1f}s after apply, on nodes " + ", ".join(
                sorted(p["spec"]["nodeName"] for p in pods)
            )

        with Step("   run the pods' trainer containers (torchrun, gloo)") as s:
            port = free_port()
            artifacts = OUT / "artifacts"
            procs = []
            for p in sorted(pods, key=lambda p: p["metadata"]["name"]):
                c = p["spec"]["containers"][0]
                env = {e["name"]: e.get("value", "") for e in c["env"]}
                print(
                    f"    {p['metadata']['name']}: PET_NODE_RANK={env['PET_NODE_RANK']} "
                    f"PET_NNODES={env['PET_NNODES']} PET_MASTER_ADDR={env['PET_MASTER_ADDR']} -> 127.0.0.1:{port}"
                )
                env.update(
                    PET_MASTER_ADDR="127.0.0.1",
                    PET_MASTER_PORT=str(port),
                    KILN_OUTPUT_URI=artifacts.as_uri(),
                    KILN_TERMINATION_LOG=str(OUT / f"{p['metadata']['name']}.termination-log"),
                )
                Path(env["KILN_TERMINATION_LOG"]).unlink(missing_ok=True)
                # one intra-op thread per process, as torchrun does with several workers per node
                full_env = {
                    "OMP_NUM_THREADS": "1",
                    **os.environ,
                    **env,
                    "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
                }
                logf = open(OUT / f"{p['metadata']['name']}.log", "w")  # noqa: SIM115
                procs.append(
                    (
                        p,
                        subprocess.Popen(
                            [str(VENV_BIN / "torchrun"), "--no-python", "kiln-train"],
                            env=full_env,
                            stdout=logf,
                            stderr=subprocess.STDOUT,
                        ),
                    )
                )
            for p, proc in procs:
                code = proc.wait(timeout=600)
                msg_file = OUT / f"{p['metadata']['name']}.termination-log"
                message = msg_file.read_text() if msg_file.exists() else ""
                finish_pod(api, NS, p["metadata"]["name"], exit_code=code, message=message)
                print(f"    {p['metadata']['name']} exited {code}; reported in pod status")
                if code != 0:
                    raise RuntimeError(f"trainer exited {code}: see {OUT / (p['metadata']['name'] + '.log')}")
            t_trained = time.monotonic() - t_apply
            print("    " + (OUT / "digits-v1-node-0.log").read_text().strip().splitlines()[-1])
            s.detail = f"training done {t_trained:.1f}s after apply"

        with Step("2. version registered in the Model") as s:
            job = wait_for(
                lambda: (lambda j: j if (j.get("status") or {}).get("registeredVersion") else None)(
                    kube.get(api, API_VERSION, "TrainingJob", NS, "digits-v1")
                ),
                60,
                message="registeredVersion",
            )
            t_registered = time.monotonic() - t_apply
            result = job["status"]["result"]
            meta = verify_artifact(uri_to_path(result["artifactUri"]), result["digest"])
            print(k("-n", NS, "get", "ktj,kmodel"))
            print(run(str(VENV_BIN / "kiln"), "versions", "digits", "-n", NS, check=False))
            acc = result["metrics"].get("accuracy", float("nan"))
            s.detail = (
                f"version {job['status']['registeredVersion']}, test accuracy {acc:.4f}, digest verified "
                f"({meta.weightsDigest[:19]}...), {t_registered:.1f}s after apply"
            )
            if acc < 0.95:
                raise RuntimeError(f"accuracy {acc:.4f} below 0.95")

        with Step("3. promote version 1 to Production") as s:
            t0 = time.monotonic()
            print(run(str(VENV_BIN / "kiln"), "promote", "digits", "1", "--stage", "Production", "-n", NS))
            wait_for(
                lambda: (
                    (
                        (kube.get(api, API_VERSION, "Model", NS, "digits").get("status") or {}).get("stages")
                        or {}
                    ).get("production")
                    == 1
                ),
                60,
                message="production == 1",
            )
            print(k("-n", NS, "get", "kmodel", "digits"))
            s.detail = f"status.stages.production = 1 after {time.monotonic() - t0:.1f}s"
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()

    steps.append(("demo total", True, time.monotonic() - demo_start, "serving and canary steps: issue 7"))
    summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
