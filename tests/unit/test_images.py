"""images/*/Dockerfile and hack/kilndev/images.py (the buildah driver), without building.

What the images must hold, read from the Dockerfiles' text: the entrypoint is a declared console
script, the non-root user, the environment, each image installs its pyproject extra, the operator
never gets torch, torch has its own layer before the other dependencies and kiln comes last, from a
wheel built in the only stage that sees the sources. The built images are checked
against the same expectations in tests/e2e/test_images.py. Also the driver's pure parts: the
base's determinism helpers, the build-output reader, the image layout containerd imports.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import py_compile
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))

from kilndev import images  # noqa: E402

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
NAMES = images.DEFAULT_IMAGES  # the LLM image has tests of its own below
# what each image installs from pyproject.toml: the package with these extras (in this order)
WANTED_EXTRAS: dict[str, tuple[str, ...]] = {
    "operator": (),
    "trainer": ("train", "features"),  # features: FeatureGroup materialization Jobs run in it
    "server": ("serve",),
}


def stages(name: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions per stage (index 0: the ARGs before the first FROM), as
    (KEYWORD, arguments) with comments dropped and continuation lines joined."""
    text = (REPO / images.IMAGES[name].dockerfile).read_text()
    text = re.sub(r"^\s*#.*\n", "", text, flags=re.M)
    text = re.sub(r"\\\n", " ", text)
    out: list[list[tuple[str, str]]] = [[]]
    for line in filter(str.strip, text.splitlines()):
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            out.append([])
        out[-1].append((keyword.upper(), re.sub(r"\s+", " ", args.strip())))
    return out


def final(name: str, keyword: str) -> list[str]:
    return [args for kw, args in stages(name)[-1] if kw == keyword]


def final_env(name: str) -> dict[str, str]:
    env = {}
    for args in final(name, "ENV"):
        env.update(dict(pair.split("=", 1) for pair in args.split(" ")))
    return env


def final_runs(name: str) -> list[str]:
    return final(name, "RUN")


def req_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


# --- the Dockerfiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_wheel_stage_and_a_venv_on_the_python_image(name):
    s = stages(name)
    assert s[0] == [("ARG", "PYTHON_IMAGE=python:3.11-slim")]  # what hack/images replaces
    assert [st[0] for st in s[1:]] == [("FROM", "${PYTHON_IMAGE} AS wheel"), ("FROM", "${PYTHON_IMAGE}")]
    # only the wheel stage sees the sources; it builds kiln's wheel and nothing else
    assert [args for kw, args in s[1] if kw == "COPY"] == [
        "pyproject.toml README.md ./",
        "operator/ operator/",
    ]
    assert [args for kw, args in s[1] if kw == "RUN"] == ["pip wheel --no-deps --wheel-dir /wheels ."]
    assert "operator/" not in " ".join(args for _, args in s[2])
    assert final_runs(name)[0] == "python -m venv /opt/kiln"
    assert final(name, "ENV")[0] == "PATH=/opt/kiln/bin:$PATH"
    # pip's build settings are ARGs: they never reach the image's environment
    assert not [k for k in final_env(name) if k.startswith("PIP_")]
    assert ("ARG", "PIP_NO_CACHE_DIR=1") in s[2]


@pytest.mark.parametrize("name", NAMES)
def test_kiln_is_the_last_layer_installed_from_the_wheel(name):
    s = stages(name)[2]
    keywords = [kw for kw, _ in s]
    copy_wheel = s.index(("COPY", "--from=wheel /wheels/ /tmp/wheels/"))
    install = s[copy_wheel + 1]
    assert install[0] == "RUN"
    assert install[1].startswith("pip install --no-deps /tmp/wheels/*.whl && rm -r /tmp/wheels && pip check")
    assert "python -m compileall -q /opt/kiln/lib/python3*/site-packages/kiln" in install[1]
    assert "RUN" not in keywords[copy_wheel + 2 :] and "COPY" not in keywords[copy_wheel + 2 :]


@pytest.mark.parametrize("name", NAMES)
def test_non_root_user_and_environment(name):
    assert final(name, "USER") == ["65532:65532"]
    assert any("groupadd --gid 65532 kiln" in run and "--uid 65532" in run for run in final_runs(name))
    env = final_env(name)
    assert env["PATH"] == "/opt/kiln/bin:$PATH"
    assert env["PYTHONUNBUFFERED"] == env["PYTHONDONTWRITEBYTECODE"] == "1"
    if name != "operator":  # nothing written outside /tmp
        assert env["HOME"] == env["TMPDIR"] == "/tmp"
        assert env["TORCH_HOME"] == "/tmp/.cache/torch"


