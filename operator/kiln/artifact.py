"""The Kiln artifact format and the trainer -> operator result protocol.

This module is shared by the operator, the trainer and the model server, so it must not import
torch. An artifact is a directory::

    <artifact>/
      model.safetensors   weights (safetensors; never pickle)
      config.json         ModelConfig: architecture and preprocessing, enough to rebuild the net
      metadata.json       ArtifactMetadata: metrics, hyperparameters, lineage, weights digest

The digest of an artifact is the sha256 of ``model.safetensors``, written ``sha256:<64 hex>``
(the OCI digest notation). The metadata file makes each artifact self-describing, so a registry
can be rebuilt from the artifact store alone (``kiln registry rebuild``).

Only ``model.safetensors`` is covered by the digest, so what must not change without changing
the digest lives inside it: the normalisation constants are buffers among the weights, and
serving settings carried by a version are string entries of the safetensors header's
``__metadata__``. Today there is one, for FAULT INJECTION only:
``servingFaultInjectionFailRate`` (:data:`FAULT_INJECTION_FAIL_RATE_KEY`), the fraction of
inference requests kiln-serve answers 500 on purpose when it serves this artifact, set by the
trainer hyperparameter of the same name to build deliberately broken versions for
canary-rollback drills. It is absent from every normal artifact (``metadata.json`` records it
among the hyperparameters too, for people; the header is what the server reads).

Result protocol: rank 0 of a TrainingJob writes a ``TrainingResult`` JSON document to the
container's termination message file (``/dev/termination-log``, at most 4096 bytes, as the
kubelet truncates longer ones: see the Pod API's ``terminationMessagePath``). The operator reads
it from the rank-0 pod's ``status.containerStatuses[].state.terminated.message``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
TERMINATION_LOG = "/dev/termination-log"
#: The kubelet keeps at most 4096 bytes of a termination message (core/v1 Container docs).
MAX_TERMINATION_MESSAGE_BYTES = 4096
METADATA_SCHEMA_VERSION = 1

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

#: FAULT INJECTION: the trainer hyperparameter and the key in the weights file's safetensors
#: header (``__metadata__``) holding the fraction of requests kiln-serve fails on purpose.
FAULT_INJECTION_FAIL_RATE_KEY = "servingFaultInjectionFailRate"
#: safetensors refuses headers over 100 MB; so do we (the header is JSON read into memory).
_MAX_SAFETENSORS_HEADER_BYTES = 100_000_000


class ArtifactError(Exception):
    """An artifact is missing, malformed, or does not match its expected digest."""


class TerminationMessageError(ValueError):
    """A termination message could not be parsed as a ``TrainingResult``.

    ``reason`` is a CamelCase machine-readable reason suitable for a status condition:
    ``ResultMissing``, ``ResultTooLarge`` or ``ResultMalformed``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Camel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class TrainingResult(_Camel):
    """What the trainer reports through the termination message (JSON, <= 4096 bytes)."""

    artifactUri: str = Field(min_length=1, description="Where the artifact directory is (file:// or path).")
    digest: str = Field(description="sha256 of the weights file, as 'sha256:<hex>'.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics.")

    @field_validator("digest")
    @classmethod
    def _digest_format(cls, v: str) -> str:
        if not DIGEST_RE.match(v):
            raise ValueError("digest must look like 'sha256:<64 lowercase hex>'")
        return v


