"""hack/kilndev/images.py: the Dockerfile interpreter, on our Dockerfiles and on synthetic ones.

No cluster, no build, no mounts: parsing, evaluation with the planning executor, layer tars of
small directory trees.
"""

from __future__ import annotations

import io
import os
import py_compile
import re
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))

from kilndev import images  # noqa: E402

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
NAMES = list(images.IMAGES)
# what each image installs from pyproject.toml: None = the package without extras
WANTED_EXTRA = {"operator": None, "trainer": "train", "server": "serve"}


def dockerfile(name: str) -> images.Dockerfile:
    spec = images.IMAGES[name]
    return images.parse_dockerfile((REPO / spec.dockerfile).read_text(), spec.dockerfile)


def final_config(name: str) -> dict:
    return images.plan(name)[-1].config.oci()


def build_stage_runs(name: str) -> list[str]:
    build = next(s for s in dockerfile(name).stages if s.name == "build")
    return [i.args for i in build.instructions if i.keyword == "RUN"]


def req_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


# --- our Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_two_stages_a_venv_copied_to_the_final_one(name):
    df = dockerfile(name)
    assert [s.name for s in df.stages] == ["build", None]
    assert [i.text for i in df.global_args] == ["ARG PYTHON_IMAGE=python:3.11-slim"]
    assert all(s.base == "${PYTHON_IMAGE}" for s in df.stages)
    build, final = df.stages
    keywords = [i.keyword for i in build.instructions]
    assert keywords[-4:] == ["WORKDIR", "COPY", "COPY", "RUN"], keywords
    assert "python -m venv /opt/kiln" in build_stage_runs(name)[0]
    assert final.instructions[0].text == "COPY --from=build /opt/kiln /opt/kiln"
    assert "python -m compileall -q /opt/kiln/lib" in build_stage_runs(name)[-1]
    stages = images.plan(name)
    assert stages[0].base_ref == stages[1].base_ref == "python:3.11-slim"


def test_operator_config():
    cfg = final_config("operator")
    assert cfg["Entrypoint"] == ["kiln"]
    assert cfg["Cmd"] == ["operator", "--standalone"]
    assert cfg["User"] == "65532:65532"
    assert cfg["ExposedPorts"] == {"8080/tcp": {}, "9090/tcp": {}}
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PATH"].startswith("/opt/kiln/bin:/usr/local/sbin:")
    assert env["PYTHONUNBUFFERED"] == env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "StopSignal" not in cfg and "WorkingDir" not in cfg


def test_trainer_config():
    cfg = final_config("trainer")
    assert cfg["Entrypoint"] == ["torchrun", "--no-python", "kiln-train"]
    assert "Cmd" not in cfg  # the ENTRYPOINT resets the base image's CMD, the job's args follow it
    assert cfg["User"] == "65532:65532"
    assert cfg["WorkingDir"] == "/tmp"
    assert "ExposedPorts" not in cfg
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert env["TORCH_HOME"] == "/tmp/.cache/torch"
    assert env["PATH"].startswith("/opt/kiln/bin:")


def test_server_config():
    cfg = final_config("server")
    assert cfg["Entrypoint"] == ["kiln-serve"]
    assert "Cmd" not in cfg
    assert cfg["User"] == "65532:65532"
    assert cfg["ExposedPorts"] == {"8080/tcp": {}, "9090/tcp": {}}
    assert cfg["StopSignal"] == "SIGTERM"
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["KILN_PORT"] == "8080" and env["KILN_METRICS_PORT"] == "9090"
    assert env["HOME"] == "/tmp"


@pytest.mark.parametrize("name", NAMES)
def test_entrypoint_is_a_declared_console_script(name):
    entrypoint = final_config(name)["Entrypoint"]
    if name == "trainer":
        assert entrypoint[:2] == ["torchrun", "--no-python"]  # torch's own console script
        assert entrypoint[2] in SCRIPTS
    else:
        assert entrypoint[0] in SCRIPTS


