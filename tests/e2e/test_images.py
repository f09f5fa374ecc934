"""The three images as hack/images builds them from images/*/Dockerfile (hack/kilndev/images.py).

Builds them (cached: seconds when nothing changed; a cold build downloads torch and takes
minutes) and checks what was built: the OCI config is what the Dockerfile says, /opt/kiln holds
kiln-operator at pyproject's version and every requirement of the image's extra, the operator
image has no torch, the base layer is one blob shared by the three. Running the images as pods
is tested elsewhere; nothing here needs the cluster.

Needs root (overlay mounts, chroot), Debian's mirror (debootstrap, installed when missing) and
PyPI. Skipped with the reason when the machine cannot build, except under CI=true, where that is
a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))

from kilndev import images  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
NAMES = list(images.IMAGES)
EXTRA = {"operator": None, "trainer": "train", "server": "serve"}
SITE = "/opt/kiln/lib/python3.11/site-packages"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _normalize(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0])


def _cannot_build() -> str | None:
    if os.geteuid() != 0:
        return "building images needs root (overlay mounts, chroot)"
    for tool in ("unshare", "mount"):  # debootstrap: the build installs it when missing
        if not shutil.which(tool):
            return f"{tool} not found (apt-get install util-linux mount)"
    if not shutil.which("debootstrap") and not shutil.which("apt-get"):
        return "debootstrap not found and no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def built() -> dict[str, images.ImageInfo]:
    why = _cannot_build()
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {why}")
        pytest.skip(why)
    return images.build(NAMES, import_=False)


def _dists(info: images.ImageInfo) -> dict[str, str]:
    """normalized distribution name -> version, from the dist-info dirs in the venv."""
    out = {}
    for name in info.view().listdir(SITE):
        m = re.fullmatch(r"(.+)-([^-]+)\.dist-info", name)
        if m:
            out[_normalize(m.group(1))] = m.group(2)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_config_is_what_the_dockerfile_says(built, name):
    info = built[name]
    assert info.ref == f"docker.io/library/kiln-{name}:dev"
    assert info.config["config"] == images.plan(name)[-1].config.oci()
    assert info.config["architecture"] == "amd64" and info.config["os"] == "linux"
    assert info.config["rootfs"]["diff_ids"] == [layer.diff_id for layer in info.layers]
    history = info.config["history"]
    assert sum(1 for h in history if not h.get("empty_layer")) == len(info.layers)
    dockerfile = (REPO / images.IMAGES[name].dockerfile).read_text()
    entrypoint = re.findall(r"^ENTRYPOINT (.*)$", dockerfile, re.M)[-1]
    assert info.config["config"]["Entrypoint"] == eval(entrypoint)  # a JSON array of strings
    assert info.config["config"]["User"] == "65532:65532"


@pytest.mark.parametrize("name", NAMES)
def test_venv_holds_kiln_and_its_extra(built, name):
    dists = _dists(built[name])
    assert dists.get("kiln-operator") == PYPROJECT["version"], sorted(dists)
    wanted = list(PYPROJECT["dependencies"])
    if EXTRA[name]:
        wanted += PYPROJECT["optional-dependencies"][EXTRA[name]]
    missing = [req for req in wanted if _requirement_name(req) not in dists]
    assert not missing, f"kiln-{name} lacks {missing}"
    if name == "operator":
        assert "torch" not in dists
        assert not [d for d in dists if d.startswith("nvidia-")]


@pytest.mark.parametrize("name", NAMES)
def test_entrypoint_script_runs_from_the_venv(built, name):
    info = built[name]
    view = info.view()
    script = info.config["config"]["Entrypoint"][0]
    real = view.lookup(f"/opt/kiln/bin/{script}")
    assert real is not None, f"/opt/kiln/bin/{script} missing"
    assert real.read_text().splitlines()[0] == "#!/opt/kiln/bin/python"
    python = view.resolve("/opt/kiln/bin/python")
    assert view.lookup(python) is not None, f"{python} (the venv's interpreter) missing"
    assert python.startswith("/usr/bin/python3")


@pytest.mark.parametrize("name", NAMES)
def test_byte_code_is_valid_on_a_read_only_root(built, name):
    """.pyc timestamps match the sources' (fixed) mtimes: nothing is recompiled at start-up."""
    view = built[name].view()
    checked = 0
    for rel, real in view.walk(f"{SITE}/kiln"):
        if not rel.endswith(".py"):
            continue
        d, stem = os.path.split(rel)
        pyc = view.lookup(f"{SITE}/kiln/{d}/__pycache__/{stem[:-3]}.cpython-311.pyc".replace("//", "/"))
        assert pyc is not None, f"{rel} was not byte-compiled"
        head = pyc.read_bytes()[:16]
        st = real.stat()
        assert int.from_bytes(head[8:12], "little") == int(st.st_mtime), rel
        assert int.from_bytes(head[12:16], "little") == st.st_size, rel
        checked += 1
    assert checked > 20


def test_base_layer_is_shared(built):
    bases = {info.layers[0].diff_id for info in built.values()}
    assert len(bases) == 1
    comment = built["operator"].config["history"][0]
    assert "python3 3.11 stands in for python:3.11-slim" in comment["created_by"]


def test_non_root_user_and_trainer_artifacts_dir(built):
    for info in built.values():
        passwd = info.view().read_text("/etc/passwd") or ""
        assert re.search(r"^kiln:x:65532:65532:", passwd, re.M), info.name
    artifacts = built["trainer"].view().lookup("/var/lib/kiln/artifacts")
    assert artifacts is not None
    st = artifacts.lstat()
    assert (st.st_uid, st.st_gid) == (65532, 65532)


def test_small_layers_are_reproducible(built):
    """Digests recomputed from the cached layer dirs match the manifest (the large ones are
    checked on every import, as the archive streams)."""
    for info in built.values():
        for layer in info.layers:
            if layer.size < 50_000_000:
                assert images.layer_digest(layer.path) == (layer.diff_id, layer.size)
