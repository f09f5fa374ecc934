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
from pathlib import Path

import pytest

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


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
    return c


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