@pytest.mark.parametrize("name", NAMES)
def test_each_image_installs_its_extra(name):
    installs = [m.group(1) for run in build_stage_runs(name) for m in re.finditer(r"pip install (\S+)", run)]
    source = [w.strip("\"'") for w in installs if w.strip("\"'").startswith(".")]
    assert len(source) == 1, installs
    m = re.fullmatch(r"\.(?:\[(\w+)\])?", source[0])
    assert m, source
    assert m.group(1) == WANTED_EXTRA[name]
    if WANTED_EXTRA[name]:
        assert WANTED_EXTRA[name] in EXTRAS


def test_operator_image_never_gets_torch():
    df = dockerfile("operator")
    instructions = [i.text for s in df.stages for i in (s.from_line, *s.instructions)]
    assert not any("torch" in text.lower() for text in instructions)
    assert not any(req_name(r) == "torch" for r in PYPROJECT["project"]["dependencies"])


@pytest.mark.parametrize("name", ["trainer", "server"])
def test_torch_has_its_own_layer_before_the_sources(name):
    build = next(s for s in dockerfile(name).stages if s.name == "build")
    keywords = [i.keyword for i in build.instructions]
    torch_run = next(
        i for i, ins in enumerate(build.instructions) if "torch" in ins.args and ins.keyword == "RUN"
    )
    assert torch_run < keywords.index("COPY")
    # both branches install torch: from TORCH_INDEX_URL when set, else from the default index
    text = build.instructions[torch_run].args
    specs = set(re.findall(r'"(torch[^"]*)"', text))
    torch_req = {r for r in EXTRAS[WANTED_EXTRA[name]] if req_name(r) == "torch"}
    assert specs == torch_req, (specs, torch_req)
    assert text.count("pip install") == 2 and '--index-url "$TORCH_INDEX_URL"' in text


def test_trainer_and_server_share_the_torch_layer_in_the_local_build():
    """Same resolved steps up to torch (TORCH_INDEX_URL empty in both): one cached torch layer."""

    def keys(name):
        build = images.plan(name)[0]
        return [layer.key for layer in build.layers[:3]]  # base, venv, torch

    assert keys("trainer") == keys("server")
    # with the server's Dockerfile default (the CPU index) they differ, as they should
    server_default = images.plan("server", build_args={})[0]
    assert server_default.layers[2].key != keys("trainer")[2]


def test_local_build_args_are_declared():
    for name, spec in images.IMAGES.items():
        stages = images.plan(name)
        declared = {k for s in stages for k in s.args}
        assert set(spec.build_args) <= declared, name
    assert images.IMAGES["server"].build_args == {"TORCH_INDEX_URL": ""}
    assert images.plan("server")[0].args["TORCH_INDEX_URL"] == ""
    assert images.plan("server", build_args={})[0].args["TORCH_INDEX_URL"] == (
        "https://download.pytorch.org/whl/cpu"
    )


def test_build_context_ignores_local_state():
    ignore = images.DockerIgnore((REPO / ".dockerignore").read_text())
    for path in (
        "operator/kiln/__pycache__/cli.cpython-311.pyc",
        "operator/kiln_operator.egg-info/PKG-INFO",
        ".venv/bin/python",
        ".git/HEAD",
    ):
        assert ignore.excluded(path), path
    for path in ("operator/kiln/cli.py", "pyproject.toml", "README.md"):
        assert not ignore.excluded(path), path


# --- the interpreter on synthetic Dockerfiles ---------------------------------------------------

SYNTHETIC = r"""
# syntax=docker/dockerfile:1
ARG BASE=python:3.11-slim
ARG VERSION=1.0
FROM ${BASE} AS build
ARG VERSION
ARG WHO=world
ENV GREETING="hello ${WHO}" \
    # a comment inside a continuation
    PLAIN=${MISSING:-fallback} EMPTY=
ENV OLD_STYLE value with spaces
RUN echo "$GREETING" \
    && echo done
WORKDIR app
WORKDIR sub
COPY --chown=1000:1000 a.txt b.txt ./
EXPOSE 53/udp 80
CMD python -m http.server

FROM build AS final
LABEL org.example.version=$VERSION
ENTRYPOINT ["/entry"]
STOPSIGNAL SIGINT
USER 1000
"""