def test_entrypoints_and_ports():
    assert final("operator", "ENTRYPOINT") == ['["kiln"]']
    assert final("operator", "CMD") == ['["operator", "--standalone"]']
    assert final("trainer", "ENTRYPOINT") == ['["torchrun", "--no-python", "kiln-train"]']
    assert final("trainer", "WORKDIR") == ["/tmp"]
    assert final("server", "ENTRYPOINT") == ['["kiln-serve"]']
    assert final("server", "STOPSIGNAL") == ["SIGTERM"]
    env = final_env("server")
    assert (env["KILN_PORT"], env["KILN_GRPC_PORT"], env["KILN_METRICS_PORT"]) == ("8080", "8081", "9090")
    assert final("server", "EXPOSE") == ["8080 8081 9090"]
    assert final("operator", "EXPOSE") == ["8080 9090"]
    assert final("trainer", "EXPOSE") == [] and final("trainer", "CMD") == []


@pytest.mark.parametrize("name", NAMES)
def test_entrypoint_is_a_declared_console_script(name):
    entrypoint = json.loads(final(name, "ENTRYPOINT")[0])
    if name == "trainer":
        assert entrypoint[:2] == ["torchrun", "--no-python"]  # torch's own console script
        entrypoint = entrypoint[2:]
    assert entrypoint[0] in SCRIPTS


