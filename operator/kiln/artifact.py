"""The Kiln artifact format and the trainer -> operator result protocol.

This module is shared by the operator, the trainer and the model server, so it must not import
torch. An artifact is a directory (or an object-store prefix) whose ``metadata.json``
(:class:`ArtifactMetadata`) names its ``format``:

``kiln-mlp`` (schema 1, what ``kiln-train`` writes; the default when ``format`` is absent)::

    model.safetensors   weights (safetensors; never pickle)
    config.json         ModelConfig: architecture and preprocessing, enough to rebuild the net
    metadata.json       metrics, hyperparameters, lineage, weights digest

``torch-export`` (schema 2, written by ``kiln.sdk.save_model``)::

    model.pt2           a torch.export ExportedProgram (``torch.export.save``; read with
                        ``torch.export.load``, which runs no pickle of user code)
    metadata.json       as above, plus ``inputs``/``outputs`` (the signature) and ``files``

``onnx`` (schema 2, written by ``kiln.sdk.save_model``)::

    model.onnx          an ONNX model (served with onnxruntime); external data files, if any,
                        beside it and listed in ``files``
    metadata.json       as for torch-export

``hf-transformers`` (schema 2, an LLM: a Hugging Face ``save_pretrained`` directory, served by an
LLM engine such as vLLM, see :func:`describe_hf_directory`)::

    config.json         the transformers model config
    tokenizer files     tokenizer.json, or tokenizer.model (SentencePiece), or vocab.json + merges.txt
    model.safetensors   the weights, or model.safetensors.index.json and the shards it names
    ...                 any other file of the directory (generation_config.json, chat template...)
    metadata.json       format, weightsDigest, files (every other file), no signature

  Weights must be safetensors: pickled ``*.bin`` / ``*.pt`` files are refused (never unpickled).

The *model file* of a format (:data:`MODEL_FILES`) is the artifact's weights: its sha256, written
``sha256:<64 hex>`` (the OCI digest notation), is the artifact's digest (``weightsDigest``, the
digest a TrainingJob reports and the registry records). ``files`` maps the relative path of every
other file to its digest too (schema 2), so nothing in an artifact can change unnoticed except
``metadata.json`` itself, whose signature kiln-serve checks against the loaded program. The
metadata file makes each artifact self-describing, so a registry can be rebuilt from the artifact
store alone (``kiln registry rebuild``).

Verification (:func:`check_artifact`) is one pure function over two callbacks (does a file
exist, what is its digest), used for local directories (:func:`verify_artifact`) and object
stores (``kiln.storage.verify_artifact_at``) alike. It refuses an unknown format
(:class:`UnknownFormat`), a missing file (:class:`MissingFile`) and a file whose digest differs
from the metadata's or the expected one (:class:`DigestMismatch`), each naming the file.

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
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
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
#: Schema of ``metadata.json`` with ``format``, ``inputs``/``outputs`` and ``files`` (kiln.sdk).
METADATA_SCHEMA_VERSION_V2 = 2

#: Artifact formats (``metadata.json`` ``format``), see the module docstring.
FORMAT_MLP = "kiln-mlp"
FORMAT_TORCH_EXPORT = "torch-export"
FORMAT_ONNX = "onnx"
#: A Hugging Face transformers directory (an LLM), see the module docstring.
FORMAT_HF = "hf-transformers"
#: The model file of each format: its digest is the artifact's digest (``weightsDigest``). A
#: sharded ``hf-transformers`` artifact has :data:`HF_WEIGHTS_INDEX` instead (:func:`model_file`).
MODEL_FILES: dict[str, str] = {
    FORMAT_MLP: WEIGHTS_FILE,
    FORMAT_TORCH_EXPORT: "model.pt2",
    FORMAT_ONNX: "model.onnx",
    FORMAT_HF: WEIGHTS_FILE,
}
#: The weights index of a sharded Hugging Face checkpoint (``save_pretrained``'s name).
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
#: Tokenizer file sets a Hugging Face directory may have; one must be complete.
HF_TOKENIZER_FILES: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
)
#: File name suffixes of pickled weights, which an hf-transformers artifact must not hold.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Files of an artifact directory that are not part of it (the registry's record, see
#: ``kiln.registry.record``), left out by :func:`describe_hf_directory`.
NOT_ARTIFACT_FILES = (METADATA_FILE, "kiln-registration.json")
#: Open Inference Protocol tensor datatypes a signature may name (numeric ones: kiln-serve
#: refuses BOOL and BYTES inputs).
TENSOR_DATATYPES = (
    "FP16",
    "FP32",
    "FP64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

#: FAULT INJECTION: the trainer hyperparameter and the key in the weights file's safetensors
#: header (``__metadata__``) holding the fraction of requests kiln-serve fails on purpose.
FAULT_INJECTION_FAIL_RATE_KEY = "servingFaultInjectionFailRate"
#: safetensors refuses headers over 100 MB; so do we (the header is JSON read into memory).
_MAX_SAFETENSORS_HEADER_BYTES = 100_000_000


class ArtifactError(Exception):
    """An artifact is missing, malformed, or does not match its expected digest."""


class UnknownFormat(ArtifactError):
    """``metadata.json`` names a format this Kiln does not know (see :data:`MODEL_FILES`)."""


class MissingFile(ArtifactError):
    """A file the artifact's metadata requires is absent; ``file`` is its relative path."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(message)
        self.file = file


