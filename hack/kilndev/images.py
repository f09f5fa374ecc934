"""Build Kiln's container images without Docker, by executing their Dockerfiles' own steps.

images/{operator,trainer,server}/Dockerfile stay the recipe for everyone with Docker. Here (no
Docker engine, no registry) this module reads the same files and carries out their instructions
itself, so the two cannot drift:

- a small Dockerfile interpreter: ARG (also before FROM, with --build-arg overrides), FROM ... AS,
  ENV, RUN (shell and exec form), COPY (also --from=<stage>, --chown, --chmod), WORKDIR, USER,
  EXPOSE, ENTRYPOINT, CMD, STOPSIGNAL, LABEL, comments and line continuations, .dockerignore.
  Any other instruction (ADD, SHELL, HEALTHCHECK, VOLUME, ONBUILD, RUN --mount, heredocs) is an
  error naming it, never silently skipped.
- ``FROM python:3.11-slim`` cannot be pulled here: Debian bookworm's own python3 (3.11) stands in
  for the official image's python 3.11 build. The base is ``debootstrap --variant=minbase
  bookworm`` plus python3, python3-venv, python3-pip and ca-certificates, with python, python3,
  pip and pip3 in /usr/local/bin as in the official image (and no EXTERNALLY-MANAGED marker, so
  pip may install system-wide there too). It is built once and cached under
  ``${XDG_CACHE_HOME:-~/.cache}/kiln/images/base/<key of its recipe>``.
- RUN executes in a chroot of the stage's root filesystem: an overlayfs mount of the stage's
  layers (lower dirs) with a fresh upper dir that becomes the step's layer, /proc, /sys, /dev
  mounted, the host's /etc/resolv.conf and CA bundle bind-mounted read-only, all inside a private
  mount and PID namespace (``unshare``), so every mount and process is gone when the step ends,
  also on an error or Ctrl-C. The environment is the image's ENV plus the build args in scope,
  nothing from the host (no proxies), with PIP_CERT pointing at the bound CA bundle.
- The equivalent of a BuildKit cache mount: pip's cache, shared by all builds, is mounted at
  /root/.cache/pip during RUN. The Dockerfiles set PIP_NO_CACHE_DIR=1 (right for Docker builds,
  where the cache would land in the layer); for this local build only it is dropped from RUN's
  environment (it stays in the image config), because here the cache is outside the layer.
  (Where an HTTP proxy strips PyPI's Cache-Control headers, as our machines' egress does, pip's
  HTTP cache stores nothing and every build downloads again: about 70 s for torch here.)
- Layers: each RUN/COPY (and a WORKDIR that creates its directory) is one layer, cached by a key
  of (parent key, the instruction with its resolved arguments, the environment and build args it
  sees, the content hash of COPY sources) as Docker's build cache does, so a source change reuses
  the torch layer. Overlay whiteouts (character device 0/0, the opaque xattr) become OCI ``.wh.``
  entries. Tars are deterministic (sorted, numeric owners, no user/group names, every mtime
  SOURCE_DATE_EPOCH = 1980-01-01): identical content gives identical digests, so the base layer is
  one blob shared by all three images. So that byte-compiled files stay valid with those mtimes,
  the timestamp field of each .pyc written for a source in the step is set to the same epoch.
- Output: an OCI image (config with Entrypoint, Cmd, Env, User, WorkingDir, ExposedPorts,
  StopSignal, Labels; uncompressed layers), streamed straight into the real node's containerd
  (namespace k8s.io) through ``hack/cluster image-import`` as ``docker.io/library/kiln-<x>:<tag>``,
  which is what the kubelet looks up for ``kiln-<x>:<tag>``. Skipped when containerd already has
  that image at the same manifest digest. After the import the layer blobs are dropped from
  containerd's content store (its snapshots hold the files), as the CRI plugin's
  ``discard_unpacked_layers`` does: a torch image then takes 6 GB of disk there, not 12.

Local build args: the server's TORCH_INDEX_URL defaults to the CPU-only wheel index, which cannot
be reached here, so the local build passes TORCH_INDEX_URL= (torch from PyPI, the CUDA build, as
the trainer's default): the images are about 4.6 GB each.

Python API (the e2e tests put hack/ on sys.path)::

    from kilndev import images
    infos = images.build(["operator", "server"], tag="dev", import_=True)
    infos["server"].ref, infos["server"].manifest_digest, infos["server"].view().listdir("/opt/kiln")

Standard library only. Root only (mounts, chroot).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parents[2]
HACK_CLUSTER = REPO / "hack" / "cluster"

# Bump when the way layers are produced changes: every cached layer key includes it.
BUILDER_VERSION = "kiln-images/1"
# SOURCE_DATE_EPOCH of every file in every layer (1980-01-01T00:00:00Z, the zip epoch: nothing
# that later packs these files into a zip archive trips over an earlier date).
EPOCH = 315532800
EPOCH_ISO = "1980-01-01T00:00:00Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIP_CACHE_IN_CHROOT = "/root/.cache/pip"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str  # relative to the repository root (also the build context)
    build_args: dict[str, str] = field(default_factory=dict)
    note: str = ""


IMAGES: dict[str, ImageSpec] = {
    "operator": ImageSpec("images/operator/Dockerfile"),
    "trainer": ImageSpec("images/trainer/Dockerfile"),
    "server": ImageSpec(
        "images/server/Dockerfile",
        {"TORCH_INDEX_URL": ""},
        note="TORCH_INDEX_URL= (the CPU-only index cannot be reached here: torch from PyPI, the "
        "CUDA build, as in the trainer)",
    ),
}


class BuildError(Exception):
    """A Dockerfile this interpreter cannot read, or a step that failed."""


# --------------------------------------------------------------------------------------------
# Dockerfile parsing

SUPPORTED = (
    "ARG",
    "FROM",
    "ENV",
    "RUN",
    "COPY",
    "WORKDIR",
    "USER",
    "EXPOSE",
    "ENTRYPOINT",
    "CMD",
    "STOPSIGNAL",
    "LABEL",
)
FLAGS = {"FROM": {"platform"}, "COPY": {"from", "chown", "chmod", "link"}, "RUN": set()}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the text after the keyword and its --flags
    lineno: int
    flags: tuple[tuple[str, str], ...] = ()
    json: tuple[str, ...] | None = None  # exec form: the JSON array

    def flag(self, name: str) -> str | None:
        return dict(self.flags).get(name)

    @property
    def text(self) -> str:
        flags = "".join(f"--{k}={v} " if v else f"--{k} " for k, v in self.flags)
        return f"{self.keyword} {flags}{self.args}".strip()


@dataclass(frozen=True)
class StageDef:
    index: int
    base: str  # unexpanded, e.g. ${PYTHON_IMAGE}
    name: str | None
    from_line: Instruction
    instructions: tuple[Instruction, ...]


@dataclass(frozen=True)
class Dockerfile:
    global_args: tuple[Instruction, ...]
    stages: tuple[StageDef, ...]
    path: str = "Dockerfile"


def _logical_lines(text: str, path: str) -> Iterator[tuple[int, str]]:
    """(line number, logical line): comments dropped, continuations joined as Docker does."""
    lines = text.splitlines()
    # parser directives: only at the very top, before any instruction or other comment
    for line in lines:
        m = re.match(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.*?)\s*$", line)
        if not m:
            break
        key, value = m.group(1).lower(), m.group(2)
        if key == "escape" and value != "\\":
            raise BuildError(f"{path}: parser directive escape={value} is not supported (only \\)")
    buf: list[str] = []
    start = 0
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#") or (buf and not stripped):
            continue  # comments (also inside a continuation) and empty continuation lines
        if not buf and not stripped:
            continue
        if not buf:
            start = n
        m = re.match(r"^(.*)\\[ \t]*$", line)
        if m:
            buf.append(m.group(1))
            continue
        buf.append(line)
        yield start, "".join(buf)
        buf = []
    if buf:
        yield start, "".join(buf)


def _parse_instruction(lineno: int, line: str, path: str) -> Instruction:
    m = re.match(r"^\s*(\S+)\s*(.*)$", line, re.S)
    if not m:
        raise BuildError(f"{path}:{lineno}: cannot parse {line!r}")
    keyword, rest = m.group(1).upper(), m.group(2).strip()
    if keyword not in SUPPORTED:
        raise BuildError(
            f"{path}:{lineno}: {keyword} is not supported by hack/kilndev/images.py "
            f"(supported: {', '.join(SUPPORTED)})"
        )
    flags: list[tuple[str, str]] = []
    if keyword in FLAGS:
        while True:
            fm = re.match(r"^--([a-z-]+)(?:=(\S*))?\s*(.*)$", rest, re.S)
            if not fm:
                break
            name = fm.group(1)
            if name not in FLAGS[keyword]:
                raise BuildError(f"{path}:{lineno}: {keyword} --{name} is not supported")
            flags.append((name, fm.group(2) or ""))
            rest = fm.group(3).strip()
    exec_form = None
    if keyword in ("RUN", "CMD", "ENTRYPOINT", "COPY") and rest.startswith("["):
        try:
            value = json.loads(rest)
        except json.JSONDecodeError:
            value = None  # Docker too falls back to the shell form
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            exec_form = tuple(value)
    if keyword == "RUN" and exec_form is None and re.match(r"^<<-?\S", rest):
        raise BuildError(f"{path}:{lineno}: RUN heredocs are not supported")
    if not rest and keyword not in ("CMD", "ENTRYPOINT"):
        raise BuildError(f"{path}:{lineno}: {keyword} needs arguments")
    return Instruction(keyword, rest, lineno, tuple(flags), exec_form)


def parse_dockerfile(text: str, path: str = "Dockerfile") -> Dockerfile:
    global_args: list[Instruction] = []
    stages: list[StageDef] = []
    current: list[Instruction] | None = None
    from_line: Instruction | None = None

    def close() -> None:
        if from_line is not None and current is not None:
            words = split_words(from_line.args)
            name = None
            if len(words) == 3 and words[1].upper() == "AS":
                name = words[2].lower()
            elif len(words) != 1:
                raise BuildError(f"{path}:{from_line.lineno}: FROM IMAGE [AS NAME], got {from_line.args!r}")
            stages.append(StageDef(len(stages), words[0], name, from_line, tuple(current)))

    for lineno, line in _logical_lines(text, path):
        ins = _parse_instruction(lineno, line, path)
        if ins.keyword == "FROM":
            close()
            from_line, current = ins, []
        elif current is None:
            if ins.keyword != "ARG":
                raise BuildError(f"{path}:{lineno}: only ARG may come before the first FROM")
            global_args.append(ins)
        else:
            current.append(ins)
    close()
    if not stages:
        raise BuildError(f"{path}: no FROM")
    return Dockerfile(tuple(global_args), tuple(stages), path)


# --- words and variable substitution (Docker's shell lexer, the parts Dockerfiles use) ------


def split_words(s: str) -> list[str]:
    """Split on unquoted whitespace; quotes and escapes stay in the words (see process_word)."""
    words: list[str] = []
    cur: list[str] = []
    quote = ""
    i = 0
    in_word = False
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\" and quote == '"' and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c == quote:
                quote = ""
        elif c in " \t\r\n":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        else:
            in_word = True
            cur.append(c)
            if c == "\\" and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c in "'\"":
                quote = c
        i += 1
    if quote:
        raise BuildError(f"unterminated quote in {s!r}")
    if in_word:
        words.append("".join(cur))
    return words


def process_word(word: str, env: dict[str, str]) -> str:
    """Expand $VAR, ${VAR}, ${VAR:-default}, ${VAR:+alt} (and - / +), remove quotes and escapes."""
    out: list[str] = []
    i = 0
    n = len(word)

    def expand(i: int) -> tuple[str, int]:
        # word[i] == "$"
        if i + 1 < n and word[i + 1] == "{":
            end = word.find("}", i + 2)
            if end < 0:
                raise BuildError(f"missing '}}' in {word!r}")
            body = word[i + 2 : end]
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+])(.*))?$", body, re.S)
            if not m:
                raise BuildError(f"unsupported substitution ${{{body}}} in {word!r}")
            name, op, arg = m.group(1), m.group(2), m.group(3)
            value = env.get(name)
            if op is None:
                return value or "", end + 1
            arg = process_word(arg, env)
            if op == ":-":
                return (value if value else arg), end + 1
            if op == "-":
                return (value if value is not None else arg), end + 1
            if op == ":+":
                return (arg if value else ""), end + 1
            return (arg if value is not None else ""), end + 1  # "+"
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", word[i + 1 :])
        if not m:
            return "$", i + 1
        return env.get(m.group(0), ""), i + 1 + len(m.group(0))

    while i < n:
        c = word[i]
        if c == "\\":
            if i + 1 < n:
                out.append(word[i + 1])
            i += 2
        elif c == "'":
            end = word.find("'", i + 1)
            if end < 0:
                raise BuildError(f"unterminated quote in {word!r}")
            out.append(word[i + 1 : end])
            i = end + 1
        elif c == '"':
            i += 1
            while i < n and word[i] != '"':
                if word[i] == "\\" and i + 1 < n and word[i + 1] in '"$\\':
                    out.append(word[i + 1])
                    i += 2
                elif word[i] == "$":
                    text, i = expand(i)
                    out.append(text)
                else:
                    out.append(word[i])
                    i += 1
            if i >= n:
                raise BuildError(f"unterminated quote in {word!r}")
            i += 1
        elif c == "$":
            text, i = expand(i)
            out.append(text)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_pairs(ins: Instruction, env: dict[str, str]) -> list[tuple[str, str]]:
    """ENV/LABEL: ``k=v k2="v 2"`` (every value expanded with the env before the line) or ``k v``."""
    words = split_words(ins.args)
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise BuildError(f"line {ins.lineno}: {ins.keyword} {ins.args!r} has no value")
        rest = ins.args.strip()[len(words[0]) :].strip()
        return [(words[0], process_word(rest, env))]
    pairs = []
    for w in words:
        if "=" not in w:
            raise BuildError(f"line {ins.lineno}: {ins.keyword} expects KEY=VALUE, got {w!r}")
        k, _, v = w.partition("=")
        pairs.append((process_word(k, env), process_word(v, env)))
    return pairs


def parse_arg(ins: Instruction, env: dict[str, str]) -> tuple[str, str | None]:
    words = split_words(ins.args)
    if len(words) != 1:
        raise BuildError(f"line {ins.lineno}: ARG NAME[=DEFAULT], got {ins.args!r}")
    name, eq, default = words[0].partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise BuildError(f"line {ins.lineno}: bad ARG name {name!r}")
    return name, (process_word(default, env) if eq else None)


# --------------------------------------------------------------------------------------------
# Evaluation: the same pass plans (unit tests) and builds (with a real executor)


@dataclass
class ImageConfig:
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    user: str = ""
    workdir: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    stop_signal: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def oci(self) -> dict[str, Any]:
        """The ``config`` object of an OCI image config (empty fields left out)."""
        out: dict[str, Any] = {}
        if self.user:
            out["User"] = self.user
        if self.exposed_ports:
            out["ExposedPorts"] = {p: {} for p in sorted(self.exposed_ports)}
        out["Env"] = [f"{k}={v}" for k, v in self.env.items()]
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.workdir:
            out["WorkingDir"] = self.workdir
        if self.labels:
            out["Labels"] = dict(sorted(self.labels.items()))
        if self.stop_signal:
            out["StopSignal"] = self.stop_signal
        return out


@dataclass
class Layer:
    key: str
    path: Path | None  # the directory holding the layer's files (an overlay upper dir, or the base)
    created_by: str
    cached: bool = False


@dataclass
class StageState:
    index: int
    name: str | None
    base_ref: str
    base_key: str
    layers: list[Layer]
    config: ImageConfig
    args: dict[str, str | None] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    cmd_set: bool = False

    @property
    def key(self) -> str:
        return self.layers[-1].key if self.layers else self.base_key

    def dirs(self) -> list[Path]:
        return [layer.path for layer in self.layers if layer.path is not None]

    def vars(self) -> dict[str, str]:
        """What $VAR means in this stage: build args in scope, overridden by ENV."""
        out = {k: v for k, v in self.args.items() if v is not None}
        out.update(self.config.env)
        return out

    def run_env(self) -> dict[str, str]:
        return self.vars()


class Executor:
    """Carries out the layer steps. This base class only plans (no files touched)."""

    def base(self, ref: str, lineno: int) -> tuple[str, list[Layer], ImageConfig, list[dict[str, Any]]]:
        if ref in BASE_SUBSTITUTES:
            return f"plan:{ref}", [Layer(f"plan:{ref}", None, "")], base_config(), [{}]
        if ref == "scratch":
            return "scratch", [], ImageConfig(), []
        raise BuildError(unpullable(ref, lineno))

    def run(self, st: StageState, argv: list[str], created_by: str) -> Layer:
        user = st.config.user or "0"
        ids = (0, 0) if user in ("0", "0:0", "root", "root:root") else None  # names need the files
        key = run_identity(st, argv, ids or (-1, -1), "/root" if ids else "?")[0]
        return Layer(key, None, created_by)

    def copy(
        self, st: StageState, ins: Instruction, srcs: list[str], dest: str, src_stage: StageState | None
    ) -> Layer:
        return Layer(_key(st.key, ins.text), None, ins.text)

    def workdir(self, st: StageState, path: str) -> Layer | None:
        return None


def run_identity(
    st: StageState, argv: list[str], ids: tuple[int, int], home: str
) -> tuple[str, dict[str, str], str]:
    """A RUN step's cache key, environment and working directory: what it runs, as whom, where,
    on top of what, and every variable it sees (ENV and the build args in scope)."""
    env = st.run_env()
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", home)
    workdir = st.config.workdir or "/"
    key = _key(st.key, "RUN", argv, sorted(env.items()), f"{ids[0]}:{ids[1]}", workdir)
    return key, env, workdir


def unpullable(ref: str, lineno: int) -> str:
    return (
        f"line {lineno}: FROM {ref}: images cannot be pulled here; supported: a previous stage, scratch, "
        f"or {' / '.join(sorted(BASE_SUBSTITUTES))} (stood in for by Debian bookworm's python3, see "
        "hack/kilndev/images.py)"
    )


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([BUILDER_VERSION, *parts], sort_keys=True).encode()).hexdigest()[:40]


def evaluate(
    df: Dockerfile,
    build_args: dict[str, str] | None = None,
    executor: Executor | None = None,
    *,
    target: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[StageState]:
    """Run the Dockerfile's instructions; returns the stages up to the target (default: the last)."""
    ex = executor or Executor()
    build_args = dict(build_args or {})
    used: set[str] = set()
    global_args: dict[str, str | None] = {}
    for ins in df.global_args:
        name, default = parse_arg(ins, {k: v for k, v in global_args.items() if v is not None})
        if name in build_args:
            used.add(name)
        global_args[name] = build_args.get(name, default)
    stages: list[StageState] = []
    for sdef in df.stages:
        ref = process_word(sdef.base, {k: v for k, v in global_args.items() if v is not None})
        parent = next((s for s in stages if s.name and s.name == ref.lower()), None)
        if parent is not None:
            st = StageState(
                sdef.index,
                sdef.name,
                ref,
                parent.base_key,
                list(parent.layers),
                dataclasses.replace(
                    parent.config,
                    env=dict(parent.config.env),
                    exposed_ports=list(parent.config.exposed_ports),
                    labels=dict(parent.config.labels),
                ),
                {},
                list(parent.history),
            )
        else:
            base_key, layers, config, history = ex.base(ref, sdef.from_line.lineno)
            st = StageState(sdef.index, sdef.name, ref, base_key, layers, config, {}, history)
        log(f"[{Path(df.path).parent.name or df.path} {sdef.index + 1}/{len(df.stages)}] FROM {ref}")
        for ins in sdef.instructions:
            _apply(ex, df, st, ins, stages, global_args, build_args, used, log)
        stages.append(st)
        if target and sdef.name == target:
            break
    unused = sorted(set(build_args) - used)
    if unused:
        log(f"warning: build args not consumed: {', '.join(unused)}")
    return stages


