"""Helpers for integration tests against the kwok-backed local cluster (hack/cluster).

kwok plays the kubelet for the fake nodes: it moves scheduled pods to Running and deletes pods
marked for deletion, but it never ends a pod by itself (hack/cluster leaves kwok's auto-complete
stage out on purpose, see hack/cluster.d/README.md). Tests decide how each pod ends with
`finish_pod`, the way a real kubelet would report it: terminated container states with exit
codes and a termination message, phase Succeeded or Failed. kwok's Running stage only matches
Pending pods, so it never reverts a finished pod.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client

T = TypeVar("T")

TERMINAL_PHASES = ("Succeeded", "Failed")


def wait_for(
    predicate: Callable[[], T], timeout: float = 60, interval: float = 0.2, message: str = "condition"
) -> T:
    """Poll `predicate` until it returns something truthy; fail with `message` at the deadline.

    Exceptions raised by the predicate count as "not yet" (e.g. a 404 before an object exists);
    the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {message}{detail}")
        time.sleep(interval)


def _core(api: Any) -> client.CoreV1Api:
    return api if isinstance(api, client.CoreV1Api) else client.CoreV1Api(api)


def wait_for_events(
    api: Any, namespace: str, kind: str, reasons: set[str], name: str | None = None, timeout: float = 20
) -> list[client.CoreV1Event]:
    """The Events of `kind` objects in `namespace` (only the one called `name`, if given) once
    every reason in `reasons` is among them. The operator posts Events after the status write a
    test waits for, so they are polled, not read once."""

    def found() -> list[client.CoreV1Event]:
        evs = [
            e
            for e in _core(api).list_namespaced_event(namespace).items
            if e.involved_object.kind == kind and (name is None or e.involved_object.name == name)
        ]
        return evs if reasons <= {e.reason for e in evs} else []

    return wait_for(found, timeout, message=f"{kind} events {sorted(reasons)}")


def _batch(api: Any) -> client.BatchV1Api:
    if isinstance(api, client.BatchV1Api):
        return api
    return client.BatchV1Api(api.api_client if hasattr(api, "api_client") else api)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def finish_pod(
    api: Any,
    namespace: str,
    name: str,
    exit_code: int = 0,
    message: str = "",
    reason: str | None = None,
    *,
    container: str | None = None,
    timeout: float = 60,
) -> client.V1Pod:
    """End a Running pod as a kubelet would: every container terminated, phase set.

    `exit_code`, `message` (the termination message, what a container writes to
    /dev/termination-log) and `reason` go to `container` (default: every container); other
    containers exit 0. Phase is Succeeded when all exit codes are 0, else Failed. `reason`
    defaults to the kubelet's: Completed for 0, Error otherwise.

    Waits first until kwok has made the pod Running, so kwok's own status write cannot land after
    ours. Patches the status subresource with a strategic merge patch: conditions merge by type,
    containerStatuses by name, and `running: null` drops the running state (a container has one).
    `api` is an ApiClient or a CoreV1Api. Returns the patched pod.
    """
    core = _core(api)

    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase in TERMINAL_PHASES:
            raise AssertionError(f"pod {namespace}/{name} already finished ({pod.status.phase})")
        return pod if pod.status.phase == "Running" else None

    pod = wait_for(running, timeout, message=f"pod {namespace}/{name} to be Running")
    previous = {s.name: s for s in pod.status.container_statuses or []}
    now = _now()
    statuses, codes = [], []
    for c in pod.spec.containers:
        mine = container is None or c.name == container
        code = exit_code if mine else 0
        codes.append(code)
        prev = previous.get(c.name)
        started = (
            prev.state.running.started_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            if prev and prev.state and prev.state.running and prev.state.running.started_at
            else now
        )
        terminated = {
            "exitCode": code,
            "reason": (reason if mine and reason else ("Completed" if code == 0 else "Error")),
            "startedAt": started,
            "finishedAt": now,
        }
        if mine and message:
            terminated["message"] = message
        statuses.append(
            {
                "name": c.name,
                "image": c.image,
                "ready": False,
                "started": False,
                "restartCount": prev.restart_count if prev else 0,
                "state": {"running": None, "waiting": None, "terminated": terminated},
            }
        )
    phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
    conditions = [
        {"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
        for t in ("Ready", "ContainersReady")
    ]
    body = {"status": {"phase": phase, "conditions": conditions, "containerStatuses": statuses}}
    return core.patch_namespaced_pod_status(
        name, namespace, body, _content_type="application/strategic-merge-patch+json"
    )


def job_condition(job: client.V1Job, type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in (job.status.conditions or []))


def finish_job(
    api: Any, namespace: str, name: str, exit_code: int = 0, message: str = "", timeout: float = 90
) -> client.V1Job:
    """Finish every pod of a Job (as they come) until the Job is Complete or Failed.

    With exit_code 0 this drives the Job to Complete; non-zero exit codes make pods Failed and the
    Job controller retries up to backoffLimit, so the Job ends Failed. Returns the final Job.
    """
    core, batch = _core(api), _batch(api)
    selector = f"batch.kubernetes.io/job-name={name}"

    def step() -> client.V1Job | None:
        job = batch.read_namespaced_job(name, namespace)
        if job_condition(job, "Complete") or job_condition(job, "Failed"):
            return job
        for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
            if pod.status.phase == "Running" and pod.metadata.deletion_timestamp is None:
                finish_pod(core, namespace, pod.metadata.name, exit_code, message)
        return None

    return wait_for(step, timeout, interval=0.3, message=f"job {namespace}/{name} to finish")


def complete_job(api: Any, namespace: str, name: str, timeout: float = 90) -> client.V1Job:
    """Drive a Job to its Complete condition by succeeding its pods."""
    job = finish_job(api, namespace, name, 0, timeout=timeout)
    assert job_condition(job, "Complete"), f"job {namespace}/{name} ended {job.status.conditions}"
    return job


def wait_pods_running(
    api: Any, namespace: str, selector: str, count: int, timeout: float = 60
) -> list[client.V1Pod]:
    """Wait until exactly `count` pods matching `selector` exist and all are Running."""
    core = _core(api)

    def check() -> list[client.V1Pod] | None:
        pods = [
            p
            for p in core.list_namespaced_pod(namespace, label_selector=selector).items
            if p.metadata.deletion_timestamp is None
        ]
        return pods if len(pods) == count and all(p.status.phase == "Running" for p in pods) else None

    return wait_for(check, timeout, message=f"{count} Running pods matching {selector!r} in {namespace}")


def serviceaccount_kubeconfig(
    api: client.ApiClient,
    namespace: str,
    name: str,
    path: str | os.PathLike | None = None,
    expiration_seconds: int = 3600,
) -> Path:
    """Write a kubeconfig that authenticates as ServiceAccount namespace/name.

    The token comes from the TokenRequest API (what a pod's projected token is), so the holder
    has exactly the RBAC of that ServiceAccount, e.g. the chart's ClusterRole for the operator.
    Server and CA come from `api` (the admin client). Returns the path (a temp file by default).
    """
    core = _core(api)
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
    )
    token = core.create_namespaced_service_account_token(name, namespace, request).status.token
    cfg = api.configuration
    ca = Path(cfg.ssl_ca_cert).read_text() if cfg.ssl_ca_cert else None
    user = f"system:serviceaccount:{namespace}:{name}"
    cluster: dict[str, Any] = {"server": cfg.host}
    if ca:
        cluster["certificate-authority-data"] = base64.b64encode(ca.encode()).decode()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kiln", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "kiln", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    if path is None:
        fd, tmp = tempfile.mkstemp(prefix=f"kubeconfig-{namespace}-{name}-", suffix=".json")
        os.close(fd)
        path = tmp
    out = Path(path)
    out.write_text(json.dumps(kubeconfig, indent=2))  # JSON is valid YAML, so a valid kubeconfig
    out.chmod(0o600)
    return out