class DigestMismatch(ArtifactError):
    """A file does not hash to the digest in the metadata (or, for the model file, to the
    expected digest); ``file`` is its relative path."""

    def __init__(self, message: str, file: str = WEIGHTS_FILE) -> None:
        super().__init__(message)
        self.file = file


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
    digest: str = Field(
        description="The artifact's digest: sha256 of its model file (MODEL_FILES), as 'sha256:<hex>'."
    )
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
    featureGroup: str | None = Field(
        default=None, description="The FeatureGroup the features came from, '<namespace>/<name>'."
    )
    schemaDigest: str | None = Field(
        default=None, description="That FeatureGroup's schema digest (its features' definitions)."
    )


class TensorSpec(_Camel):
    """One input or output of a model's signature, in Open Inference Protocol terms.

    ``shape`` lists the dimensions with ``-1`` for a dynamic one; the first is the batch
    dimension and is always ``-1`` (kiln-serve batches requests along it).
    """

    name: str = Field(min_length=1, description="Tensor name (the OIP input/output name).")
    datatype: str = Field(description="OIP datatype: FP32, INT64, ... (TENSOR_DATATYPES).")
    shape: list[int] = Field(min_length=1, description="Dimensions, -1 dynamic; shape[0] is the batch.")

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, v: str) -> str:
        if v not in TENSOR_DATATYPES:
            raise ValueError(f"datatype must be one of {', '.join(TENSOR_DATATYPES)}, got {v!r}")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if v[0] != -1:
            raise ValueError(f"the first (batch) dimension must be -1 (dynamic), got {v}")
        if any(d < -1 for d in v):
            raise ValueError(f"dimensions must be -1 (dynamic) or >= 0, got {v}")
        return v


def _check_relative_path(name: str) -> str:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or str(p) != name or name == METADATA_FILE:
        raise ValueError(f"{name!r} must be a normalised relative path other than {METADATA_FILE}")
    return name


