"""The three images as hack/images builds them with buildah from images/*/Dockerfile.

Builds them (cached: seconds when nothing changed; a cold build downloads torch and takes
minutes) and checks what was built: the OCI config (entrypoint, user, environment, ports), the
venv /opt/kiln with kiln-operator at pyproject's version and every requirement of the image's
extra, no torch in the operator image, byte-code valid on a read-only root, one base layer
shared by the three and one torch layer shared by the trainer and the server. Then, on the real
node, each image is imported (skipped when containerd has it) and started as a pod with its own
entrypoint and user under PodSecurity `restricted` with a read-only root filesystem.

Needs root and Debian's mirror (buildah and debootstrap are installed when missing) and PyPI.
Skipped with the reason when the machine cannot build, except under CI=true, where that is a
failure. The pod tests are skipped without a real node (see conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.e2e.conftest import require_image_builds
from tests.integration.helpers import TERMINAL_PHASES, wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))

from kilndev import images  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
NAMES = images.DEFAULT_IMAGES  # the LLM image: tests/e2e/test_llm_demo.py
EXTRAS = {"operator": (), "trainer": ("train", "features"), "server": ("serve",)}
SITE = "opt/kiln/lib/python3.11/site-packages"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _normalize(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0])


@pytest.fixture(scope="module")
def built() -> dict[str, images.ImageInfo]:
    require_image_builds()
    return images.build(NAMES, import_=False)


@pytest.fixture(scope="module")
def roots(built) -> Iterator[dict[str, Path]]:
    """Each image's root filesystem, mounted for the module."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(info.rootfs()) for name, info in built.items()}


