"""Fixtures for e2e tests: a cluster with a real node (`hack/cluster up --real-node`).

The cluster fixtures are the integration ones (tests/integration/conftest.py), imported, not
copied. Tests here need the node `kiln-real-0`: they are skipped, with the reason, when the
cluster at $KILN_CLUSTER_DIR has none (start one with `hack/cluster up --real-node`, or let the
fixture start it with KILN_REAL_NODE=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.integration.conftest import (  # noqa: F401  (fixtures, by name)
    HACK_CLUSTER,
    REPO,
    Cluster,
    cluster,
    kiln_crds,
    kube,
    namespace,
    private_s3,
    s3,
)

REAL_NODE = "kiln-real-0"
BUSYBOX_IMAGE = "kiln.local/busybox:e2e"
DEMO_NAMESPACE = "kiln-demo"  # hack/demo.py's NS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


#: Node conditions under which the kubelet admits no pod (it taints the node, the scheduler
#: keeps pods Pending): the e2e tests cannot pass, whatever Kiln does.
PRESSURE = ("DiskPressure", "MemoryPressure", "PIDPressure")


def node_report(kubeconfig: str | None = None) -> str:
    """What an e2e failure needs beside the test's own message: the real node's conditions and
    taints, the pods not Running or Succeeded with their waiting reasons, the last Warning events,
    and the free space of the filesystem the node's images and the caches share. Never raises."""
    lines: list[str] = []
    try:
        total, _, free = shutil.disk_usage(Path.home() / ".cache")
        lines.append(f"disk: {free / 1e9:.1f} GB free of {total / 1e9:.0f} GB (~/.cache)")
        api = config.new_client_from_config(kubeconfig or os.environ.get("KUBECONFIG"))
        core = client.CoreV1Api(api)
        node = core.read_node(REAL_NODE)
        for c in node.status.conditions or []:
            lines.append(f"node {REAL_NODE}: {c.type}={c.status} ({c.reason}: {c.message})")
        lines += [f"node taint: {t.key}:{t.effect}" for t in node.spec.taints or []]
        for pod in core.list_pod_for_all_namespaces().items:
            if pod.status.phase in ("Running", "Succeeded"):
                continue
            why = [
                f"{cs.name}: {cs.state.waiting.reason} {cs.state.waiting.message or ''}".strip()
                for cs in pod.status.container_statuses or []
                if cs.state and cs.state.waiting
            ]
            why += [
                f"{c.type}={c.status} {c.message or ''}".strip()
                for c in pod.status.conditions or []
                if c.status != "True"
            ]
            lines.append(
                f"pod {pod.metadata.namespace}/{pod.metadata.name} {pod.status.phase}: {'; '.join(why)}"
            )
        warnings = [e for e in core.list_event_for_all_namespaces().items if e.type == "Warning"]
        warnings.sort(key=lambda e: str(e.last_timestamp or e.event_time or ""))
        for e in warnings[-15:]:
            obj = e.involved_object
            lines.append(f"event {obj.namespace}/{obj.kind}/{obj.name}: {e.reason}: {e.message}")
    except Exception as exc:  # a report must not hide the failure it explains
        lines.append(f"(node report incomplete: {exc!r})")
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach node_report() to every failed e2e test (setup or call): in CI the log is all
    there is, and a pod that never starts otherwise reads as a bare timeout."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call") and item.get_closest_marker("e2e"):
        report.sections.append(("real node", node_report()))


def _env() -> dict:
    out = subprocess.run([str(HACK_CLUSTER), "env", "--json"], text=True, capture_output=True, cwd=REPO)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def require_image_builds() -> None:
    """Skip the test, with the reason, when this machine cannot build images with hack/images
    (buildah as root); under CI=true that is a failure."""
    why = None
    if os.geteuid() != 0:
        why = "building images needs root (buildah --isolation chroot, debootstrap)"
    elif not (shutil.which("buildah") and shutil.which("debootstrap")) and not shutil.which("apt-get"):
        why = "buildah or debootstrap not found and no apt-get to install them"
    if why and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {why}")
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def real_cluster(request: pytest.FixtureRequest) -> Cluster:
    """The cluster, only if it has the real node (or KILN_REAL_NODE=1 lets the fixture start one)."""
    wanted = os.environ.get("KILN_REAL_NODE", "") in ("1", "true")
    if os.environ.get("CI", "").lower() == "true" and not _env().get("real_node"):
        pytest.fail("CI=true: e2e tests need the real node (.ci/run starts `hack/cluster up --real-node`)")
    if not wanted and not _env().get("real_node"):
        pytest.skip(
            "the cluster at $KILN_CLUSTER_DIR has no real node: start it with "
            "`hack/cluster up --real-node` (or run pytest with KILN_REAL_NODE=1)"
        )
    c: Cluster = request.getfixturevalue("cluster")
    if _env().get("real_node") != REAL_NODE:
        pytest.skip(
            f"a cluster without a real node is running at {c.state_dir}; `hack/cluster down` it first"
        )
    _require_schedulable(c)
    return c


