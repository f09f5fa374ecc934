"""Per-epoch checkpoints: safetensors for tensors, JSON for everything else (never pickle).

Layout (default root ``<output>/<model>/.checkpoints/<job>/``; a sibling of the artifact
directory, because the artifact directory itself appears atomically, by rename, at the end)::

    <root>/epoch-000007/
        model.safetensors       state_dict of the un-wrapped module (names as in the artifact)
        optimizer.safetensors   optimizer tensor state, keys ``state.<param index>.<name>``
        state.json              epoch, configuration fingerprint, optimizer param_groups and
                                scalar state, GradScaler state, epoch history

A checkpoint directory is written under a temporary name and renamed into place, so a directory
named ``epoch-NNNNNN`` is always complete; a crash mid-write leaves only a ``.tmp-*`` directory,
which the next save removes. Only the newest ``keep`` checkpoints are kept.

With an ``s3://`` output the same layout exists twice: the checkpoint is written locally (under
the staging directory) as above, then uploaded by :class:`CheckpointMirror` to
``<s3 root>/<model>/.checkpoints/<job>/epoch-NNNNNN/`` with ``state.json`` last: an object store
has no rename, so there a checkpoint is complete when its ``state.json`` exists. The bucket is
pruned like the directory (newest ``keep`` kept). After a gang restart (new pods, empty disks)
rank 0 downloads the newest complete checkpoint of the bucket and resumes from it.

RNG state is deliberately not stored: every epoch reseeds all generators from
``(seed, epoch, rank)`` (see ``loop.epoch_seed``) and the sampler shuffles with ``seed + epoch``,
so the random streams of a resumed epoch are the same as in an uninterrupted run, on every rank
(a stored generator state would only cover the rank that wrote it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kiln import storage
from kiln.trainer.output import fsync_path

CHECKPOINT_FORMAT_VERSION = 1
_EPOCH_DIR_RE = re.compile(r"^epoch-(\d{6,})$")
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"

log = logging.getLogger("kiln.trainer")


class CheckpointError(Exception):
    """A checkpoint is unreadable or does not fit the model/optimizer being trained."""


@dataclass
class Checkpoint:
    """A loaded checkpoint (tensors on CPU)."""

    epoch: int
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scaler_state: dict[str, Any] | None
    history: list[dict[str, Any]]
    fingerprint: str


def epoch_dir_name(epoch: int) -> str:
    """Directory name of the checkpoint taken after (1-based) ``epoch``."""
    return f"epoch-{epoch:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(epoch, path)``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _EPOCH_DIR_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able rest.

    Raises:
        CheckpointError: a non-tensor value is not JSON-serialisable.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{int(idx)}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(int(idx)), {})[name] = value
    rest = {"param_groups": state_dict["param_groups"], "scalar_state": scalars}
    try:
        json.dumps(rest)
    except TypeError as e:
        raise CheckpointError(f"optimizer state is not JSON-serialisable: {e}") from e
    return tensors, rest


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``split_optimizer_state``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in rest.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    root: Path,
    *,
    epoch: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scaler_state: dict[str, Any] | None,
    history: list[dict[str, Any]],
    fingerprint: str,
    keep: int = 2,
    mirror: CheckpointMirror | None = None,
) -> Path:
    """Atomically write the checkpoint of (1-based) ``epoch`` and prune older ones.

    With a ``mirror`` the checkpoint is then uploaded (and the remote copies pruned) before this
    returns, so a crash after it never loses the epoch.

    Returns:
        The checkpoint directory.
    Raises:
        CheckpointError: the optimizer state cannot be stored without pickle.
        OSError: the directory cannot be written.
        kiln.storage.StorageError: the upload failed.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / epoch_dir_name(epoch)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    opt_tensors, opt_rest = split_optimizer_state(optimizer_state)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
    state = {
        "formatVersion": CHECKPOINT_FORMAT_VERSION,
        "epoch": epoch,
        "fingerprint": fingerprint,
        "optimizer": opt_rest,
        "scaler": scaler_state,
        "history": history,
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    for f in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        fsync_path(tmp / f)
    fsync_path(tmp)
    if final.exists():  # the same epoch again (e.g. a resumed run re-taking it): replace
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    for _, old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    if mirror is not None:
        mirror.upload(final, keep)
    return final


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """Read ``state.json`` of a checkpoint directory.

    Raises:
        CheckpointError: missing, unreadable or of an unknown format version.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {STATE_FILE}: {e}") from e
    if not isinstance(state, dict) or state.get("formatVersion") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: unknown format version")
    return state


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint directory to CPU.

    Raises:
        CheckpointError: a file is missing or unreadable.
    """
    state = read_checkpoint_state(path)
    try:
        model_state = load_file(str(path / MODEL_FILE), device="cpu")
        opt_tensors = load_file(str(path / OPTIMIZER_FILE), device="cpu")
    except Exception as e:  # OSError, or safetensors' own SafetensorError
        raise CheckpointError(f"checkpoint {path}: cannot read tensors: {e}") from e
    return Checkpoint(
        epoch=int(state["epoch"]),
        path=path,
        model_state=model_state,
        optimizer_state=join_optimizer_state(opt_tensors, state["optimizer"]),
        scaler_state=state.get("scaler"),
        history=list(state.get("history", [])),
        fingerprint=str(state.get("fingerprint", "")),
    )


def _check_tensor_files(path: Path) -> None:
    """Open both safetensors files (header and size checks only, no tensor data read).

    Raises:
        CheckpointError: a file is missing, truncated or not safetensors.
    """
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        try:
            with safe_open(str(path / name), framework="pt") as f:
                f.keys()
        except Exception as e:  # OSError, or safetensors' own SafetensorError
            raise CheckpointError(f"checkpoint {path}: {name} is unreadable: {e}") from e


_Usability = Literal["ok", "unreadable", "damaged", "other-config"]


def _usability(path: Path, fingerprint: str) -> _Usability:
    """Whether the checkpoint directory ``path`` can resume the configuration ``fingerprint``
    (warns about every reason it cannot)."""
    try:
        state = read_checkpoint_state(path)
    except CheckpointError as e:
        log.warning("skipping unreadable checkpoint: %s", e)
        return "unreadable"
    if state.get("fingerprint") != fingerprint:
        log.warning(
            "removing checkpoint %s: it was written for a different configuration "
            "(hyperparameters or dataset changed)",
            path,
        )
        return "other-config"
    try:
        _check_tensor_files(path)
    except CheckpointError as e:  # e.g. torn by a node crash: fall back to an older one
        log.warning("skipping damaged checkpoint: %s", e)
        return "damaged"
    return "ok"


def find_resumable(
    root: Path, fingerprint: str, mirror: CheckpointMirror | None = None
) -> tuple[int, Path] | None:
    """The newest complete checkpoint written for this configuration, if any.

    Checkpoints with a different fingerprint (another configuration reusing the job name) are
    removed with a warning so they cannot be picked up later; unreadable or damaged ones (e.g. a
    truncated file after a node crash) are skipped, so the run falls back to an older one.

    With a ``mirror``, complete checkpoints in the bucket newer than the best local one are
    downloaded into ``root`` (newest first) and checked the same way; one of another
    configuration is removed from the bucket too.

    Raises:
        kiln.storage.StorageError: the bucket cannot be listed or read.
    """
    best: tuple[int, Path] | None = None
    for epoch, path in list_checkpoints(root):
        verdict = _usability(path, fingerprint)
        if verdict == "other-config":
            shutil.rmtree(path, ignore_errors=True)
        if verdict == "ok":
            best = (epoch, path)
            break
    if mirror is None:
        return best
    for epoch, remote in mirror.list_complete():
        if best is not None and epoch <= best[0]:
            break
        path = mirror.download(remote, root)
        verdict = _usability(path, fingerprint)
        if verdict == "ok":
            log.info("downloaded checkpoint %s to %s", remote, path)
            return epoch, path
        shutil.rmtree(path, ignore_errors=True)
        if verdict == "other-config":
            mirror.delete(remote)
    return best


class CheckpointMirror:
    """The bucket copy of one run's checkpoint directory: ``remote`` is
    ``<s3 root>/<model>/.checkpoints/<job>`` (any ``kiln.storage`` location works).

    Every method raises ``kiln.storage.StorageError`` when the store fails.
    """

    def __init__(self, remote: storage.Location) -> None:
        self.remote = remote

    def _scan(self) -> tuple[list[tuple[int, storage.Location]], list[storage.Location]]:
        """``(complete newest first, incomplete)`` checkpoints below ``remote``."""
        files: dict[str, set[str]] = {}
        for rel in storage.list_files(self.remote):
            head, _, rest = rel.partition("/")
            if rest:
                files.setdefault(head, set()).add(rest)
        complete, incomplete = [], []
        for name, names in files.items():
            m = _EPOCH_DIR_RE.match(name)
            if m is None:
                continue
            if STATE_FILE in names:
                complete.append((int(m.group(1)), self.remote.join(name)))
            else:
                incomplete.append(self.remote.join(name))
        return sorted(complete, key=lambda c: c[0], reverse=True), incomplete

    def list_complete(self) -> list[tuple[int, storage.Location]]:
        """Complete checkpoints in the bucket (``state.json`` present) as ``(epoch, location)``,
        newest first."""
        return self._scan()[0]

    def upload(self, path: Path, keep: int) -> None:
        """Upload the local checkpoint directory ``path`` (``state.json`` last), then delete all
        but the newest ``keep`` complete checkpoints and any incomplete one (a torn upload)."""
        dest = self.remote.join(path.name)
        # An earlier copy of the same epoch loses its completeness marker before it is replaced.
        storage.delete_file(dest.join(STATE_FILE))
        storage.upload_dir(path, dest, last=[STATE_FILE])
        complete, incomplete = self._scan()
        for _, old in complete[keep:]:
            self.delete(old)
        for torn in incomplete:
            storage.delete_tree(torn)

    def download(self, remote: storage.Location, root: Path) -> Path:
        """Copy the checkpoint at ``remote`` to ``root/<its name>`` (assembled under a temporary
        name, then renamed; an existing directory of that name is replaced)."""
        root.mkdir(parents=True, exist_ok=True)
        final = root / remote.name
        tmp = root / f".tmp-{remote.name}-{uuid.uuid4().hex[:8]}"
        try:
            storage.download_dir(remote, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def delete(self, remote: storage.Location) -> None:
        """Delete one checkpoint: its ``state.json`` first, so it is never seen complete but torn."""
        storage.delete_file(remote.join(STATE_FILE))
        storage.delete_tree(remote)

    def delete_all(self) -> int:
        """Delete every object below ``remote`` (after success); returns how many."""
        return storage.delete_tree(self.remote)