def _apply(
    ex: Executor,
    df: Dockerfile,
    st: StageState,
    ins: Instruction,
    stages: list[StageState],
    global_args: dict[str, str | None],
    build_args: dict[str, str],
    used: set[str],
    log: Callable[[str], None],
) -> None:
    k = ins.keyword
    cfg = st.config
    vars_ = st.vars()
    empty = True
    if k == "ARG":
        name, default = parse_arg(ins, vars_)
        if name in build_args:
            used.add(name)
            st.args[name] = build_args[name]
        elif default is not None:
            st.args[name] = default
        else:
            st.args[name] = global_args.get(name)
    elif k == "ENV":
        for key, value in parse_pairs(ins, vars_):
            cfg.env[key] = value
    elif k == "LABEL":
        for key, value in parse_pairs(ins, vars_):
            cfg.labels[key] = value
    elif k == "RUN":
        argv = list(ins.json) if ins.json is not None else ["/bin/sh", "-c", ins.args]
        created_by = "RUN " + (json.dumps(argv) if ins.json is not None else f"/bin/sh -c {ins.args}")
        log(f"  {created_by[:150]}")
        st.layers.append(ex.run(st, argv, created_by))
        empty = False
    elif k == "COPY":
        words = list(ins.json) if ins.json is not None else split_words(ins.args)
        words = [process_word(w, vars_) if ins.json is None else w for w in words]
        if len(words) < 2:
            raise BuildError(f"{df.path}:{ins.lineno}: COPY SRC... DEST")
        src_stage = None
        frm = ins.flag("from")
        if frm is not None:
            src_stage = next(
                (s for s in stages if (s.name and s.name == frm.lower()) or str(s.index) == frm), None
            )
            if src_stage is None:
                raise BuildError(
                    f"{df.path}:{ins.lineno}: COPY --from={frm}: no such earlier stage (images cannot be pulled)"
                )
        dest = words[-1]
        if not dest.startswith("/"):
            trailing = dest.endswith("/") or dest in (".", "./")
            dest = str(PurePosixPath(cfg.workdir or "/") / dest)
            dest = os.path.normpath(dest) + ("/" if trailing else "")
        log(f"  {ins.text}")
        st.layers.append(ex.copy(st, ins, words[:-1], dest, src_stage))
        empty = False
    elif k == "WORKDIR":
        path = process_word(ins.args, vars_)
        if not path.startswith("/"):
            path = str(PurePosixPath(cfg.workdir or "/") / path)
        cfg.workdir = os.path.normpath(path)
        layer = ex.workdir(st, cfg.workdir)
        if layer is not None:
            st.layers.append(layer)
            empty = False
    elif k == "USER":
        cfg.user = process_word(ins.args, vars_)
    elif k == "EXPOSE":
        for w in split_words(ins.args):
            port = process_word(w, vars_)
            if "/" not in port:
                port += "/tcp"
            if port not in cfg.exposed_ports:
                cfg.exposed_ports.append(port)
    elif k in ("ENTRYPOINT", "CMD"):
        if ins.json is not None:
            command = list(ins.json)
        elif ins.args:
            command = ["/bin/sh", "-c", ins.args]
        else:
            command = []
        if k == "ENTRYPOINT":
            cfg.entrypoint = command
            if not st.cmd_set:
                cfg.cmd = None  # as Docker: an ENTRYPOINT resets the CMD inherited from the base
        else:
            cfg.cmd = command
            st.cmd_set = True
    elif k == "STOPSIGNAL":
        cfg.stop_signal = process_word(ins.args, vars_)
    else:  # pragma: no cover - the parser already refused it
        raise BuildError(f"{df.path}:{ins.lineno}: {k} is not supported")
    entry: dict[str, Any] = {"created": EPOCH_ISO, "created_by": _history_text(ins)}
    if empty:
        entry["empty_layer"] = True
    st.history.append(entry)