def test_synthetic_dockerfile():
    df = images.parse_dockerfile(SYNTHETIC)
    assert [s.name for s in df.stages] == ["build", "final"]
    run = next(i for i in df.stages[0].instructions if i.keyword == "RUN")
    assert run.args == 'echo "$GREETING"     && echo done'
    stages = images.evaluate(df, {"WHO": "kiln"})
    build, final = stages
    assert build.config.env["GREETING"] == "hello kiln"
    assert build.config.env["PLAIN"] == "fallback"
    assert build.config.env["EMPTY"] == ""
    assert build.config.env["OLD_STYLE"] == "value with spaces"
    assert build.config.workdir == "/app/sub"
    assert build.config.cmd == ["/bin/sh", "-c", "python -m http.server"]
    assert build.args == {"VERSION": "1.0", "WHO": "kiln"}
    cfg = final.config.oci()
    assert cfg["Entrypoint"] == ["/entry"]
    assert "Cmd" not in cfg  # as Docker: ENTRYPOINT resets a CMD inherited from the parent stage
    assert cfg["ExposedPorts"] == {"53/udp": {}, "80/tcp": {}}
    assert cfg["Labels"] == {"org.example.version": ""}  # ARG not redeclared in this stage
    assert cfg["StopSignal"] == "SIGINT" and cfg["User"] == "1000"
    assert cfg["WorkingDir"] == "/app/sub"
    # the final stage builds on the first: same layers below
    assert [lay.key for lay in final.layers[: len(build.layers)]] == [lay.key for lay in build.layers]
    history = final.config and final.history
    assert sum(1 for h in history if not h.get("empty_layer")) == len(final.layers)


def test_entrypoint_resets_inherited_cmd():
    df = images.parse_dockerfile('FROM python:3.11-slim\nENTRYPOINT ["x"]\n')
    assert images.evaluate(df)[0].config.cmd is None
    df = images.parse_dockerfile('FROM python:3.11-slim\nCMD ["y"]\nENTRYPOINT ["x"]\n')
    assert images.evaluate(df)[0].config.cmd == ["y"]


def test_word_processing():
    env = {"A": "1", "E": ""}
    assert images.process_word(r"'$A'\$A\"\"$A", env) == '$A$A""1'
    assert images.process_word('"${A:+set}-${E:-empty}-${E-unset}-${Z:-z}"', env) == "set-empty--z"
    assert images.split_words("a 'b c' \"d e\" f\\ g") == ["a", "'b c'", '"d e"', "f\\ g"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("FROM python:3.11-slim\nADD a.tar.gz /x\n", "ADD is not supported"),
        ("FROM python:3.11-slim\nHEALTHCHECK CMD true\n", "HEALTHCHECK is not supported"),
        ('FROM python:3.11-slim\nSHELL ["/bin/bash", "-c"]\n', "SHELL is not supported"),
        ("FROM python:3.11-slim\nRUN --mount=type=cache,target=/root/.cache pip install x\n", "--mount"),
        ("FROM python:3.11-slim\nRUN <<EOF\necho\nEOF\n", "heredocs"),
        ("RUN true\n", "only ARG may come before the first FROM"),
        ("# escape=`\nFROM python:3.11-slim\n", "escape"),
    ],
)
def test_unsupported_instructions_are_errors(text, message):
    with pytest.raises(images.BuildError, match=re.escape(message)):
        images.parse_dockerfile(text)


def test_images_cannot_be_pulled():
    df = images.parse_dockerfile("FROM ubuntu:24.04\nRUN true\n")
    with pytest.raises(images.BuildError, match="cannot be pulled"):
        images.evaluate(df)


# --- layers -------------------------------------------------------------------------------------


def _tree(root: Path, order: list[str]) -> Path:
    files = {"a/x.txt": b"x", "a/b/y.bin": b"\0" * 3000, "z.txt": b"z", "a/b/c/empty": b""}
    for name in order:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[name])
        time.sleep(0.01)
    (root / "link").symlink_to("a/x.txt")
    os.chmod(root / "z.txt", 0o600)
    return root


