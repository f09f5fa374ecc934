"""Fixtures for integration tests: a real API server with kwok nodes (hack/cluster).

- `cluster` (session): uses a running `hack/cluster`, or starts one and stops it at the end.
  When the machine cannot build/run it (no Go, no module proxy...), tests are skipped with the
  reason, except under CI=true where that is a failure. KILN_KEEP_CLUSTER=1 keeps a cluster this
  session started.
- `kube` (session): kubernetes ApiClient authenticated as the cluster admin.
- `namespace`: a fresh namespace per test, deleted afterwards, PodSecurity level `restricted`
  unless the test says `@pytest.mark.pod_security("baseline")` (or "privileged").
- `kiln_crds` (session): applies every YAML in crds/ and waits until the CRDs are Established.
- `operator`: the Kiln operator running in-process (kopf.testing.KopfRunner) against the cluster.
- `redis_server` (tests/redis.py): a private redis-server for the test.
- `s3`, `private_s3` (tests/s3.py): a fresh bucket on the cluster's versitygw; a versitygw of the
  test's own that it can stop and start (fault tests).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.redis import redis_server  # noqa: F401  (fixture, by name)
from tests.s3 import private_s3, s3  # noqa: F401  (fixtures, by name)

from .helpers import run_operator, wait_for

REPO = Path(__file__).resolve().parents[2]
HACK_CLUSTER = REPO / "hack" / "cluster"
CRDS = REPO / "crds"
IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pod_security(level): PodSecurity level enforced in the test namespace"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the cluster: mark it so `-m 'not integration'` works."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@dataclass(frozen=True)
class Cluster:
    kubeconfig: str
    kubectl: str
    helm: str
    api_server: str
    k8s_version: str
    state_dir: str
    logs: str

    def kubectl_run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.kubectl, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            text=True,
            capture_output=True,
            check=check,
        )


def _hack_cluster(*args: str, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(HACK_CLUSTER), *args], text=True, capture_output=capture, cwd=REPO)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    pre = _hack_cluster("preflight")
    if pre.returncode == 2:
        reason = (pre.stdout + pre.stderr).strip()
        if IN_CI:
            pytest.fail(f"CI=true but the local cluster cannot run here: {reason}", pytrace=False)
        pytest.skip(reason)
    env = json.loads(_hack_cluster("env", "--json").stdout)
    # Several pytest sessions may share one cluster. Each holds a shared lock on .users.lock
    # while it runs; `down --if-unused` (below) leaves the cluster up while anyone else holds it.
    users = Path(env["state_dir"]) / ".users.lock"
    users.parent.mkdir(parents=True, exist_ok=True)
    with open(users, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        started = False
        if _hack_cluster("status", "--quiet").returncode != 0:
            up = _hack_cluster("up")
            if up.returncode != 0:
                pytest.fail(f"hack/cluster up failed ({up.returncode}):\n{up.stderr[-4000:]}", pytrace=False)
            started = True
        yield Cluster(
            kubeconfig=env["KUBECONFIG"],
            kubectl=env["kubectl"],
            helm=env["helm"],
            api_server=env["api_server"],
            k8s_version=env["k8s_version"],
            state_dir=env["state_dir"],
            logs=env["logs"],
        )
        fcntl.flock(lock, fcntl.LOCK_UN)
    if started and os.environ.get("KILN_KEEP_CLUSTER") != "1":
        _hack_cluster("down", "--if-unused")


@pytest.fixture(scope="session")
def kube(cluster: Cluster) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=cluster.kubeconfig)
    yield api
    api.close()


def _namespace_name(nodeid: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", nodeid.rsplit("::", 1)[-1].lower()).strip("-")[:40].strip("-")
    return f"t-{base}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube: client.ApiClient) -> Iterator[str]:
    # A test using the operator gets it started BEFORE its namespace, so it is stopped AFTER the
    # namespace is gone and can still remove its finalizers from the objects being deleted.
    with_operator = "operator" in request.fixturenames
    if with_operator:
        request.getfixturevalue("operator")
    marker = request.node.get_closest_marker("pod_security")
    level = marker.args[0] if marker else "restricted"
    core = client.CoreV1Api(kube)
    name = _namespace_name(request.node.nodeid)
    labels = {
        "pod-security.kubernetes.io/enforce": level,
        "pod-security.kubernetes.io/enforce-version": "latest",
        # always tell about anything short of restricted, even where baseline is enforced
        "pod-security.kubernetes.io/warn": "restricted",
        "pod-security.kubernetes.io/audit": "restricted",
        "kiln.dev/test": "true",
    }
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    # Pods are rejected until kube-controller-manager has created the `default` ServiceAccount.
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        30,
        message=f"ServiceAccount default in {name}",
    )
    yield name
    core.delete_namespace(name)
    if with_operator:

        def gone() -> bool:
            try:
                core.read_namespace(name)
            except ApiException as exc:
                return exc.status == 404
            return False

        try:
            wait_for(gone, 60, message=f"namespace {name} to be deleted")
        except TimeoutError as exc:
            warnings.warn(f"{exc}: something in it kept a finalizer", stacklevel=1)


@pytest.fixture(scope="session")
def kiln_crds(cluster: Cluster) -> list[str]:
    """Apply crds/*.yaml (generated from kiln.api) and wait for them; returns the CRD names."""
    files = sorted(CRDS.glob("*.yaml"))
    if not files:
        return []
    args = [f"--filename={f}" for f in files]
    cluster.kubectl_run("apply", "--server-side", "--force-conflicts", "--field-manager=kiln-tests", *args)
    names = cluster.kubectl_run("get", *args, "-o", "name").stdout.split()
    cluster.kubectl_run("wait", "--for=condition=Established", "--timeout=60s", *names)
    return [n.split("/", 1)[1] for n in names]


@pytest.fixture
def operator(cluster: Cluster, kiln_crds: list[str]) -> Iterator[object]:
    """The Kiln operator (kopf, in-process) with cluster-admin credentials.

    To run it as a ServiceAccount instead, use helpers.serviceaccount_kubeconfig and
    helpers.run_operator directly.
    """
    with run_operator(cluster.kubeconfig) as runner:
        yield runner