def _history_text(ins: Instruction) -> str:
    if ins.keyword == "RUN":
        return "RUN " + (json.dumps(list(ins.json)) if ins.json is not None else f"/bin/sh -c {ins.args}")
    return ins.text


def plan(name_or_path: str, build_args: dict[str, str] | None = None) -> list[StageState]:
    """Evaluate a Dockerfile without building anything: stages with their final configs."""
    if name_or_path in IMAGES:
        spec = IMAGES[name_or_path]
        path = REPO / spec.dockerfile
        args = dict(spec.build_args) if build_args is None else build_args
    else:
        path, args = Path(name_or_path), build_args or {}
    return evaluate(parse_dockerfile(path.read_text(), str(path)), args)


# --------------------------------------------------------------------------------------------
# The base image stand-in: Debian bookworm + its python3


@dataclass(frozen=True)
class BaseRecipe:
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ("python3", "python3-venv", "python3-pip", "ca-certificates")
    # bump when _finish_base changes what the base holds (not bumped for dropping ldconfig's
    # aux-cache, which only made two builds differ; ldconfig rebuilds it when needed)
    revision: int = 1


BASE_SUBSTITUTES = {
    "python:3.11-slim": BaseRecipe(),
    "docker.io/library/python:3.11-slim": BaseRecipe(),
}


