"""Rank 0's outputs: the versioned artifact directory and the termination message.

Shared by ``kiln-train`` and ``kiln.sdk`` (users' own training scripts); only
:func:`write_artifact` (the MLP's safetensors) needs torch, and imports it when called.

Artifact directory: ``<output root>/<model name>/<run>/`` where ``<run>`` is the TrainingJob name
(or a UTC timestamp ``YYYYmmddTHHMMSSZ`` when there is none). It is assembled in a sibling
temporary directory ``.tmp-<run>-<random>`` and renamed into place, so readers never see a
partial artifact. Artifacts are immutable: an existing directory is never overwritten.

With an ``s3://`` output root the artifact is assembled the same way under the staging directory,
then uploaded by :func:`publish_artifact` to ``<s3 root>/<model name>/<run>/`` with
``metadata.json`` last: object stores have no rename, so an artifact prefix is complete when its
``metadata.json`` exists, and one that has it is never overwritten.

Termination log: on success the ``TrainingResult`` JSON (``kiln.artifact.format_termination_message``);
on failure one line starting with ``FAILURE_PREFIX`` (``kiln-train: ``), which is not JSON, so the
operator's ``parse_termination_message`` rejects it and the text lands in ``lastFailure.message``.
Where it is written:

- the default ``/dev/termination-log`` only if the file already exists and is writable (the
  kubelet creates it in every container; outside Kubernetes nothing is created under ``/dev``);
- an explicit path (``KILN_TERMINATION_LOG`` / ``--termination-log``) if the file is writable, or
  does not exist and its parent directory is writable.

A failure line is written only if the file is still empty, so the first failure on a node wins
over the follow-on errors of its peers (e.g. "connection reset" after a peer crashed).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import storage
from kiln.artifact import (
    CONFIG_FILE,
    MAX_TERMINATION_MESSAGE_BYTES,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactMetadata,
    ModelConfig,
    sha256_file,
)

if TYPE_CHECKING:  # torch and safetensors only for write_artifact: kiln.sdk uses the rest without them
    import torch

log = logging.getLogger("kiln.trainer")
FAILURE_PREFIX = "kiln-train: "


def run_timestamp(now: datetime | None = None) -> str:
    """Run directory name used when there is no TrainingJob name, e.g. ``20250102T030405Z``."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def artifact_dir(output_root: Path, model_name: str, run: str) -> Path:
    """``<output_root>/<model_name>/<run>`` (absolute)."""
    return (output_root / model_name / run).absolute()


def default_checkpoint_root(output_root: Path, model_name: str, run: str) -> Path:
    """``<output_root>/<model_name>/.checkpoints/<run>``: outside the artifact directory."""
    return (output_root / model_name / ".checkpoints" / run).absolute()


def fsync_path(path: Path) -> None:
    """Flush a file's or directory's data to disk (for atomic write-then-rename).

    Best effort: a path that cannot be opened or a filesystem without fsync is ignored.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_artifact(
    final_dir: Path,
    state_dict: dict[str, torch.Tensor],
    config: ModelConfig,
    metadata: ArtifactMetadata,
    *,
    weights_metadata: Mapping[str, str] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> ArtifactMetadata:
    """Write weights, config and metadata atomically into ``final_dir``.

    ``metadata.weightsDigest`` is replaced by the digest of the weights actually written.

    Args:
        state_dict: the un-wrapped module's ``state_dict()`` (any device).
        weights_metadata: string entries for the safetensors header's ``__metadata__``, inside
            the weights file and so covered by the digest (e.g. the FAULT INJECTION rate, see
            ``kiln.artifact``); None writes no ``__metadata__``.
        extra_files: more files of the artifact, relative path -> bytes (e.g. the reference
            profile ``profile.json``), listed with their digests in ``metadata.files`` so
            ``check_artifact`` verifies them.
    Returns:
        The metadata as written.
    Raises:
        FileExistsError: ``final_dir`` already exists (artifacts are immutable).
        OSError: the output cannot be written.
    """
    from safetensors.torch import save_file

    if final_dir.exists():
        raise FileExistsError(f"artifact directory {final_dir} already exists")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(
            tensors, str(tmp / WEIGHTS_FILE), metadata=dict(weights_metadata) if weights_metadata else None
        )
        extra = dict(extra_files or {})
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        files = {**metadata.files, **{name: sha256_file(tmp / name) for name in extra}}
        written = metadata.model_copy(
            update={"weightsDigest": sha256_file(tmp / WEIGHTS_FILE), "files": files}
        )
        (tmp / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        (tmp / METADATA_FILE).write_text(written.model_dump_json(indent=2) + "\n")
        for f in (WEIGHTS_FILE, CONFIG_FILE, *extra, METADATA_FILE):
            fsync_path(tmp / f)
        fsync_path(tmp)
        os.rename(tmp, final_dir)  # fails if final_dir appeared meanwhile: never overwrite
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final_dir.parent)
    return written


def publish_artifact(local_dir: Path, remote: storage.Location) -> None:
    """Upload the artifact directory ``local_dir`` to ``remote`` (``metadata.json`` last), then
    remove the local copy.

    Objects left under ``remote`` by an earlier, interrupted upload (no ``metadata.json``) are
    overwritten; a complete artifact there is not.

    Raises:
        FileExistsError: ``remote`` already holds a complete artifact (artifacts are immutable).
        kiln.storage.StorageError: the upload failed (the message names bucket and key).
    """
    if storage.exists(remote.join(METADATA_FILE)):
        raise FileExistsError(f"artifact {remote} already exists")
    storage.upload_dir(local_dir, remote, last=[METADATA_FILE])
    shutil.rmtree(local_dir, ignore_errors=True)


def termination_log_writable(path: Path, explicit: bool) -> bool:
    """Whether the trainer may write ``path`` (rules in the module docstring)."""
    if path.exists():
        return path.is_file() and os.access(path, os.W_OK)
    if not explicit:
        return False
    return path.parent.is_dir() and os.access(path.parent, os.W_OK)


def _truncate_utf8(text: str, limit: int = MAX_TERMINATION_MESSAGE_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


def write_termination_message(path: Path, text: str, explicit: bool) -> bool:
    """Replace the termination log's contents with ``text`` (the success result).

    Returns:
        True when written, False when the path is not writable (see module docstring).
    """
    if not termination_log_writable(path, explicit):
        log.info("termination log %s not writable here; result not written there", path)
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def write_failure_message(path: Path, message: str, explicit: bool) -> bool:
    """Record a failure (``kiln-train: <message>``, <= 4096 bytes) unless one is already there.

    Never raises: failing to report a failure must not mask the original error.
    """
    try:
        if not termination_log_writable(path, explicit):
            return False
        if path.exists() and path.stat().st_size > 0:
            return False
        with open(path, "w", encoding="utf-8") as f:
            f.write(_truncate_utf8(FAILURE_PREFIX + " ".join(message.split())))
        return True
    except OSError:
        return False