def _require_schedulable(c: Cluster, timeout: float = 90) -> None:
    """Fail at once, with node_report(), when the real node is not Ready or is under pressure
    for `timeout` seconds: every e2e test would otherwise wait out its own deadline."""
    core = client.CoreV1Api(config.new_client_from_config(c.kubeconfig))
    deadline = time.monotonic() + timeout
    while True:
        conds = {x.type: x.status for x in core.read_node(REAL_NODE).status.conditions or []}
        bad = [t for t in PRESSURE if conds.get(t) == "True"] + (
            ["NotReady"] if conds.get("Ready") != "True" else []
        )
        if not bad:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"the real node cannot run pods ({', '.join(bad)}):\n{node_report(c.kubeconfig)}")
        time.sleep(2)


@pytest.fixture(scope="session")
def busybox_image(real_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-layer image holding Debian's busybox-static, imported into the node's containerd."""
    busybox = shutil.which("busybox")
    if not busybox:
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    rootfs = tmp_path_factory.mktemp("busybox-rootfs")
    (rootfs / "bin").mkdir()
    for d in ("tmp", "etc", "proc", "sys", "dev"):
        (rootfs / d).mkdir()
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    subprocess.run([str(rootfs / "bin" / "busybox"), "--install", "-s", str(rootfs / "bin")], check=True)
    # the applet links point at the host path of the copy; inside the image it is /bin/busybox
    for link in (rootfs / "bin").iterdir():
        if link.is_symlink():
            link.unlink()
            link.symlink_to("busybox")
    out = subprocess.run(
        [
            str(HACK_CLUSTER),
            "image-import",
            "--rootfs",
            str(rootfs),
            "--name",
            BUSYBOX_IMAGE,
            "--cmd",
            "/bin/sh",
        ],
        text=True,
        capture_output=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return BUSYBOX_IMAGE


def run_demo(out: Path, *args: str, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run hack/demo.py (the code path of `make demo`) with ``args``, ``--json out`` and ``env``
    added to this process's environment; returns
    what it wrote, with ``returncode`` and its whole output as ``log``. Its last 6,000 characters
    are printed (pytest shows them for a failed test). The helm release the demo installed is
    removed afterwards, so the operator it ran never meets the integration tests' objects, and so
    is its namespace (without waiting), so that its pods (model servers, a 2 GB vLLM engine) do not
    hold the node's cores and memory through the tests that follow; the next demo makes it anew.

    Raises:
        AssertionError: the demo wrote no result (the message has its exit code and output).
        subprocess.TimeoutExpired: it ran over ``timeout`` seconds.
    """
    log = out.with_suffix(".log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    try:
        with open(log, "w") as f:
            proc = subprocess.run(
                [sys.executable, str(REPO / "hack" / "demo.py"), "--json", str(out), *args],
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        text = log.read_text()
        print(text[-6000:])
        assert out.exists(), f"the demo wrote no result (exit {proc.returncode}):\n{text[-4000:]}"
        result = json.loads(out.read_text())
        result["returncode"] = proc.returncode
        result["log"] = text
        return result
    finally:
        env_json = json.loads(
            subprocess.run([str(HACK_CLUSTER), "env", "--json"], capture_output=True, text=True).stdout
        )
        subprocess.run(
            [
                env_json["helm"],
                f"--kubeconfig={env_json['KUBECONFIG']}",
                "uninstall",
                "kiln",
                "-n",
                "kiln-system",
                "--wait",
                "--timeout",
                "2m",
            ],
            capture_output=True,
        )
        subprocess.run(
            [
                env_json["kubectl"],
                f"--kubeconfig={env_json['KUBECONFIG']}",
                "delete",
                "namespace",
                DEMO_NAMESPACE,
                "--ignore-not-found",
                "--wait=false",
            ],
            capture_output=True,
        )