class ArtifactMetadata(_Camel):
    """Contents of ``metadata.json``: makes an artifact self-describing.

    Schema 1 (``kiln-mlp``, what ``kiln-train`` writes) leaves ``format`` at its default and
    ``inputs``/``outputs``/``files`` empty. Schema 2 (``kiln.sdk``) sets all four:
    ``files`` maps every file of the artifact but ``metadata.json`` (relative path) to its
    ``sha256:<hex>``, the model file included (with ``weightsDigest``).
    """

    schemaVersion: int = METADATA_SCHEMA_VERSION
    format: str = Field(
        default=FORMAT_MLP, description="kiln-mlp | torch-export | onnx | hf-transformers (MODEL_FILES)."
    )
    modelName: str = ""
    weightsDigest: str = Field(description="sha256 of the model file: the artifact's digest.")
    inputs: list[TensorSpec] = Field(default_factory=list, description="Input signature (schema 2).")
    outputs: list[TensorSpec] = Field(default_factory=list, description="Output signature (schema 2).")
    files: dict[str, str] = Field(
        default_factory=dict, description="Relative path -> 'sha256:<hex>' of every file (schema 2)."
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetInfo | None = None
    image: str = ""
    trainingJob: str = ""
    createdAt: str = Field(description="RFC 3339 UTC time the artifact was written.")
    framework: dict[str, str] = Field(default_factory=dict, description="e.g. {'torch': '2.5.1'}")

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            _check_relative_path(name)
            if not DIGEST_RE.match(digest):
                raise ValueError(f"files[{name!r}] must look like 'sha256:<64 lowercase hex>'")
        return v


def model_file(meta: ArtifactMetadata) -> str:
    """The model file of ``meta``'s format (relative path).

    Raises:
        UnknownFormat: the format is not one of :data:`MODEL_FILES`.
    """
    if meta.format == FORMAT_HF and WEIGHTS_FILE not in meta.files and HF_WEIGHTS_INDEX in meta.files:
        return HF_WEIGHTS_INDEX
    try:
        return MODEL_FILES[meta.format]
    except KeyError:
        known = ", ".join(MODEL_FILES)
        raise UnknownFormat(
            f"{METADATA_FILE} names unknown artifact format {meta.format!r} (known: {known})"
        ) from None


def metadata_problems(meta: ArtifactMetadata) -> list[str]:
    """What is inconsistent in ``meta`` on its own (empty when nothing is): a schema-2 format
    without a signature, a model file missing from ``files`` or with another digest than
    ``weightsDigest``, tensor names given twice. Pure; the format must be known.
    """
    problems: list[str] = []
    model = model_file(meta)
    if meta.format == FORMAT_HF:
        problems += hf_problems(meta.files)
    elif meta.format != FORMAT_MLP and (not meta.inputs or not meta.outputs):
        problems.append(f"format {meta.format} needs 'inputs' and 'outputs' (the model's signature)")
    if meta.format != FORMAT_MLP and meta.files.get(model) != meta.weightsDigest:
        problems.append(f"'files' must list {model} with the digest in 'weightsDigest'")
    for kind, specs in (("inputs", meta.inputs), ("outputs", meta.outputs)):
        names = [t.name for t in specs]
        if len(set(names)) != len(names):
            problems.append(f"'{kind}' names a tensor more than once: {names}")
    return problems


def hf_problems(files: Mapping[str, str] | Iterable[str]) -> list[str]:
    """What a Hugging Face directory with these files (relative paths) lacks to be served by an
    LLM engine (empty when nothing): ``config.json``, a complete tokenizer
    (:data:`HF_TOKENIZER_FILES`), safetensors weights, no pickled weights. Pure.
    """
    names = set(files)
    problems = []
    if CONFIG_FILE not in names:
        problems.append(f"a {FORMAT_HF} artifact needs {CONFIG_FILE}")
    if not any(all(f in names for f in group) for group in HF_TOKENIZER_FILES):
        sets = " or ".join(" + ".join(g) for g in HF_TOKENIZER_FILES)
        problems.append(f"a {FORMAT_HF} artifact needs its tokenizer ({sets})")
    if not any(f.endswith(".safetensors") for f in names):
        problems.append(f"a {FORMAT_HF} artifact needs safetensors weights ({WEIGHTS_FILE} or shards)")
    pickled = sorted(f for f in names if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        problems.append(f"pickled weights are never loaded; remove {', '.join(pickled)} (keep safetensors)")
    return problems


def artifact_files(meta: ArtifactMetadata) -> list[str]:
    """Every file ``meta`` requires besides ``metadata.json``: the model file first, then
    ``config.json`` for ``kiln-mlp``, then the rest of ``files`` (sorted).

    Raises:
        UnknownFormat: the format is not known.
    """
    model = model_file(meta)
    extra = [CONFIG_FILE] if meta.format == FORMAT_MLP else []
    return [model, *extra, *sorted(f for f in meta.files if f not in (model, *extra))]


def check_artifact(
    meta: ArtifactMetadata,
    *,
    where: str,
    exists: Callable[[str], bool],
    digest_of: Callable[[str], str],
    expected_digest: str | None = None,
) -> ArtifactMetadata:
    """Verify an artifact against its metadata: the one implementation behind
    :func:`verify_artifact` (local) and ``kiln.storage.verify_artifact_at`` (any store).

    Order: the format is known; the metadata is consistent; every required file exists
    (:func:`artifact_files`); the model file hashes to ``weightsDigest`` and to
    ``expected_digest`` (when given); every other file in ``files`` hashes to its digest there.

    Args:
        where: how messages name the artifact (a path or URI).
        exists: whether a relative path is a file of the artifact.
        digest_of: ``'sha256:<hex>'`` of a relative path (may raise the store's errors).
    Returns:
        ``meta``.
    Raises:
        UnknownFormat: unknown ``format``.
        ArtifactError: inconsistent metadata (:func:`metadata_problems`).
        MissingFile: a required file is absent (named).
        DigestMismatch: a file does not match (named).
    """
    try:
        files = artifact_files(meta)
    except UnknownFormat as e:
        raise UnknownFormat(f"artifact {where}: {e}") from None
    problems = metadata_problems(meta)
    if problems:
        raise ArtifactError(f"artifact {where}: {METADATA_FILE} is inconsistent: {'; '.join(problems)}")
    for f in files:
        if not exists(f):
            raise MissingFile(f, f"artifact {where} is missing {f}")
    model = files[0]
    actual = digest_of(model)
    if actual != meta.weightsDigest:
        raise DigestMismatch(
            f"artifact {where}: weights digest of {model} {actual} != metadata {meta.weightsDigest}", model
        )
    if expected_digest is not None and actual != expected_digest:
        raise DigestMismatch(
            f"artifact {where}: weights digest of {model} {actual} != expected {expected_digest}", model
        )
    for f in files[1:]:
        recorded = meta.files.get(f)
        if recorded is not None and (got := digest_of(f)) != recorded:
            raise DigestMismatch(f"artifact {where}: digest of {f} {got} != metadata {recorded}", f)
    return meta


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
    """Check a local artifact directory with :func:`check_artifact` (every file's digest is
    recomputed from disk).

    Returns:
        The artifact's metadata.
    Raises:
        ArtifactError: metadata missing or invalid, unknown format (UnknownFormat), a file
            missing (MissingFile), or a digest that does not match (DigestMismatch).
    """
    d = Path(artifact_dir)
    meta = read_metadata(d)
    return check_artifact(
        meta,
        where=str(d),
        exists=lambda f: (d / f).is_file(),
        digest_of=lambda f: sha256_file(d / f),
        expected_digest=expected_digest,
    )


def describe_hf_directory(
    directory: str | Path, *, model_name: str = "", created_at: str | None = None
) -> ArtifactMetadata:
    """The ``metadata.json`` of a Hugging Face directory (``save_pretrained`` output) as an
    ``hf-transformers`` artifact: every file but :data:`NOT_ARTIFACT_FILES` and hidden ones in
    ``files`` with its sha256; ``weightsDigest`` is that of the model file (:func:`model_file`).

    Raises:
        ArtifactError: not a directory, or what :func:`hf_problems` finds (e.g. no tokenizer).
    """
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not a directory")
    paths = sorted(
        p
        for p in d.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(d).parts)
        and p.relative_to(d).as_posix() not in NOT_ARTIFACT_FILES
    )
    rel = [p.relative_to(d).as_posix() for p in paths]
    problems = hf_problems(rel)
    if problems:
        raise ArtifactError(f"{d} is not a servable {FORMAT_HF} directory: {'; '.join(problems)}")
    files = {r: sha256_file(p) for r, p in zip(rel, paths, strict=True)}
    meta = ArtifactMetadata(
        schemaVersion=METADATA_SCHEMA_VERSION_V2,
        format=FORMAT_HF,
        modelName=model_name,
        weightsDigest="sha256:" + "0" * 64,
        files=files,
        createdAt=created_at or utc_now_rfc3339(),
    )
    meta.weightsDigest = files[model_file(meta)]
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