@pytest.mark.parametrize("name", NAMES)
def test_dependencies_are_pyprojects_with_the_images_extra(name):
    """The dependency layer installs what `pip install .[extra]` would: pyproject's dependencies
    plus the extra's, read from the copied pyproject.toml (pip check in the last layer), less
    torch, which has its own layer before it."""
    assert ("COPY", "pyproject.toml /tmp/kiln/") in stages(name)[2]
    (run,) = [r for r in final_runs(name) if "tomllib" in r]
    assert '*p["dependencies"]' in run
    for extra in WANTED_EXTRAS[name]:
        assert f'*p["optional-dependencies"]["{extra}"]' in run
        assert extra in EXTRAS
    assert "pip install -r /tmp/kiln/requirements.txt" in run
    project = dict(PYPROJECT["project"])  # the one-liner, run here on the real pyproject.toml
    code = re.search(r"python -c '(.*?)'", run)[1].replace(
        "/tmp/kiln/pyproject.toml", str(REPO / "pyproject.toml")
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    expected = project["dependencies"] + [r for extra in WANTED_EXTRAS[name] for r in EXTRAS[extra]]
    assert out.splitlines() == list(dict.fromkeys(r for r in expected if req_name(r) != "torch"))


def test_trainer_image_holds_the_examples_before_kiln():
    """examples/ at /opt/kiln/examples (a TrainingJob's `command` runs examples/cnn/train.py from
    there), copied before kiln's wheel: editing an example leaves the dependency layers alone."""
    s = stages("trainer")[2]
    copy = s.index(("COPY", "examples/ /opt/kiln/examples/"))
    assert (
        s.index(("COPY", "pyproject.toml /tmp/kiln/"))
        < copy
        < s.index(("COPY", "--from=wheel /wheels/ /tmp/wheels/"))
    )
    assert "examples/" not in " ".join(args for kw, args in stages("server")[2] + stages("operator")[2])


def test_operator_image_never_gets_torch():
    text = (REPO / images.IMAGES["operator"].dockerfile).read_text()
    assert "torch" not in re.sub(r"^#.*$", "", text, flags=re.M).lower()
    assert not any(req_name(r) == "torch" for r in PYPROJECT["project"]["dependencies"])


@pytest.mark.parametrize("name", ["trainer", "server"])
def test_torch_has_its_own_layer_before_the_dependencies(name):
    s = stages(name)[2]
    torch_run = next(i for i, (kw, args) in enumerate(s) if kw == "RUN" and "torch" in args)
    assert torch_run < s.index(("COPY", "pyproject.toml /tmp/kiln/"))
    # both branches install torch: from TORCH_INDEX_URL when set, else from the default index
    text = s[torch_run][1]
    specs = set(re.findall(r'"(torch[^"]*)"', text))
    assert specs == {r for extra in WANTED_EXTRAS[name] for r in EXTRAS[extra] if req_name(r) == "torch"}
    assert text.count("pip install") == 2 and '--index-url "$TORCH_INDEX_URL"' in text


def test_trainer_and_server_match_up_to_torch():
    """With the local TORCH_INDEX_URL= both resolve to the same steps: buildah's cache keys on the
    resolved instruction, so the server reuses the trainer's torch layer (checked in e2e)."""

    def upto_torch(name):
        s = stages(name)[2]
        i = next(i for i, (kw, args) in enumerate(s) if kw == "RUN" and "torch" in args)
        return [(kw, re.sub(r"^TORCH_INDEX_URL=.*", "TORCH_INDEX_URL", a)) for kw, a in s[: i + 1]]

    assert upto_torch("trainer") == upto_torch("server")
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in stages("server")[2]
    assert ("ARG", "TORCH_INDEX_URL=") in stages("trainer")[2]
    assert images.IMAGES["server"].build_args == {"TORCH_INDEX_URL": ""}


def test_build_context_ignores_local_state():
    ignored = (REPO / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "**/__pycache__", "**/*.pyc", "**/*.egg-info"):
        assert pattern in ignored


# --- the base image -----------------------------------------------------------------------------


def test_base_reference_is_keyed_by_its_recipe():
    assert images.BASE.ref == images.BaseRecipe().ref
    assert re.fullmatch(r"localhost/kiln-python:3\.11-bookworm-[0-9a-f]{12}", images.BASE.ref)
    assert images.BaseRecipe(revision=2).ref != images.BASE.ref
    assert "python3 3.11 stands in for python:3.11-slim" in images.BASE.created_by


def test_normalize_tree_keeps_byte_code_valid(tmp_path):
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text("X = 1\n")
    pyc = Path(py_compile.compile(str(src), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP))
    stale = src.with_name("other.py")
    stale.write_text("Y = 2\n")
    stale_pyc = Path(py_compile.compile(str(stale)))
    stale.write_text("Y = 3 # changed since compiled\n")
    (tmp_path / "link").symlink_to("pkg/mod.py")
    images.normalize_tree(tmp_path)
    head = pyc.read_bytes()[:16]
    assert int.from_bytes(head[8:12], "little") == images.EPOCH == int(src.stat().st_mtime)
    assert int.from_bytes(head[12:16], "little") == src.stat().st_size
    assert int.from_bytes(stale_pyc.read_bytes()[8:12], "little") != images.EPOCH  # not made valid
    assert {int(os.lstat(p).st_mtime) for p in tmp_path.rglob("*")} == {images.EPOCH}


def test_finish_base_makes_a_debootstrap_tree_look_like_the_python_image(tmp_path):
    for d in ("etc", "usr/lib/python3.11", "usr/share/doc/x", "var/log/apt", "proc/1", "tmp"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "usr/lib/python3.11/EXTERNALLY-MANAGED").write_text("x")
    (tmp_path / "usr/share/doc/x/copyright").write_text("c")
    (tmp_path / "usr/share/doc/x/changelog.gz").write_text("c")
    (tmp_path / "var/log/apt/history.log").write_text("x")
    (tmp_path / "etc/shadow").write_text("root:*:20787:0:99999:7:::\nnobody:*:20788:0:99999:7:::\n")
    images._finish_base(tmp_path)
    assert os.readlink(tmp_path / "usr/local/bin/python") == "/usr/bin/python3"
    assert os.readlink(tmp_path / "usr/local/bin/pip") == "/usr/bin/pip3"
    assert not (tmp_path / "usr/lib/python3.11/EXTERNALLY-MANAGED").exists()
    assert sorted(p.name for p in (tmp_path / "usr/share/doc/x").iterdir()) == ["copyright"]
    assert list((tmp_path / "proc").iterdir()) == [] and list((tmp_path / "var/log/apt").iterdir()) == []
    days = images.EPOCH // 86400  # not the day of the build
    assert (
        tmp_path / "etc/shadow"
    ).read_text() == f"root:*:{days}:0:99999:7:::\nnobody:*:{days}:0:99999:7:::\n"


def test_debian_mirror_is_found():
    assert re.match(r"^https?://", images.debian_mirror())


# --- reading buildah's output; the layout containerd imports -----------------------------------


def test_build_output_reader():
    lines = [
        "[1/2] STEP 1/8: FROM localhost/kiln-python:3.11-bookworm-c7f6644ff6f1 AS build",
        "[1/2] STEP 2/8: ENV PIP_NO_CACHE_DIR=1",
        "--> Using cache " + "a" * 64,
        "--> aaaaaaaaaaa",
        "[1/2] STEP 3/8: RUN python -m venv /opt/kiln",
        "--> 0166edc4eac",
        "Successfully tagged docker.io/library/kiln-operator:dev",
        "dbf818539c3033e19a27eda17facd9abc217c51cbddcf37eca63370e4582a644",
    ]
    done = [m[1] for line in lines if (m := images._STEP_DONE.match(line))]
    assert done == ["aaaaaaaaaaa", "0166edc4eac"]
    assert sum(bool(images._CACHED.match(line)) for line in lines) == 1


def _layout(tmp_path: Path) -> tuple[Path, images.ImageInfo, list[str]]:
    """An OCI image layout as skopeo leaves it: blobs/sha256/<hex>, index.json."""
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layers = [b"base layer", b"torch layer", b"kiln layer"]
    diff_ids = ["sha256:" + hashlib.sha256(b).hexdigest() for b in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
            "layers": [{"digest": d, "size": len(b)} for d, b in zip(diff_ids, layers, strict=True)],
        }
    ).encode()
    for blob in (*layers, config, manifest, b"another image's layer"):
        (blobs / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    info = images.ImageInfo(
        "server", "docker.io/library/kiln-server:dev", "kiln-server:dev", "", digest, {}, 0, 0
    )
    return tmp_path, info, diff_ids


def test_layout_for_containerd_names_the_image_and_leaves_out_unpacked_layers(tmp_path):
    layout, info, diff_ids = _layout(tmp_path)
    out = io.BytesIO()
    images.write_layout(out, layout, info, leave_out={diff_ids[1]})
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (entry,) = json.loads(files["index.json"])["manifests"]
    assert entry["digest"] == info.manifest_digest
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert entry["size"] == len(files[f"blobs/sha256/{info.manifest_digest[7:]}"])
    assert entry["annotations"]["io.containerd.image.name"] == "docker.io/library/kiln-server:dev"
    manifest = json.loads(files[f"blobs/sha256/{info.manifest_digest[7:]}"])
    blobs = {name for name in files if name.startswith("blobs/")}
    assert f"blobs/sha256/{diff_ids[1][7:]}" not in blobs  # containerd has its snapshot
    assert blobs == {
        f"blobs/sha256/{d[7:]}"
        for d in (info.manifest_digest, manifest["config"]["digest"], diff_ids[0], diff_ids[2])
    }  # and nothing of another image in the layout
    for name in blobs:
        assert "sha256:" + hashlib.sha256(files[name]).hexdigest() == "sha256:" + name.rsplit("/", 1)[1]


def test_chain_ids_follow_the_image_spec():
    a, b, c = ("sha256:" + x * 64 for x in "abc")
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert images.chain_ids([a, b, c]) == [
        a,
        ab,
        "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest(),
    ]
    assert images.chain_ids([]) == []


def test_llm_image_is_built_only_when_named():
    """The LLM image (7 GB: vLLM pins a torch of its own) is not among the images `build` makes
    by default, and prune keeps it (it is in IMAGES)."""
    assert images.DEFAULT_IMAGES == ["operator", "trainer", "server"]
    assert not images.IMAGES["llm"].default and "llm" in images.IMAGES


def test_llm_image_installs_the_tested_vllm_then_kiln_from_the_wheel():
    """vLLM comes from hack/peer-venv vllm, the script (and pins) the integration test's engine
    comes from; kiln's dependencies, less torch, then kiln itself from its wheel, last."""
    s = stages("llm")
    assert s[0] == [("ARG", "PYTHON_IMAGE=python:3.11-slim")]
    assert [st[0] for st in s[1:]] == [("FROM", "${PYTHON_IMAGE} AS wheel"), ("FROM", "${PYTHON_IMAGE}")]
    runs = final_runs("llm")
    assert ("COPY", "hack/peer-venv /tmp/peer-venv") in s[2]
    assert "bash /tmp/peer-venv vllm /opt/kiln && rm /tmp/peer-venv" in runs
    (deps,) = [r for r in runs if "tomllib" in r]
    assert '*p["dependencies"]' in deps and "optional-dependencies" not in deps  # no torch, no extras
    copy_wheel = s[2].index(("COPY", "--from=wheel /wheels/ /tmp/wheels/"))
    kw, install = s[2][copy_wheel + 1]
    assert kw == "RUN" and install.startswith("pip install --no-deps /tmp/wheels/*.whl")
    assert "RUN" not in [k for k, _ in s[2][copy_wheel + 2 :]]


def test_llm_image_runs_the_openai_server_as_non_root_with_caches_in_tmp():
    assert final("llm", "USER") == ["65532:65532"]
    assert final("llm", "ENTRYPOINT") == ['["python3", "-m", "vllm.entrypoints.openai.api_server"]']
    assert final("llm", "EXPOSE") == ["8080"]
    env = final_env("llm")
    assert env["PATH"] == "/opt/kiln/bin:$PATH"
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert env["HF_HUB_OFFLINE"] == "1"  # nothing is fetched from a hub
    assert all(env[k].startswith("/tmp/") for k in ("XDG_CACHE_HOME", "HF_HOME", "VLLM_CACHE_ROOT"))