def base_config() -> ImageConfig:
    """python:3.11-slim's config, less what only describes its own CPython build."""
    return ImageConfig(env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}, cmd=["python3"])


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln" / "images"


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    d = Path("/etc/apt/sources.list.d")
    files = [*sorted(d.glob("*.sources")), Path("/etc/apt/sources.list"), *sorted(d.glob("*.list"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for para in re.split(r"\n\s*\n", text):
            fields = dict(
                (m.group(1).lower(), m.group(2).strip())
                for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", para, re.M)
            )
            suites = fields.get("suites", "").split()
            if "bookworm" in suites and "main" in fields.get("components", "").split():
                uris = fields.get("uris", "").split()
                if uris and "security" not in uris[0]:
                    return uris[0]
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s+.*\bmain\b", text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


# --------------------------------------------------------------------------------------------
# A read-only view of stacked layer directories (overlayfs semantics, without mounting)


def is_whiteout(path: Path | str, st: os.stat_result | None = None) -> bool:
    try:
        st = st or os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path | str) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


class MergedView:
    """The root filesystem that stacked layer dirs (bottom first) show, as overlayfs shows it."""

    def __init__(self, dirs: list[Path]):
        self.top_first = [Path(d) for d in reversed(dirs)]
        self._dir_layers = functools.lru_cache(maxsize=None)(self._dir_layers_uncached)

    @staticmethod
    def _rel(path: str) -> str:
        return os.path.normpath("/" + path).lstrip("/")

    def _dir_layers_uncached(self, rel: str) -> tuple[Path, ...]:
        if rel in ("", "."):
            return tuple(self.top_first)
        parent, name = os.path.split(rel)
        out: list[Path] = []
        for d in self._dir_layers(parent):
            c = d / name
            try:
                st = os.lstat(c)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break  # a whiteout or a non-directory hides everything below
            out.append(c)
            if is_opaque(c):
                break
        return tuple(out)

    def lookup(self, path: str) -> Path | None:
        """The real path of the entry visible at `path` (its topmost copy), symlinks not followed."""
        rel = self._rel(path)
        if not rel:
            return self.top_first[0] if self.top_first else None
        parent, name = os.path.split(rel)
        for d in self._dir_layers(parent):
            c = d / name
            if os.path.lexists(c):
                return None if is_whiteout(c) else c
        return None

    def is_dir(self, path: str) -> bool:
        return bool(self._dir_layers(self._rel(path)))

    def listdir(self, path: str) -> dict[str, Path]:
        """Visible entries of a directory: name -> real path of the topmost copy."""
        out: dict[str, Path] = {}
        seen: set[str] = set()
        for d in self._dir_layers(self._rel(path)):
            for name in os.listdir(d):
                if name in seen:
                    continue
                seen.add(name)
                c = d / name
                if not is_whiteout(c):
                    out[name] = c
        return dict(sorted(out.items()))

    def walk(self, path: str) -> Iterator[tuple[str, Path]]:
        """(path relative to `path`, real path) of everything below it, parents first, sorted."""
        rel = self._rel(path)
        for name, real in self.listdir(rel).items():
            yield name, real
            if stat.S_ISDIR(os.lstat(real).st_mode):
                for sub, sreal in self.walk(f"{rel}/{name}"):
                    yield f"{name}/{sub}", sreal

    def read_text(self, path: str) -> str | None:
        real = self.lookup(path)
        return real.read_text() if real is not None and real.is_file() else None

    def resolve(self, path: str) -> str:
        """`path` with symlinks resolved inside this root (as a chroot would)."""
        parts = [p for p in self._rel(path).split("/") if p]
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            real = self.lookup("/".join([*done, part]))
            if real is not None and os.path.islink(real):
                hops += 1
                if hops > 40:
                    raise BuildError(f"too many symlinks resolving {path}")
                target = os.readlink(real)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            done.append(part)
        return "/" + "/".join(done)

    def user_ids(self, user: str) -> tuple[int, int]:
        """USER/--chown value (name or id, optional :group) -> numeric uid, gid via /etc/passwd."""
        name, _, group = user.partition(":")
        passwd = [ln.split(":") for ln in (self.read_text("/etc/passwd") or "").splitlines() if ln]
        groups = [ln.split(":") for ln in (self.read_text("/etc/group") or "").splitlines() if ln]
        if name.isdigit():
            uid = int(name)
            gid = next((int(p[3]) for p in passwd if len(p) > 3 and p[2] == name), uid if not group else 0)
        else:
            entry = next((p for p in passwd if p[0] == name), None)
            if entry is None:
                raise BuildError(f"user {name!r} not found in the image's /etc/passwd")
            uid, gid = int(entry[2]), int(entry[3])
        if group:
            if group.isdigit():
                gid = int(group)
            else:
                g = next((p for p in groups if p[0] == group), None)
                if g is None:
                    raise BuildError(f"group {group!r} not found in the image's /etc/group")
                gid = int(g[2])
        return uid, gid

    def home_of(self, uid: int) -> str:
        for ln in (self.read_text("/etc/passwd") or "").splitlines():
            p = ln.split(":")
            if len(p) > 5 and p[2] == str(uid):
                return p[5]
        return "/"


# --------------------------------------------------------------------------------------------
# Deterministic layer tars


def _scan_sorted(root: Path, rel: str = "") -> Iterator[tuple[str, Path, os.stat_result]]:
    base = root / rel if rel else root
    for name in sorted(os.listdir(base)):
        path = base / name
        r = f"{rel}/{name}" if rel else name
        st = os.lstat(path)
        yield r, path, st
        if stat.S_ISDIR(st.st_mode):
            yield from _scan_sorted(root, r)


def write_layer_tar(root: Path, out: BinaryIO) -> None:
    """Write the layer held in `root` (an overlay upper dir, or a plain tree) as an OCI layer tar.

    Sorted, numeric owners only, every mtime EPOCH; a whiteout (character device 0/0) becomes an
    empty ``.wh.<name>`` file, an opaque directory gets a ``.wh..wh..opq`` entry.
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        tf.copybufsize = 1 << 20  # type: ignore[attr-defined]  # TarFile has it, typeshed does not
        for rel, path, st in _scan_sorted(root):
            if is_whiteout(path, st):
                parent, name = os.path.split(rel)
                ti = tarfile.TarInfo(os.path.join(parent, ".wh." + name))
                ti.mode = 0o644
            else:
                got = tf.gettarinfo(str(path), arcname=rel)
                if got is None:  # a socket: not in images
                    continue
                ti = got
            ti.uname = ti.gname = ""
            ti.mtime = EPOCH
            ti.pax_headers = {}
            if ti.isreg() and ti.size and not stat.S_ISCHR(st.st_mode):
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
            if ti.isdir() and is_opaque(path):
                opq = tarfile.TarInfo(rel + "/.wh..wh..opq")
                opq.mode, opq.mtime = 0o644, EPOCH
                tf.addfile(opq)


class _HashWriter(io.RawIOBase):
    def __init__(self, sink: BinaryIO | None = None):
        self.sha = hashlib.sha256()
        self.size = 0
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        if self.sink is not None:
            self.sink.write(b)
        return len(b)


def layer_digest(root: Path) -> tuple[str, int]:
    """(sha256:..., size) of the layer tar of `root`, without writing it anywhere."""
    w = _HashWriter()
    write_layer_tar(root, w)  # type: ignore[arg-type]
    return "sha256:" + w.sha.hexdigest(), w.size


# --------------------------------------------------------------------------------------------
# After each step: .pyc timestamps and mtimes to EPOCH, redundant directories out


_PYC = re.compile(r"^(?P<stem>.+?)\.[a-z]+-\d+(?:\.opt-\d)?\.pyc$")


def normalize_layer(root: Path, below: MergedView | None) -> None:
    """Make a finished step's files deterministic without invalidating byte-code.

    A timestamp-based .pyc records its source's mtime; every file's mtime becomes EPOCH here, so
    the .pyc files compiled for a source (in this layer or one below) with its current mtime and
    size get EPOCH in their header too, and stay valid, as with Docker's real mtimes.
    """
    for rel, path, st in list(_scan_sorted(root)):
        if not stat.S_ISREG(st.st_mode) or not rel.endswith(".pyc"):
            continue
        d, name = os.path.split(rel)
        m = _PYC.match(name)
        if not m or os.path.basename(d) != "__pycache__":
            continue
        src_rel = os.path.join(os.path.dirname(d), m.group("stem") + ".py")
        src = (
            root / src_rel if os.path.lexists(root / src_rel) else (below.lookup(src_rel) if below else None)
        )
        if src is None or not os.path.isfile(src):
            continue
        sst = os.stat(src)
        with open(path, "r+b") as f:
            head = f.read(16)
            if len(head) < 16:
                continue
            flags, mtime, size = (int.from_bytes(head[i : i + 4], "little") for i in (4, 8, 12))
            if (
                flags == 0
                and mtime == int(sst.st_mtime) & 0xFFFFFFFF
                and size == sst.st_size & 0xFFFFFFFF
                and mtime != EPOCH
            ):
                f.seek(8)
                f.write(EPOCH.to_bytes(4, "little"))
    entries = list(_scan_sorted(root))
    for _rel, path, _st in reversed(entries):  # children before their directory
        os.utime(path, (EPOCH, EPOCH), follow_symlinks=False)


def prune_copied_up_dirs(root: Path, below: MergedView) -> None:
    """Drop empty directories that only mirror the one below (overlay copied them up for a
    mountpoint or a file created and removed again): the merged view is unchanged without them."""
    entries = list(_scan_sorted(root))
    for rel, path, st in reversed(entries):
        if not stat.S_ISDIR(st.st_mode) or os.listdir(path) or is_opaque(path):
            continue
        lower = below.lookup(rel)
        if lower is None or not os.path.isdir(lower) or os.path.islink(lower):
            continue
        lst = os.lstat(lower)
        if (lst.st_mode, lst.st_uid, lst.st_gid) == (st.st_mode, st.st_uid, st.st_gid):
            os.rmdir(path)


# --------------------------------------------------------------------------------------------
# .dockerignore


class DockerIgnore:
    """Docker's .dockerignore: Go filepath.Match patterns with **, anchored at the context root,
    `!` exceptions, the last matching pattern wins, a match on a directory covers its contents."""

    def __init__(self, text: str = ""):
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
            self.rules.append((re.compile(self._regex(pat)), negate))

    @staticmethod
    def _regex(pat: str) -> str:
        out, i = [], 0
        while i < len(pat):
            c = pat[i]
            if pat.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
                continue
            if pat.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[":
                end = pat.find("]", i)
                if end < 0:
                    out.append(re.escape(c))
                else:
                    cls = pat[i + 1 : end].replace("\\", "\\\\")
                    out.append("[" + ("^" + cls[1:] if cls.startswith("^") else cls) + "]")
                    i = end
            else:
                out.append(re.escape(c))
            i += 1
        return "^" + "".join(out) + "$"

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for rx, negate in self.rules:
            if any(rx.match(p) for p in prefixes):
                result = not negate
        return result


# --------------------------------------------------------------------------------------------
# The real executor


def log_default(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class LayerMeta:
    key: str
    created_by: str
    diff_id: str = ""
    size: int = 0


class LocalExecutor(Executor):
    def __init__(self, context: Path, cache: Path, log: Callable[[str], None] = log_default):
        self.context = context
        self.cache = cache
        self.layers_dir = cache / "layers"
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.pip_cache = cache / "pip"
        self.pip_cache.mkdir(parents=True, exist_ok=True)
        self.log = log
        ignore = context / ".dockerignore"
        self.ignore = DockerIgnore(ignore.read_text() if ignore.exists() else "")
        self.steps = 0
        self.cached = 0

    # --- cache ---------------------------------------------------------------------------

    def _cached(self, key: str, created_by: str) -> Layer | None:
        self.steps += 1
        d = self.layers_dir / key
        if (d / "meta.json").exists() and (d / "diff").is_dir():
            self.cached += 1
            self.log("    CACHED")
            os.utime(d / "meta.json")  # last use, for `prune`
            return Layer(key, d / "diff", created_by, cached=True)
        return None

    @contextlib.contextmanager
    def _new_layer(self, key: str, created_by: str, below: MergedView) -> Iterator[Path]:
        """A fresh layer dir; committed (normalized, meta written, renamed into place) on success."""
        final = self.layers_dir / key
        tmp = self.layers_dir / f"{key}.tmp"
        if tmp.exists():
            _rmtree(tmp)
        (tmp / "diff").mkdir(parents=True)
        try:
            yield tmp
            diff = tmp / "diff"
            prune_copied_up_dirs(diff, below)
            normalize_layer(diff, below)
            for extra in ("work", "merged"):
                if (tmp / extra).exists():
                    _rmtree(tmp / extra)
            (tmp / "meta.json").write_text(json.dumps(dataclasses.asdict(LayerMeta(key, created_by))))
            if final.exists():
                _rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                _rmtree(tmp)

    # --- FROM ----------------------------------------------------------------------------

    def base(self, ref: str, lineno: int) -> tuple[str, list[Layer], ImageConfig, list[dict[str, Any]]]:
        if ref == "scratch":
            return "scratch", [], ImageConfig(), []
        recipe = BASE_SUBSTITUTES.get(ref)
        if recipe is None:
            raise BuildError(unpullable(ref, lineno))
        rootfs, key = ensure_base(recipe, self.cache, self.log)
        created_by = base_created_by(recipe)
        return (
            key,
            [Layer(key, rootfs, created_by, cached=True)],
            base_config(),
            [{"created": EPOCH_ISO, "created_by": created_by, "comment": f"stands in for {ref}"}],
        )

    # --- RUN -----------------------------------------------------------------------------

    def run(self, st: StageState, argv: list[str], created_by: str) -> Layer:
        view = MergedView(st.dirs())
        uid, gid = view.user_ids(st.config.user or "0")
        key, env, workdir = run_identity(st, argv, (uid, gid), view.home_of(uid) if uid else "/root")
        hit = self._cached(key, created_by)
        if hit:
            return hit
        # local-build-only environment (not in the image config, not in the cache key): pip's
        # shared cache instead of PIP_NO_CACHE_DIR, and the host's CA bundle for TLS
        env.pop("PIP_NO_CACHE_DIR", None)
        env["PIP_CACHE_DIR"] = PIP_CACHE_IN_CHROOT
        env["PIP_CERT"] = CA_BUNDLE
        t0 = time.monotonic()
        with self._new_layer(key, created_by, view) as tmp:
            diff, work, merged = tmp / "diff", tmp / "work", tmp / "merged"
            work.mkdir()
            merged.mkdir()
            lowers = [str(d) for d in reversed(st.dirs())]
            created = [p for p in _parents_to_create(view, PIP_CACHE_IN_CHROOT)]
            payload = {
                "merged": str(merged),
                "overlay": f"lowerdir={':'.join(lowers)},upperdir={diff},workdir={work},"
                "redirect_dir=off,index=off,metacopy=off,xino=off",
                "mkdirs": created,
                "binds": [
                    {"src": "/etc/resolv.conf", "dst": "/etc/resolv.conf", "ro": True, "if_exists": True},
                    {"src": CA_BUNDLE, "dst": CA_BUNDLE, "ro": True, "if_exists": True},
                    {"src": str(self.pip_cache), "dst": PIP_CACHE_IN_CHROOT, "ro": False},
                ],
                "argv": argv,
                "env": env,
                "uid": uid,
                "gid": gid,
                "cwd": workdir,
            }
            rc = run_in_chroot(payload)
            if rc != 0:
                raise BuildError(f"{created_by[:200]}: exit code {rc}")
            # the pip cache mountpoint directories we made are not part of the step
            for rel in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(diff / rel.lstrip("/"))
        self.log(f"    done in {time.monotonic() - t0:.1f}s")
        return Layer(key, self.layers_dir / key / "diff", created_by)

    # --- COPY ----------------------------------------------------------------------------

    def _context_sources(self, srcs: list[str]) -> list[tuple[str, Path]]:
        """(name in the context, path) of each source, wildcards expanded, .dockerignore applied."""
        out: list[tuple[str, Path]] = []
        for src in srcs:
            rel = os.path.normpath(src).lstrip("/")
            if rel.startswith(".."):
                raise BuildError(f"COPY {src}: outside the build context")
            if any(ch in rel for ch in "*?["):
                matches = sorted(
                    str(p.relative_to(self.context))
                    for p in self.context.glob(rel)
                    if not self.ignore.excluded(str(p.relative_to(self.context)))
                )
                if not matches:
                    raise BuildError(f"COPY {src}: no source files match")
                out.extend((m, self.context / m) for m in matches)
            else:
                path = self.context / rel if rel != "." else self.context
                if rel != "." and (not os.path.lexists(path) or self.ignore.excluded(rel)):
                    raise BuildError(f"COPY {src}: not found in the build context (or .dockerignore'd)")
                out.append((rel, path))
        return out

    def _context_tree(self, rel: str, path: Path) -> Iterator[tuple[str, Path]]:
        """Below a context directory: (path relative to it, real path), ignored ones left out."""
        for name in sorted(os.listdir(path)):
            r = f"{rel}/{name}" if rel not in ("", ".") else name
            if self.ignore.excluded(r):
                continue
            p = path / name
            yield name, p
            if p.is_dir() and not p.is_symlink():
                for sub, sp in self._context_tree(r, p):
                    yield f"{name}/{sub}", sp

    def copy(
        self, st: StageState, ins: Instruction, srcs: list[str], dest: str, src_stage: StageState | None
    ) -> Layer:
        view = MergedView(st.dirs())
        chown = ins.flag("chown")
        uid, gid = view.user_ids(chown) if chown else (0, 0)
        chmod = ins.flag("chmod")
        mode = int(chmod, 8) if chmod else None
        # sources: (top-level name, real path, iterator of the tree below it or None)
        sources: list[tuple[str, Path, Callable[[], Iterator[tuple[str, Path]]] | None]] = []
        if src_stage is not None:
            sview = MergedView(src_stage.dirs())
            content: Any = {"stage": src_stage.key}
            for src in srcs:
                if any(ch in src for ch in "*?["):
                    raise BuildError(f"line {ins.lineno}: wildcards in COPY --from are not supported")
                resolved = sview.resolve(src)
                real = sview.lookup(resolved)
                if real is None:
                    raise BuildError(
                        f"line {ins.lineno}: COPY --from: {src} not found in stage {src_stage.name}"
                    )
                walker: Callable[[], Iterator[tuple[str, Path]]] | None = (
                    functools.partial(sview.walk, resolved) if sview.is_dir(resolved) else None
                )
                sources.append((os.path.basename(resolved.rstrip("/")) or "/", real, walker))
        else:
            h = hashlib.sha256()
            for rel, path in self._context_sources(srcs):
                walker = (
                    functools.partial(self._context_tree, rel, path)
                    if path.is_dir() and not path.is_symlink()
                    else None
                )
                sources.append((os.path.basename(rel), path, walker))
                entries = [("", path)] + (list(walker()) if walker else [])
                for sub, p in entries:
                    h.update(_content_line(f"{rel}/{sub}", p))
            content = {"context": h.hexdigest()}
        key = _key(st.key, "COPY", srcs, dest, chown, chmod, content)
        hit = self._cached(key, ins.text)
        if hit:
            return hit
        if len(sources) > 1 and not dest.endswith("/"):
            raise BuildError(f"line {ins.lineno}: COPY with several sources needs a DEST ending in /")
        with self._new_layer(key, ins.text, view) as tmp:
            upper = tmp / "diff"
            hardlink = src_stage is not None and mode is None
            for name, real, walker in sources:
                if walker is not None:  # a directory: its contents go into DEST
                    target = dest.rstrip("/") or "/"
                    top = _ensure_dir(upper, view, target)
                    _copy_meta_dir(real, top, uid, gid, mode)
                    for sub, p in walker():
                        _put(upper, view, f"{target.rstrip('/')}/{sub}", p, uid, gid, mode, hardlink)
                else:
                    target = f"{dest.rstrip('/')}/{name}" if dest.endswith("/") or view.is_dir(dest) else dest
                    _put(upper, view, target, real, uid, gid, mode, hardlink)
        return Layer(key, self.layers_dir / key / "diff", ins.text)

    # --- WORKDIR -------------------------------------------------------------------------

    def workdir(self, st: StageState, path: str) -> Layer | None:
        view = MergedView(st.dirs())
        if view.is_dir(view.resolve(path)):
            return None
        created_by = f"WORKDIR {path}"
        self.log(f"  {created_by} (creates it)")
        key = _key(st.key, "WORKDIR", path)
        hit = self._cached(key, created_by)
        if hit:
            return hit
        with self._new_layer(key, created_by, view) as tmp:
            _ensure_dir(tmp / "diff", view, path)
        return Layer(key, self.layers_dir / key / "diff", created_by)


def _content_line(rel: str, p: Path) -> bytes:
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        what = "l:" + os.readlink(p)
    elif stat.S_ISDIR(st.st_mode):
        what = "d"
    elif stat.S_ISREG(st.st_mode):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        what = "f:" + h.hexdigest()
    else:
        what = "?"
    return f"{rel}\0{stat.S_IMODE(st.st_mode):o}\0{what}\n".encode()


def _parents_to_create(view: MergedView, path: str) -> list[str]:
    """The directories of `path` (itself included) that do not exist yet, outermost first."""
    out = []
    cur = ""
    for part in [p for p in path.split("/") if p]:
        cur = f"{cur}/{part}"
        if not view.is_dir(cur):
            out.append(cur)
    return out


def _ensure_dir(upper: Path, view: MergedView, path: str) -> Path:
    """Make `path` a directory in the upper dir, parents mirroring the layers below."""
    cur = upper
    rel = ""
    for part in [p for p in path.split("/") if p]:
        rel = f"{rel}/{part}"
        cur = cur / part
        if os.path.lexists(cur):
            if not cur.is_dir() or cur.is_symlink():
                raise BuildError(f"{rel} exists and is not a directory")
            continue
        lower = view.lookup(rel)
        if lower is not None and os.path.islink(lower):
            raise BuildError(f"{rel} is a symlink in the image: COPY/WORKDIR through it is not supported")
        if lower is not None and os.path.isdir(lower):
            lst = os.lstat(lower)
            os.mkdir(cur)
            os.chmod(cur, stat.S_IMODE(lst.st_mode))
            os.chown(cur, lst.st_uid, lst.st_gid)
        else:
            os.mkdir(cur)
            os.chmod(cur, 0o755)
    return cur


def _copy_meta_dir(src: Path, dst: Path, uid: int, gid: int, mode: int | None) -> None:
    os.chmod(dst, mode if mode is not None else stat.S_IMODE(os.stat(src).st_mode))
    os.chown(dst, uid, gid)


def _put(
    upper: Path,
    view: MergedView,
    target: str,
    src: Path,
    uid: int,
    gid: int,
    mode: int | None,
    hardlink: bool,
) -> None:
    parent, name = os.path.split(target.rstrip("/"))
    pdir = _ensure_dir(upper, view, parent)
    dst = pdir / name
    st = os.lstat(src)
    if os.path.lexists(dst) and not (stat.S_ISDIR(st.st_mode) and dst.is_dir() and not dst.is_symlink()):
        if dst.is_dir() and not dst.is_symlink():
            _rmtree(dst)
        else:
            dst.unlink()
    if stat.S_ISDIR(st.st_mode):
        if not dst.exists():
            os.mkdir(dst)
        os.chmod(dst, mode if mode is not None else stat.S_IMODE(st.st_mode))
        os.chown(dst, uid, gid)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        os.lchown(dst, uid, gid)
    elif stat.S_ISREG(st.st_mode):
        if hardlink and (st.st_uid, st.st_gid) == (uid, gid):
            os.link(src, dst)  # same content, mode and owner: the layer shares the inode
        else:
            shutil.copyfile(src, dst)
            os.chmod(dst, mode if mode is not None else stat.S_IMODE(st.st_mode))
            os.chown(dst, uid, gid)
    # devices, fifos and sockets are not copied (Docker's COPY does not either)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or not path.exists():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    # overlayfs' work dir holds a mode-000 directory; root can remove it, chmod first anyway
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o700)
    shutil.rmtree(path)


# --------------------------------------------------------------------------------------------
# chroot with mounts, in a private mount + PID namespace


_CHROOT_HELPER = """
import json, os, subprocess, sys
p = json.loads(sys.argv[1])
m = p["merged"]
def mount(*args):
    subprocess.run(["mount", *args], check=True)
mount("-t", "overlay", "overlay", "-o", p["overlay"], m)
for d in p["mkdirs"]:
    os.mkdir(m + d, 0o755)
mount("-t", "proc", "proc", m + "/proc")
mount("--rbind", "/sys", m + "/sys")
mount("--rbind", "/dev", m + "/dev")
for b in p["binds"]:
    dst = m + b["dst"]
    if b.get("if_exists") and not (os.path.exists(b["src"]) and os.path.isfile(dst)):
        continue
    mount("--bind", b["src"], dst)
    if b["ro"]:
        mount("-o", "remount,bind,ro", dst)
os.chroot(m)
os.chdir("/")
cwd = p["cwd"]
if not os.path.isdir(cwd):
    os.makedirs(cwd, exist_ok=True)
sys.stdout.flush()
proc = subprocess.run(p["argv"], env=p["env"], cwd=cwd, stdin=subprocess.DEVNULL,
                      user=p["uid"], group=p["gid"], extra_groups=[])
sys.exit(proc.returncode)
"""


def run_in_chroot(payload: dict[str, Any]) -> int:
    """Mount, chroot and run; every mount and process dies with the namespaces, whatever happens."""
    if os.geteuid() != 0:
        raise BuildError("RUN needs root (overlay mounts, chroot)")
    cmd = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--",
        sys.executable,
        "-I",
        "-c",
        _CHROOT_HELPER,
        json.dumps(payload),
    ]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: the whole namespace goes
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _umount_below(Path(payload["merged"]))


def _umount_below(path: Path) -> None:
    """Belt and braces: nothing should be mounted there (the namespace was private)."""
    prefix = str(path.resolve())
    mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()]
    for mp in sorted((m for m in mounts if m == prefix or m.startswith(prefix + "/")), reverse=True):
        subprocess.run(["umount", "-l", mp], check=False)


# --------------------------------------------------------------------------------------------
# The base root filesystem


def base_created_by(recipe: BaseRecipe) -> str:
    return (
        f"debootstrap --variant={recipe.variant} --include={','.join(recipe.packages)} {recipe.suite} "
        "(Debian's python3 3.11 stands in for python:3.11-slim's)"
    )


def ensure_base(
    recipe: BaseRecipe, cache: Path, log: Callable[[str], None] = log_default
) -> tuple[Path, str]:
    """The base root filesystem for `recipe` (built once, cached by the recipe's key)."""
    key = "base-" + _key(dataclasses.asdict(recipe))
    d = cache / "base" / key
    if (d / "meta.json").exists():
        return d / "rootfs", key
    _ensure_debootstrap(log)
    tmp = cache / "base" / f"{key}.tmp"
    if tmp.exists():
        _rmtree(tmp)
    rootfs = tmp / "rootfs"
    rootfs.mkdir(parents=True)
    mirror = debian_mirror()
    log(f"base: {base_created_by(recipe)} from {mirror} (once; cached in {d})")
    t0 = time.monotonic()
    try:
        cmd = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "debootstrap",
            f"--variant={recipe.variant}",
            f"--include={','.join(recipe.packages)}",
            recipe.suite,
            str(rootfs),
            mirror,
        ]
        proc = subprocess.run(cmd, text=True, capture_output=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise BuildError(f"debootstrap failed ({proc.returncode}):\n{tail}")
        _finish_base(rootfs)
        normalize_layer(rootfs, None)
        digest, size = layer_digest(rootfs)
        (tmp / "meta.json").write_text(
            json.dumps({"key": key, "recipe": dataclasses.asdict(recipe), "diff_id": digest, "size": size})
        )
        if d.exists():
            _rmtree(d)
        tmp.rename(d)
    finally:
        if tmp.exists():
            _umount_below(tmp)
            _rmtree(tmp)
    log(f"base: {_fmt_size(size)} in {time.monotonic() - t0:.0f}s")
    return d / "rootfs", key


def _ensure_debootstrap(log: Callable[[str], None]) -> None:
    """Install Debian's debootstrap when missing (as hack/cluster installs its node packages)."""
    if shutil.which("debootstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BuildError("debootstrap not found (apt-get install debootstrap)")
    log("installing debootstrap with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "debootstrap"]):
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def _finish_base(rootfs: Path) -> None:
    """What makes a debootstrap tree look like python:3.11-slim to a Dockerfile."""
    local_bin = rootfs / "usr/local/bin"
    local_bin.mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("python", "/usr/bin/python3"),
        ("python3", "/usr/bin/python3"),
        ("pip", "/usr/bin/pip3"),
        ("pip3", "/usr/bin/pip3"),
    ):
        link = local_bin / name
        if not os.path.lexists(link):
            link.symlink_to(target)
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()  # the official image lets pip install into the system Python
    # what a container runtime provides, and what only the bootstrap left behind
    for pattern in (
        "dev/*",
        "proc/*",
        "sys/*",
        "run/*",
        "tmp/*",
        "var/tmp/*",
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "var/log/*.log",
        "var/log/apt/*",
        "var/cache/debconf/*-old",
        "var/cache/ldconfig/aux-cache",  # inode numbers and ctimes: the one non-reproducible file
        "var/lib/dpkg/*-old",
        "debootstrap",
        "usr/share/man/*",
        "usr/share/info/*",
    ):
        for p in rootfs.glob(pattern):
            if p.name in ("partial", "lock", "auxfiles"):
                continue
            _rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    doc = rootfs / "usr/share/doc"
    if doc.is_dir():  # as debian:bookworm-slim: documentation out, copyright notices kept
        for p in doc.rglob("*"):
            if p.is_file() and p.name != "copyright":
                p.unlink()
    (rootfs / "etc/resolv.conf").write_text("")
    (rootfs / "etc/hostname").write_text("")
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    if (rootfs / "etc/machine-id").exists():
        (rootfs / "etc/machine-id").write_text("")


# --------------------------------------------------------------------------------------------
# Images: OCI config, manifest, archive, import


@dataclass
class LayerInfo:
    diff_id: str
    size: int
    created_by: str
    path: Path


@dataclass
class ImageInfo:
    name: str  # operator | trainer | server
    ref: str  # docker.io/library/kiln-<name>:<tag>
    short_ref: str  # kiln-<name>:<tag>, as written in a pod spec
    manifest_digest: str
    config_digest: str
    config: dict[str, Any]  # the OCI image config
    layers: list[LayerInfo]
    size: int  # bytes, the layers' uncompressed tars
    build_seconds: float
    steps: int = 0
    cached_steps: int = 0
    import_seconds: float | None = None  # None: not imported
    import_skipped: bool = False  # containerd already had this manifest digest
    manifest: bytes = b""
    config_blob: bytes = b""

    def view(self) -> MergedView:
        """The image's root filesystem (read-only, no mount)."""
        return MergedView([layer.path for layer in self.layers])


def _meta_digest(layer: Layer, cache: Path) -> tuple[str, int]:
    """The layer's diff_id and size, computed once and kept in its meta.json."""
    assert layer.path is not None
    meta_path = layer.path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    if not meta.get("diff_id"):
        meta["diff_id"], meta["size"] = layer_digest(layer.path)
        meta_path.write_text(json.dumps(meta))
    return meta["diff_id"], meta["size"]


def _image_blobs(final: StageState, cache: Path) -> tuple[list[LayerInfo], dict[str, Any], bytes, bytes]:
    layers = []
    for layer in final.layers:
        diff_id, size = _meta_digest(layer, cache)
        assert layer.path is not None
        layers.append(LayerInfo(diff_id, size, layer.created_by, layer.path))
    config = {
        "created": EPOCH_ISO,
        "architecture": "amd64",
        "os": "linux",
        "config": final.config.oci(),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": final.history,
    }
    config_blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + hashlib.sha256(config_blob).hexdigest(),
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer.diff_id,
                "size": layer.size,
            }
            for layer in layers
        ],
    }
    manifest_blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return layers, config, config_blob, manifest_blob


def write_oci_archive(out: BinaryIO, info: ImageInfo) -> None:
    """Stream an OCI image layout tar (what `ctr images import` reads), layers generated on the fly
    and checked against their recorded digests."""

    def header(name: str, size: int, typ: bytes = tarfile.REGTYPE) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.type = size, EPOCH, typ
        ti.mode = 0o755 if typ == tarfile.DIRTYPE else 0o644
        out.write(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))

    def pad(size: int) -> None:
        if size % 512:
            out.write(b"\0" * (512 - size % 512))

    def blob(name: str, data: bytes) -> None:
        header(name, len(data))
        out.write(data)
        pad(len(data))

    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": info.manifest_digest,
                "size": len(info.manifest),
                "annotations": {
                    "io.containerd.image.name": info.ref,
                    "org.opencontainers.image.ref.name": info.ref.rsplit(":", 1)[1],
                },
            }
        ],
    }
    blob("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    header("blobs/", 0, tarfile.DIRTYPE)
    header("blobs/sha256/", 0, tarfile.DIRTYPE)
    blob("blobs/sha256/" + info.config_digest.split(":")[1], info.config_blob)
    blob("blobs/sha256/" + info.manifest_digest.split(":")[1], info.manifest)
    done: set[str] = set()
    for layer in info.layers:
        if layer.diff_id in done:
            continue
        done.add(layer.diff_id)
        header("blobs/sha256/" + layer.diff_id.split(":")[1], layer.size)
        w = _HashWriter(out)
        write_layer_tar(layer.path, w)  # type: ignore[arg-type]
        got = "sha256:" + w.sha.hexdigest()
        if (got, w.size) != (layer.diff_id, layer.size):
            raise BuildError(
                f"layer {layer.path} changed since its digest was recorded ({got}, {w.size} bytes "
                f"vs {layer.diff_id}, {layer.size}); delete {layer.path.parent} and rebuild"
            )
        pad(w.size)
    blob("index.json", json.dumps(index, sort_keys=True).encode())
    out.write(b"\0" * 1024)


def _cluster_env() -> dict[str, Any]:
    proc = subprocess.run([str(HACK_CLUSTER), "env", "--json"], text=True, capture_output=True)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}