@contextlib.contextmanager
def run_operator(
    kubeconfig: str | os.PathLike,
    *extra_args: str,
    module: str = "kiln.controllers",
    namespace: str | None = None,
) -> Iterator[Any]:
    """Run the Kiln operator in-process (kopf's KopfRunner) against `kubeconfig`.

    It watches all namespaces, or only `namespace` when given: on a cluster shared by several
    test sessions (or a benchmark), an all-namespaces operator also reconciles their objects.

    The operator must see this kubeconfig exactly as if its process had been started with
    KUBECONFIG set, which takes two things here:
    - $KUBECONFIG itself, read at startup by kiln's client and kopf;
    - the kubernetes client's default location: `load_kube_config()` without arguments (what
      kopf's `login_via_client` calls) uses `KUBE_CONFIG_DEFAULT_LOCATION`, which the library
      computes from $KUBECONFIG once, at import time, long before this test runs.
    Both, and the client's process-wide default Configuration that loading a kubeconfig
    replaces, are restored afterwards. Pass a ServiceAccount kubeconfig
    (serviceaccount_kubeconfig) to prove the operator works with that account's RBAC alone.
    Yields the KopfRunner (its .output holds the operator's log); kopf re-raises operator
    exceptions when the block exits.
    """
    from kopf.testing import KopfRunner
    from kubernetes.config import kube_config

    old_env = os.environ.get("KUBECONFIG")
    old_default_location = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    old_default_configuration = client.Configuration.get_default_copy()
    os.environ["KUBECONFIG"] = str(kubeconfig)
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
    try:
        scope = [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
        with KopfRunner(["run", "--standalone", *scope, "-m", module, *extra_args], timeout=60) as runner:
            yield runner
    finally:
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old_default_location
        client.Configuration.set_default(old_default_configuration)
        if old_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old_env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """``kiln operator`` in its own process (``python -m kiln operator ...``), as a pod runs it.

    Unlike :func:`run_operator` (kopf in-process), it can be killed like a container: SIGKILL
    (:meth:`kill`, nothing released) or SIGTERM (:meth:`terminate`, graceful). Its log (JSON
    lines by default) is in :attr:`log_path`; ``/healthz`` and ``/metrics`` on free ports.
    """

    def __init__(
        self,
        kubeconfig: str | os.PathLike,
        args: list[str],
        log_path: Path,
        pod_name: str,
        namespace: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        self.pod_name = pod_name
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "POD_NAME": pod_name,
            "POD_NAMESPACE": namespace,
            "KILN_WORKERS": "4",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        ports = [f"--health-port={self.health_port}", f"--metrics-port={self.metrics_port}"]
        args = [a for a in args if not a.startswith(("--health-port", "--metrics-port"))]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "operator", *args, *ports],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def metric(self, name: str) -> float:
        """Sum of every sample of metric ``name`` (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def kill(self) -> None:
        """SIGKILL, as the kubelet does after the grace period or the OOM killer: nothing released."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@contextlib.contextmanager
def operator_processes(
    kubeconfig: str | os.PathLike, args: list[str], names: list[str], namespace: str, log_dir: Path
) -> Iterator[list[OperatorProcess]]:
    """Start one :class:`OperatorProcess` per name (its ``POD_NAME``), stop them all afterwards."""
    procs: list[OperatorProcess] = []
    try:
        for name in names:
            procs.append(OperatorProcess(kubeconfig, args, log_dir / f"{name}.log", name, namespace))
        yield procs
    finally:
        for p in procs:
            p.stop()