class ModelConfig(_Camel):
    """Contents of ``config.json``: the architecture and the preprocessing, shared by trainer
    and server so that serving applies exactly the transformation training applied.

    Inputs are flat float vectors of ``inputSize`` features; the model computes
    ``net((x - inputMean) / inputStd)`` and returns ``numClasses`` logits.
    """

    architecture: str = Field(default="mlp", description="Only 'mlp' today.")
    inputSize: int = Field(gt=0, description="Number of input features (64 for 8x8 digits).")
    hiddenSizes: list[int] = Field(default_factory=lambda: [128, 64])
    numClasses: int = Field(gt=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    inputMean: list[float] = Field(description="Per-feature mean subtracted before the net.")
    inputStd: list[float] = Field(description="Per-feature scale divided after centring (> 0).")
    labels: list[str] = Field(default_factory=list, description="Class names, index-aligned.")
    inputName: str = Field(default="input-0", description="Open Inference Protocol input tensor name.")
    outputName: str = Field(default="output-0", description="Open Inference Protocol output tensor name.")


class DatasetInfo(_Camel):
    """Lineage of the data a model was trained on."""

    name: str = Field(description="Built-in dataset name or the URI it was read from.")
    digest: str = Field(description="sha256 over the dataset's canonical bytes, 'sha256:<hex>'.")
    numSamples: int = Field(ge=0, description="Number of rows/samples.")


class ArtifactMetadata(_Camel):
    """Contents of ``metadata.json``: makes an artifact self-describing."""

    schemaVersion: int = METADATA_SCHEMA_VERSION
    modelName: str = ""
    weightsDigest: str
    metrics: dict[str, float] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetInfo | None = None
    image: str = ""
    trainingJob: str = ""
    createdAt: str = Field(description="RFC 3339 UTC time the artifact was written.")
    framework: dict[str, str] = Field(default_factory=dict, description="e.g. {'torch': '2.5.1'}")


def utc_now_rfc3339() -> str:
    """Current UTC time as RFC 3339 with seconds precision and a ``Z`` suffix."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return ``'sha256:<hex>'`` of a file's bytes, read in ``chunk_size`` byte chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def uri_to_path(uri: str) -> Path:
    """Map an artifact URI (``file:///abs/dir`` or a plain path) to a local path.

    Raises:
        ArtifactError: for schemes other than ``file`` (object stores are not supported yet).
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    raise ArtifactError(f"unsupported artifact URI scheme {parsed.scheme!r} in {uri!r}; use file://")


def path_to_uri(path: str | Path) -> str:
    """``file://`` URI of an absolute local path."""
    return Path(path).absolute().as_uri()


def read_config(artifact_dir: str | Path) -> ModelConfig:
    """Read and validate ``config.json`` of an artifact directory.

    Raises:
        ArtifactError: when the file is missing or invalid.
    """
    p = Path(artifact_dir) / CONFIG_FILE
    try:
        return ModelConfig.model_validate_json(p.read_bytes())
    except FileNotFoundError as e:
        raise ArtifactError(f"artifact config {p} not found") from e
    except ValidationError as e:
        raise ArtifactError(f"artifact config {p} is invalid: {e}") from e


def read_metadata(artifact_dir: str | Path) -> ArtifactMetadata:
    """Read and validate ``metadata.json`` of an artifact directory.

    Raises:
        ArtifactError: when the file is missing or invalid.
    """
    p = Path(artifact_dir) / METADATA_FILE
    try:
        return ArtifactMetadata.model_validate_json(p.read_bytes())
    except FileNotFoundError as e:
        raise ArtifactError(f"artifact metadata {p} not found") from e
    except ValidationError as e:
        raise ArtifactError(f"artifact metadata {p} is invalid: {e}") from e


def verify_artifact(artifact_dir: str | Path, expected_digest: str | None = None) -> ArtifactMetadata:
    """Check an artifact directory is complete and its weights match the expected digest.

    The digest of the weights file on disk is recomputed and compared with ``expected_digest``
    (when given) and with the digest recorded in the metadata.

    Returns:
        The artifact's metadata.
    Raises:
        ArtifactError: a file is missing, or a digest does not match.
    """
    d = Path(artifact_dir)
    weights = d / WEIGHTS_FILE
    for f in (weights, d / CONFIG_FILE):
        if not f.is_file():
            raise ArtifactError(f"artifact {d} is missing {f.name}")
    meta = read_metadata(d)
    actual = sha256_file(weights)
    if actual != meta.weightsDigest:
        raise ArtifactError(f"artifact {d}: weights digest {actual} != metadata {meta.weightsDigest}")
    if expected_digest is not None and actual != expected_digest:
        raise ArtifactError(f"artifact {d}: weights digest {actual} != expected {expected_digest}")
    return meta


def read_weights_metadata(weights_file: str | Path) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file's header (empty when it has none).

    Reads only the header (8-byte little-endian length, then JSON), without torch.

    Raises:
        ArtifactError: the file is missing or its header is not valid safetensors.
    """
    p = Path(weights_file)
    try:
        with open(p, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ArtifactError(f"{p} is not a valid safetensors file: shorter than its header length")
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_SAFETENSORS_HEADER_BYTES:
                raise ArtifactError(f"{p} is not a valid safetensors file: header of {size} bytes")
            raw = f.read(size)
    except FileNotFoundError as e:
        raise ArtifactError(f"weights file {p} not found") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p} is not a valid safetensors file: header is not JSON: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ArtifactError(f"{p}: safetensors __metadata__ must map strings to strings")
    return dict(meta)


def fault_injection_weights_metadata(fail_rate: float) -> dict[str, str] | None:
    """The safetensors header entries the trainer writes for a FAULT INJECTION rate.

    None for 0 (a normal artifact: nothing is written, so its bytes are as before).

    Raises:
        ValueError: ``fail_rate`` is not a number in [0, 1].
    """
    if not (isinstance(fail_rate, int | float) and math.isfinite(fail_rate) and 0.0 <= fail_rate <= 1.0):
        raise ValueError(f"{FAULT_INJECTION_FAIL_RATE_KEY} must be a number in [0, 1], got {fail_rate!r}")
    if fail_rate == 0:
        return None
    return {FAULT_INJECTION_FAIL_RATE_KEY: repr(float(fail_rate))}


def fault_injection_fail_rate(artifact_dir: str | Path) -> float:
    """FAULT INJECTION rate an artifact carries (``servingFaultInjectionFailRate`` in the weights
    header, covered by the digest); 0.0 for a normal artifact.

    Raises:
        ArtifactError: the weights file is unreadable, or the value is not a number in [0, 1].
    """
    weights = Path(artifact_dir) / WEIGHTS_FILE
    raw = read_weights_metadata(weights).get(FAULT_INJECTION_FAIL_RATE_KEY)
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ArtifactError(
            f"artifact {Path(artifact_dir)}: {FAULT_INJECTION_FAIL_RATE_KEY} in {WEIGHTS_FILE} "
            f"must be a number in [0, 1], got {raw!r}"
        )
    return value


def format_termination_message(result: TrainingResult) -> str:
    """Serialise a result compactly for the termination log.

    Metrics are dropped, largest names first, if the document would exceed 4096 bytes, so the
    artifact URI and digest always arrive.

    Raises:
        ValueError: when even without metrics the document exceeds the limit.
    """
    metrics = dict(result.metrics)
    while True:
        text = json.dumps(
            {"artifactUri": result.artifactUri, "digest": result.digest, "metrics": metrics},
            separators=(",", ":"),
            sort_keys=True,
        )
        if len(text.encode()) <= MAX_TERMINATION_MESSAGE_BYTES:
            return text
        if not metrics:
            raise ValueError("termination message exceeds 4096 bytes even without metrics")
        metrics.pop(max(metrics, key=len))


def parse_termination_message(text: str | None) -> TrainingResult:
    """Parse the rank-0 container's termination message into a ``TrainingResult``.

    Raises:
        TerminationMessageError: ``ResultMissing`` (empty), ``ResultTooLarge`` (> 4096 bytes,
            which the kubelet would have truncated) or ``ResultMalformed`` (not the JSON shape).
    """
    if text is None or not text.strip():
        raise TerminationMessageError("ResultMissing", "the trainer wrote no termination message")
    if len(text.encode()) > MAX_TERMINATION_MESSAGE_BYTES:
        raise TerminationMessageError(
            "ResultTooLarge", f"termination message is {len(text.encode())} bytes, over 4096"
        )
    try:
        return TrainingResult.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "document"
        raise TerminationMessageError(
            "ResultMalformed", f"termination message {where}: {first['msg']}"
        ) from e