def containerd_socket() -> Path | None:
    """The real node's containerd socket (as hack/cluster lays out its state dir), if it runs."""
    env = _cluster_env()
    if not env.get("real_node"):
        return None
    sock = Path(env["state_dir"]) / "containerd" / "containerd.sock"
    return sock if sock.exists() else None


def containerd_digest(ref: str, sock: Path | None = None) -> str | None:
    """The manifest digest containerd (namespace k8s.io) has for `ref`, or None."""
    sock = sock or containerd_socket()
    if sock is None or not shutil.which("ctr"):
        return None
    proc = subprocess.run(
        ["ctr", f"--address={sock}", "--namespace=k8s.io", "images", "ls", f"name=={ref}"],
        text=True,
        capture_output=True,
    )
    for line in proc.stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[0] == ref:
            return cols[2]
    return None


def import_image(
    info: ImageInfo, log: Callable[[str], None] = log_default, *, discard_layers: bool = True
) -> None:
    """Load the image into the real node's containerd via `hack/cluster image-import`, unless it
    already has this manifest digest."""
    sock = containerd_socket()
    if sock is None:
        raise BuildError("no real node running (hack/cluster up --real-node): cannot import")
    t0 = time.monotonic()
    if containerd_digest(info.ref, sock) == info.manifest_digest:
        info.import_skipped = True
        info.import_seconds = time.monotonic() - t0
        log(f"{info.short_ref}: containerd already has {info.manifest_digest[:19]}: import skipped")
        return
    proc = subprocess.Popen(
        [str(HACK_CLUSTER), "image-import", "/dev/stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            with proc.stdin:
                write_oci_archive(proc.stdin, info)  # type: ignore[arg-type]
        except BrokenPipeError:
            pass
        output = proc.stdout.read().decode(errors="replace")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise BuildError(f"import of {info.ref} failed ({rc}): {output.strip()}")
    got = containerd_digest(info.ref, sock)
    if got != info.manifest_digest:
        raise BuildError(
            f"after the import containerd has {info.ref} at {got}, expected {info.manifest_digest}"
        )
    if discard_layers:
        discard_layer_blobs(info, sock)
    info.import_seconds = time.monotonic() - t0
    log(f"{info.short_ref}: imported as {info.ref} in {info.import_seconds:.1f}s")


def discard_layer_blobs(info: ImageInfo, sock: Path) -> None:
    """Drop the layer blobs from containerd's content store once they are
    unpacked into snapshots, as the CRI plugin's ``discard_unpacked_layers`` does for pulled
    images: pods run from the snapshots; only the manifest and config stay. Halves the disk an
    import takes (6 GB per torch image here); a re-import streams every blob again anyway."""
    digests = sorted({layer.diff_id for layer in info.layers})
    subprocess.run(
        ["ctr", f"--address={sock}", "--namespace=k8s.io", "content", "rm", *digests],
        capture_output=True,
        check=False,
    )


# --------------------------------------------------------------------------------------------
# build()


@contextlib.contextmanager
def _lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_one(
    name: str,
    *,
    tag: str = "dev",
    build_args: dict[str, str] | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] = log_default,
) -> ImageInfo:
    if name not in IMAGES:
        raise BuildError(f"unknown image {name!r} (one of {', '.join(IMAGES)})")
    spec = IMAGES[name]
    cache = cache or cache_dir()
    args = dict(spec.build_args)
    args.update(build_args or {})
    if spec.note and build_args is None:
        log(f"kiln-{name}: local build arg {spec.note}")
    t0 = time.monotonic()
    path = REPO / spec.dockerfile
    df = parse_dockerfile(path.read_text(), spec.dockerfile)
    ex = LocalExecutor(REPO, cache, log)
    stages = evaluate(df, args, ex, log=log)
    final = stages[-1]
    layers, config, config_blob, manifest = _image_blobs(final, cache)
    info = ImageInfo(
        name=name,
        ref=f"docker.io/library/kiln-{name}:{tag}",
        short_ref=f"kiln-{name}:{tag}",
        manifest_digest="sha256:" + hashlib.sha256(manifest).hexdigest(),
        config_digest="sha256:" + hashlib.sha256(config_blob).hexdigest(),
        config=config,
        layers=layers,
        size=sum(layer.size for layer in layers),
        build_seconds=time.monotonic() - t0,
        steps=ex.steps,
        cached_steps=ex.cached,
        manifest=manifest,
        config_blob=config_blob,
    )
    refs = cache / "refs"
    refs.mkdir(exist_ok=True)
    (refs / f"kiln-{name}_{tag}.json").write_text(
        json.dumps(
            {
                "ref": info.ref,
                "manifest_digest": info.manifest_digest,
                "size": info.size,
                "layers": [str(layer.path.parent.name) for layer in layers],
                # every stage's layers (the build stages' too: prune keeps the torch layer)
                "stage_layers": sorted({lay.key for st in stages for lay in st.layers}),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=1,
        )
    )
    log(
        f"{info.short_ref}: built in {info.build_seconds:.1f}s ({info.cached_steps}/{info.steps} steps "
        f"cached), {len(layers)} layers, {_fmt_size(info.size)}, {info.manifest_digest[:19]}"
    )
    return info


def build(
    names: list[str] | None = None,
    *,
    tag: str = "dev",
    import_: bool = True,
    build_args: dict[str, str] | None = None,
    log: Callable[[str], None] = log_default,
) -> dict[str, ImageInfo]:
    """Build (cached) the named images (default: all three) and, with import_, load them into the
    real node's containerd. Returns name -> ImageInfo."""
    names = list(names or IMAGES)
    cache = cache_dir()
    out: dict[str, ImageInfo] = {}
    with _lock(cache):
        for name in names:
            info = build_one(name, tag=tag, build_args=build_args, cache=cache, log=log)
            if import_:
                import_image(info, log)
            out[name] = info
    return out


def _fmt_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def prune(log: Callable[[str], None] = log_default) -> int:
    """Delete cached layers that no image's latest build (refs/*.json) uses; returns bytes freed
    on the filesystem (COPY --from layers share their files' inodes with the build stages')."""
    cache = cache_dir()
    with _lock(cache):
        before = shutil.disk_usage(cache).free
        keep: set[str] = set()
        for ref in (cache / "refs").glob("*.json"):
            data = json.loads(ref.read_text())
            keep.update(data.get("layers", []))
            keep.update(data.get("stage_layers", []))
        removed = 0
        for d in sorted((cache / "layers").glob("*")):
            if d.name not in keep:
                _rmtree(d)
                removed += 1
        freed = max(0, shutil.disk_usage(cache).free - before)
    log(f"removed {removed} cached layer(s), freed {_fmt_size(freed)}")
    return freed


# --------------------------------------------------------------------------------------------
# CLI (hack/images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/images",
        description="Build Kiln's container images without Docker, from images/*/Dockerfile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See hack/kilndev/images.py for what is built how.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("build", help="build (cached) and optionally import into the real node")
    sp.add_argument("names", nargs="*", metavar="NAME", help=f"{' | '.join(IMAGES)} (default: all three)")
    sp.add_argument(
        "--import", dest="import_", action="store_true", help="load into the real node's containerd"
    )
    sp.add_argument("--tag", default="dev")
    sp.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    sub.add_parser("ls", help="the images last built, and whether containerd has them")
    sub.add_parser("prune", help="delete cached layers no image's latest build uses")
    sub.add_parser("plan", help="print each Dockerfile's final config (nothing built)")
    args = parser.parse_args(argv)

    def on_term(signum, frame):  # finally blocks unmount and clean up, as on Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        if args.command == "build":
            return _cmd_build(args)
        if args.command == "ls":
            return _cmd_ls()
        if args.command == "prune":
            prune()
            return 0
        for name in IMAGES:
            print(f"kiln-{name}: {json.dumps(plan(name)[-1].config.oci(), indent=1)}")
        return 0
    except BuildError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _cmd_build(args) -> int:
    build_args = None
    if args.build_arg:
        build_args = dict(a.partition("=")[::2] for a in args.build_arg)
    names = args.names or list(IMAGES)
    unknown = [n for n in names if n not in IMAGES]
    if unknown:
        raise BuildError(f"unknown image(s) {', '.join(unknown)}: one of {', '.join(IMAGES)}")
    t0 = time.monotonic()
    infos = build(names, tag=args.tag, import_=args.import_, build_args=build_args)
    print(f"\n{'image':<22} {'build':>8} {'cached':>7} {'layers':>6} {'size':>9} {'import':>9}  digest")
    for info in infos.values():
        imp = "-"
        if info.import_seconds is not None:
            imp = "skipped" if info.import_skipped else f"{info.import_seconds:.1f}s"
        print(
            f"{info.short_ref:<22} {info.build_seconds:>7.1f}s {info.cached_steps:>3}/{info.steps:<3} "
            f"{len(info.layers):>6} {_fmt_size(info.size):>9} {imp:>9}  {info.manifest_digest[:19]}"
        )
    print(f"total {time.monotonic() - t0:.1f}s; cache {cache_dir()}")
    return 0


def _cmd_ls() -> int:
    sock = containerd_socket()
    for ref in sorted((cache_dir() / "refs").glob("*.json")):
        data = json.loads(ref.read_text())
        have = containerd_digest(data["ref"], sock) if sock else None
        state = (
            "imported"
            if have == data["manifest_digest"]
            else ("stale in containerd" if have else "not imported")
        )
        print(
            f"{data['ref']:<45} {data['manifest_digest'][:19]} {_fmt_size(data['size']):>9} {data['built']}  {state}"
        )
    return 0