def test_identical_trees_give_identical_layer_digests(tmp_path):
    one = _tree(tmp_path / "one", ["a/x.txt", "a/b/y.bin", "z.txt", "a/b/c/empty"])
    two = _tree(tmp_path / "two", ["z.txt", "a/b/c/empty", "a/b/y.bin", "a/x.txt"])
    os.utime(two / "z.txt", (1, 1))
    d1, s1 = images.layer_digest(one)
    d2, s2 = images.layer_digest(two)
    assert (d1, s1) == (d2, s2)
    (two / "z.txt").write_bytes(b"Z")
    assert images.layer_digest(two)[0] != d1
    buf = io.BytesIO()
    images.write_layer_tar(one, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {m.mtime for m in members} == {images.EPOCH}
    assert {(m.uname, m.gname) for m in members} == {("", "")}
    assert next(m for m in members if m.name == "z.txt").mode == 0o600
    assert next(m for m in members if m.name == "link").linkname == "a/x.txt"


def _set_opaque(path: Path) -> None:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            os.setxattr(path, attr, b"y")
            return
        except OSError:
            continue
    pytest.skip("this filesystem takes neither trusted.* nor user.* xattrs")


def test_overlay_whiteouts_become_oci_whiteouts(tmp_path):
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "new.conf").write_text("x")
    (upper / "opq").mkdir()
    (upper / "opq" / "kept").write_text("k")
    _set_opaque(upper / "opq")
    as_root = os.geteuid() == 0
    if as_root:  # overlayfs records a deletion as a character device 0/0
        os.mknod(upper / "etc" / "gone.conf", 0o600 | 0o020000, os.makedev(0, 0))
    buf = io.BytesIO()
    images.write_layer_tar(upper, buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert "opq/.wh..wh..opq" in members and members["opq/.wh..wh..opq"].isreg()
    assert "opq/kept" in members and "etc/new.conf" in members
    assert not any(m.ischr() for m in members.values())
    if as_root:
        assert "etc/.wh.gone.conf" in members
        assert members["etc/.wh.gone.conf"].isreg() and members["etc/.wh.gone.conf"].size == 0
        assert "etc/gone.conf" not in members


def test_merged_view_follows_overlay_rules(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("whiteouts are character devices 0/0: mknod needs root")
    lower, mid, top = tmp_path / "lower", tmp_path / "mid", tmp_path / "top"
    for d in ("etc", "opt/app", "var"):
        (lower / d).mkdir(parents=True)
    (lower / "etc" / "a").write_text("lower a")
    (lower / "etc" / "b").write_text("lower b")
    (lower / "opt" / "app" / "old").write_text("old")
    (mid / "etc").mkdir(parents=True)
    (mid / "etc" / "a").write_text("mid a")
    os.mknod(mid / "etc" / "b", 0o600 | 0o020000, os.makedev(0, 0))
    (top / "opt" / "app").mkdir(parents=True)
    (top / "opt" / "app" / "new").write_text("new")
    _set_opaque(top / "opt" / "app")
    view = images.MergedView([lower, mid, top])
    assert view.read_text("/etc/a") == "mid a"
    assert view.lookup("/etc/b") is None
    assert list(view.listdir("/etc")) == ["a"]
    assert list(view.listdir("/opt/app")) == ["new"]
    assert [rel for rel, _ in view.walk("/")] == ["etc", "etc/a", "opt", "opt/app", "opt/app/new", "var"]


def test_pyc_timestamps_follow_the_fixed_mtime(tmp_path):
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text("X = 1\n")
    pyc = Path(py_compile.compile(str(src), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP))
    images.normalize_layer(tmp_path, None)
    head = pyc.read_bytes()[:16]
    assert int.from_bytes(head[8:12], "little") == images.EPOCH == int(src.stat().st_mtime)
    assert int.from_bytes(head[12:16], "little") == src.stat().st_size
    assert {int(p.stat().st_mtime) for p in tmp_path.rglob("*")} == {images.EPOCH}


def test_dockerignore_semantics():
    ign = images.DockerIgnore("*.md\n!README.md\n**/tmp\ndocs/*.txt\n")
    assert ign.excluded("CHANGES.md") and not ign.excluded("README.md")
    assert not ign.excluded("sub/CHANGES.md")  # patterns are anchored at the context root
    assert ign.excluded("a/b/tmp/x") and ign.excluded("tmp")
    assert ign.excluded("docs/a.txt") and not ign.excluded("docs/sub/a.txt")


def test_debian_mirror_is_found():
    assert re.match(r"^https?://", images.debian_mirror())