def _dists(root: Path) -> dict[str, str]:
    """normalized distribution name -> version, from the dist-info dirs in the venv."""
    out = {}
    for p in (root / SITE).iterdir():
        m = re.fullmatch(r"(.+)-([^-]+)\.dist-info", p.name)
        if m:
            out[_normalize(m.group(1))] = m.group(2)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_config_is_what_the_dockerfile_says(built, name):
    info = built[name]
    assert info.ref == f"docker.io/library/kiln-{name}:dev"
    assert info.config["architecture"] == "amd64" and info.config["os"] == "linux"
    cfg = info.config["config"]
    dockerfile = (REPO / images.IMAGES[name].dockerfile).read_text()
    entrypoint = re.findall(r"^ENTRYPOINT (.*)$", dockerfile, re.M)[-1]
    assert cfg["Entrypoint"] == eval(entrypoint)  # a JSON array of strings
    assert cfg["User"] == "65532:65532"
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PATH"] == "/opt/kiln/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["PYTHONUNBUFFERED"] == env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert not [k for k in env if k.startswith("PIP_")]  # the build stage's settings stay there
    assert "Labels" not in cfg or "io.buildah.version" not in cfg["Labels"]
    if name == "operator":
        assert cfg["Cmd"] == ["operator", "--standalone"]
        assert set(cfg["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}
    elif name == "trainer":
        assert "Cmd" not in cfg and cfg["WorkingDir"] == "/tmp"
        assert env["HOME"] == env["TMPDIR"] == "/tmp"
    else:
        assert "Cmd" not in cfg and cfg["StopSignal"] == "SIGTERM"
        assert env["KILN_PORT"] == "8080" and env["KILN_METRICS_PORT"] == "9090"
        assert env["TORCH_HOME"] == "/tmp/.cache/torch"


@pytest.mark.parametrize("name", NAMES)
def test_venv_holds_kiln_and_its_extra(roots, name):
    dists = _dists(roots[name])
    assert dists.get("kiln-operator") == PYPROJECT["version"], sorted(dists)
    wanted = list(PYPROJECT["dependencies"])
    for extra in EXTRAS[name]:
        wanted += PYPROJECT["optional-dependencies"][extra]
    missing = [req for req in wanted if _requirement_name(req) not in dists]
    assert not missing, f"kiln-{name} lacks {missing}"
    if name == "operator":
        assert "torch" not in dists
        assert not [d for d in dists if d.startswith("nvidia-")]
        assert not list((roots[name] / SITE).glob("torch*"))


@pytest.mark.parametrize("name", NAMES)
def test_entrypoint_script_runs_from_the_venv(built, roots, name):
    root = roots[name]
    script = root / "opt/kiln/bin" / built[name].config["config"]["Entrypoint"][0]
    assert script.read_text().splitlines()[0] == "#!/opt/kiln/bin/python"
    python = _resolve(root, "/opt/kiln/bin/python")  # the base's, through /usr/local/bin/python
    assert python.startswith("/usr/bin/python3") and (root / python.lstrip("/")).is_file(), python


def _resolve(root: Path, path: str) -> str:
    """`path` with its symbolic links followed inside the image's root filesystem."""
    for _ in range(40):
        p = root / path.lstrip("/")
        if not p.is_symlink():
            return path
        target = os.readlink(p)
        path = (
            target
            if target.startswith("/")
            else os.path.normpath(os.path.join(os.path.dirname(path), target))
        )
    raise AssertionError(f"{path}: too many levels of symbolic links")


@pytest.mark.parametrize("name", NAMES)
def test_byte_code_is_valid_on_a_read_only_root(roots, name):
    """Each .pyc records its source's mtime and size as the layers keep them: nothing is
    recompiled at start-up (the root filesystem is read-only in the pods)."""
    kiln = roots[name] / SITE / "kiln"
    checked = 0
    for src in kiln.rglob("*.py"):
        pyc = src.parent / "__pycache__" / f"{src.stem}.cpython-311.pyc"
        assert pyc.exists(), f"{src} was not byte-compiled"
        head = pyc.read_bytes()[:16]
        st = src.stat()
        assert int.from_bytes(head[8:12], "little") == int(st.st_mtime), src
        assert int.from_bytes(head[12:16], "little") == st.st_size, src
        checked += 1
    assert checked > 20
    stdlib = roots[name] / "usr/lib/python3.11"  # the base's, made deterministic
    head = (stdlib / "__pycache__/os.cpython-311.pyc").read_bytes()[:16]
    assert int.from_bytes(head[8:12], "little") == int((stdlib / "os.py").stat().st_mtime) == images.EPOCH


def test_shared_layers(built):
    diff_ids = {name: info.config["rootfs"]["diff_ids"] for name, info in built.items()}
    assert len({ids[0] for ids in diff_ids.values()}) == 1  # the base, one blob
    base = images.inspect("base", images.BASE.ref, images.BASE.ref)
    assert base.config["rootfs"]["diff_ids"] == [diff_ids["operator"][0]]
    assert "python3 3.11 stands in for python:3.11-slim" in base.config["history"][0]["created_by"]
    assert base.config["created"] == "1980-01-01T00:00:00Z"


def test_trainer_and_server_share_the_torch_layer(built):
    """base, venv, torch: the same layers (buildah's cache keys on the resolved steps); torch is
    the big one, and a code change leaves it alone (the last layers hold kiln, small)."""
    layers = {name: built[name].config["rootfs"]["diff_ids"] for name in ("trainer", "server")}
    assert layers["trainer"][:3] == layers["server"][:3]
    assert layers["trainer"][3:] != layers["server"][3:]
    sizes = {name: built[name].layer_sizes for name in ("trainer", "server")}
    for name in sizes:
        assert sizes[name][2] > 2e9, sizes[name]  # torch (the CUDA build here)
        assert sizes[name][-1] < 5e6 and sizes[name][-2] < 1e6, sizes[name]  # kiln; its wheel


def test_non_root_user_and_trainer_artifacts_dir(roots):
    for name, root in roots.items():
        assert re.search(r"^kiln:x:65532:65532:", (root / "etc/passwd").read_text(), re.M), name
    st = (roots["trainer"] / "var/lib/kiln/artifacts").stat()
    assert (st.st_uid, st.st_gid) == (65532, 65532)


def test_trainer_holds_the_examples(roots):
    """examples/ at /opt/kiln/examples, as in the repository (examples/cnn/trainingjob.yaml runs
    /opt/kiln/examples/cnn/train.py), readable by the non-root user."""
    shipped = roots["trainer"] / "opt/kiln/examples"
    for src in (REPO / "examples").rglob("*"):
        if src.is_file() and "__pycache__" not in src.parts:
            copy = shipped / src.relative_to(REPO / "examples")
            assert copy.read_bytes() == src.read_bytes(), copy
            assert copy.stat().st_mode & 0o004, copy


# --- on the real node ---------------------------------------------------------------------------

RUNS = {  # the image's own entrypoint and user; these arguments make each exit 0 at once
    "operator": ["--help"],
    "trainer": ["--help"],
    "server": ["--help"],
}


@pytest.fixture(scope="module")
def imported(built, real_cluster) -> dict[str, images.ImageInfo]:
    for info in built.values():
        images.import_image(info)
    return built


@pytest.mark.parametrize("name", NAMES)
def test_pod_starts_from_the_image(imported, kube, namespace, name):
    info = imported[name]
    assert images.containerd_digest(info.ref) == info.manifest_digest
    core = client.CoreV1Api(kube)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"image-{name}"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kiln.dev/pool": "real"},
            "tolerations": [{"key": "kiln.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "main",
                    "image": info.short_ref,
                    "imagePullPolicy": "Never",
                    "args": RUNS[name],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    core.create_namespaced_pod(namespace, pod)

    def finished():
        p = core.read_namespaced_pod(f"image-{name}", namespace)
        return p if p.status.phase in TERMINAL_PHASES else None

    done = wait_for(finished, 180, message=f"pod image-{name} to finish")
    log = core.read_namespaced_pod_log(f"image-{name}", namespace)
    assert done.status.phase == "Succeeded", log
    status = done.status.container_statuses[0]
    assert status.image_id.endswith(info.manifest_digest) or info.config_digest in status.image_id, status
    assert "usage:" in log.lower(), log
