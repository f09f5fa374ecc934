"""``kiln.sdk``: what a user's own PyTorch training script needs to hand its model to Kiln.

Importable with torch and Kiln's base dependencies (pydantic, boto3 for ``s3://``), never kopf
or the Kubernetes client; ``onnx``/``onnxscript`` only for ``format="onnx"``. Typical use, at the
end of a script a TrainingJob runs (``command``)::

    import kiln.sdk as kiln

    ...train; every rank...
    if kiln.is_main_process():            # rank 0 only: RANK unset or "0"
        kiln.report_metrics(accuracy=acc)
        path = kiln.save_model(model, (example_batch,), kiln.output_dir(),
                               format="torch-export", input_names=["image"], output_names=["logits"])
        kiln.publish(path)                # upload (s3://), then the result the operator registers

- :func:`save_model` exports the module in a portable, code-free format (``torch-export``: a
  ``torch.export`` ExportedProgram, ``model.pt2``; ``onnx``: ``model.onnx`` for onnxruntime)
  with the first (batch) dimension of every input dynamic, and writes ``metadata.json`` (schema
  2 of ``kiln.artifact``: format, signature, every file's sha256, metrics) last, assembling the
  directory under a temporary name and renaming it into place.
- :func:`publish` puts the artifact where the operator expects it (``<KILN_OUTPUT_URI>/
  <KILN_MODEL_NAME>/<KILN_TRAININGJOB>/``, uploaded with ``metadata.json`` last for an ``s3://``
  output, exactly as ``kiln-train`` does) and writes the ``TrainingResult`` to the termination
  log (``KILN_TERMINATION_LOG``, default ``/dev/termination-log``) from which the TrainingJob
  controller registers the version. If a complete artifact is already there (a restarted job
  that had published), that one is reported: artifacts are immutable.
- :func:`report_failure` writes ``kiln-train: <message>`` there instead, which the operator
  shows in the TrainingJob's ``lastFailure``.

Rank-0 semantics: the operator reads the result of the rank-0 pod only (node rank 0, and there
the process with ``RANK`` 0); :func:`publish` and :func:`report_failure` do nothing on other
ranks (they return None), and :func:`save_model` should be called on rank 0 only (it exports
wherever it is called). Call :func:`publish` after the last collective operation: nothing here
synchronises ranks.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import kiln
from kiln import storage
from kiln.artifact import (
    FORMAT_ONNX,
    FORMAT_TORCH_EXPORT,
    METADATA_FILE,
    METADATA_SCHEMA_VERSION_V2,
    MODEL_FILES,
    ArtifactMetadata,
    DatasetInfo,
    TensorSpec,
    TrainingResult,
    format_termination_message,
    path_to_uri,
    read_metadata,
    sha256_file,
    utc_now_rfc3339,
    verify_artifact,
)
from kiln.monitoring.profile import PROFILE_FILE, Profile, build_profile
from kiln.trainer.config import (
    DEFAULT_MODEL_NAME,
    ENV_IMAGE,
    ENV_MODEL_NAME,
    ENV_OUTPUT_URI,
    ENV_STAGING_DIR,
    ENV_TRAININGJOB,
    default_staging_dir,
    resolve_output_root,
    termination_log_from_env,
)
from kiln.trainer.output import (
    artifact_dir,
    fsync_path,
    publish_artifact,
    run_timestamp,
    write_failure_message,
    write_termination_message,
)

log = logging.getLogger("kiln.sdk")

#: torch dtype -> Open Inference Protocol datatype of the signature.
DATATYPES: dict[torch.dtype, str] = {
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.uint8: "UINT8",
}

_metrics: dict[str, float] = {}


def rank() -> int:
    """This process's global rank: ``RANK`` (torchrun, PyTorchJob-style env), else 0."""
    raw = os.environ.get("RANK", "").strip()
    return int(raw) if raw.isdigit() else 0


def is_main_process() -> bool:
    """True on global rank 0, the only process whose result the operator reads."""
    return rank() == 0


def report_metrics(metrics: Mapping[str, float] | None = None, **more: float) -> dict[str, float]:
    """Record evaluation metrics (merged over earlier calls) for :func:`save_model`'s metadata
    and :func:`publish`'s result (the Model version's metrics; promotion policies read them).

    Returns:
        Every metric recorded so far.
    Raises:
        ValueError: a value that is not a finite number.
    """
    for k, v in {**(metrics or {}), **more}.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"metric {k!r} must be a finite number, got {v!r}")
        _metrics[str(k)] = float(v)
    return dict(_metrics)


def output_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where :func:`save_model` should write so that :func:`publish` moves nothing.

    ``<KILN_OUTPUT_URI>/<KILN_MODEL_NAME>/<KILN_TRAININGJOB>`` for a local or mounted output;
    the same below ``<KILN_STAGING_DIR>/output`` for an ``s3://`` output (uploaded by publish).
    Without ``KILN_TRAININGJOB`` the run is a UTC timestamp.

    Raises:
        ValueError: ``KILN_OUTPUT_URI`` is unset or not a usable URI.
    """
    root, _ = _output(environ)
    return artifact_dir(root, _model_name(environ), _run(environ))


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _model_name(environ: Mapping[str, str] | None) -> str:
    return _env(environ).get(ENV_MODEL_NAME, "").strip() or DEFAULT_MODEL_NAME


_default_run: list[str] = []  # this process's timestamp run name, fixed at first use


def _run(environ: Mapping[str, str] | None) -> str:
    job = _env(environ).get(ENV_TRAININGJOB, "").strip()
    if job:
        return job
    if not _default_run:
        _default_run.append(run_timestamp())
    return _default_run[0]


def _output(environ: Mapping[str, str] | None) -> tuple[Path, storage.Location | None]:
    env = _env(environ)
    uri = env.get(ENV_OUTPUT_URI, "").strip()
    if not uri:
        raise ValueError(f"{ENV_OUTPUT_URI} is not set (the operator sets it in a TrainingJob's pods)")
    staging = env.get(ENV_STAGING_DIR, "").strip()
    try:
        return resolve_output_root(uri, Path(staging) if staging else default_staging_dir())
    except Exception as e:  # trainer.config.UsageError
        raise ValueError(str(e)) from None


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in inputs):
        raise ValueError("example_inputs must be a tensor or a sequence of tensors with a batch dimension")
    # torch.export specialises a dimension of size 1: give it at least two rows to keep it dynamic.
    return tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in inputs)


def _specs(tensors: Sequence[torch.Tensor], names: Sequence[str] | None, kind: str) -> list[TensorSpec]:
    names = list(names) if names is not None else [f"{kind}-{i}" for i in range(len(tensors))]
    if len(names) != len(tensors):
        raise ValueError(f"{len(names)} {kind} names for {len(tensors)} {kind}s")
    specs = []
    for name, t in zip(names, tensors, strict=True):
        if t.dtype not in DATATYPES:
            raise ValueError(f"{kind} {name!r} has dtype {t.dtype}; Kiln serves {sorted(DATATYPES.values())}")
        specs.append(TensorSpec(name=name, datatype=DATATYPES[t.dtype], shape=[-1, *t.shape[1:]]))
    return specs


def _outputs_of(model: Any, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with torch.no_grad():
        out = module(*inputs)
    outs = list(out) if isinstance(out, tuple | list) else [out]
    if not all(isinstance(t, torch.Tensor) for t in outs):
        raise ValueError("the model must return a tensor or a tuple/list of tensors")
    return outs


def _export(
    model: Any, inputs: tuple[torch.Tensor, ...], fmt: str, target: Path, names: tuple[list[str], list[str]]
) -> None:
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in inputs)
    if fmt == FORMAT_TORCH_EXPORT:
        program = (
            model
            if isinstance(model, torch.export.ExportedProgram)
            else torch.export.export(model, inputs, dynamic_shapes=dynamic)
        )
        torch.export.save(program, target)
        return
    torch.onnx.export(
        model,
        inputs,
        str(target),
        input_names=names[0],
        output_names=names[1],
        dynamic_shapes=None if isinstance(model, torch.export.ExportedProgram) else dynamic,
        dynamo=True,
        verbose=False,
    )


def _reference_profile(
    model: Any, reference: Any, in_specs: list[TensorSpec], out_specs: list[TensorSpec]
) -> Profile:
    """The profile ``save_model`` stores: ``reference`` itself when it is a Profile (checked
    against the signature), else built from those inputs and the model's outputs on them."""
    if not isinstance(reference, Profile):
        inputs = _as_tuple(reference)
        chunks = [
            _outputs_of(model, tuple(t[i : i + 4096] for t in inputs))
            for i in range(0, inputs[0].shape[0], 4096)
        ]
        outputs = [torch.cat([c[k] for c in chunks]) for k in range(len(out_specs))]
        return build_profile(
            {s.name: t for s, t in zip(in_specs, inputs, strict=True)},
            {s.name: t for s, t in zip(out_specs, outputs, strict=True)},
            prediction_output=out_specs[0].name,
        )
    shapes = {s.name: s.shape[1:] for s in in_specs}
    for i in reference.inputs:
        sig = shapes.get(i.name)
        if (
            sig is None
            or len(sig) != len(i.shape)
            or any(d not in (-1, r) for d, r in zip(sig, i.shape, strict=True))
        ):
            raise ValueError(
                f"reference profile input {i.name!r} {i.shape} does not fit the signature {shapes}"
            )
    p = reference.prediction
    if p is not None and p.output not in {s.name for s in out_specs}:
        raise ValueError(f"reference profile prediction output {p.output!r} is not a model output")
    return reference


def save_model(
    model: torch.nn.Module | torch.export.ExportedProgram,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    *,
    format: str = FORMAT_TORCH_EXPORT,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    metrics: Mapping[str, float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    dataset: DatasetInfo | None = None,
    model_name: str | None = None,
    reference: Profile | torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> Path:
    """Export ``model`` as a Kiln artifact directory at ``path`` (which must not exist).

    Args:
        model: a module (put in eval mode here) or an ``ExportedProgram`` (exported with a
            dynamic first dimension by the caller).
        example_inputs: one batch (a tensor or a sequence, one per positional input), rows
            first; a batch of one row is doubled for export so the batch stays dynamic.
        format: ``"torch-export"`` (``model.pt2``) or ``"onnx"`` (``model.onnx``, plus
            ``model.onnx.data`` when the exporter writes weights beside it).
        input_names, output_names: OIP tensor names (default ``input-<i>``, ``output-<i>``).
        metrics: merged over :func:`report_metrics` into ``metadata.json``.
        hyperparameters, dataset: lineage recorded in ``metadata.json``.
        model_name: default ``KILN_MODEL_NAME``.
        reference: what drift is measured against in kiln-serve, stored as ``profile.json``:
            the training inputs (like ``example_inputs``: a tensor or one per input; the model
            is run on them for the reference predictions, every flattened column is a
            numerical feature named ``<input>[<column>]``), or a
            :class:`~kiln.monitoring.profile.Profile` from :func:`build_profile` (feature
            names, categorical features, a chosen prediction output). None: no reference.
    Returns:
        ``path`` (absolute).
    Raises:
        ValueError: unknown format, bad names or example inputs, an unsupported dtype, a
            reference that does not fit the signature.
        FileExistsError: ``path`` exists (artifacts are immutable).
        Exception: whatever torch.export / torch.onnx.export raise for an unexportable model.
    """
    if format not in (FORMAT_TORCH_EXPORT, FORMAT_ONNX):
        raise ValueError(f"format must be {FORMAT_TORCH_EXPORT!r} or {FORMAT_ONNX!r}, got {format!r}")
    final = Path(path).absolute()
    if final.exists():
        raise FileExistsError(f"artifact directory {final} already exists")
    if isinstance(model, torch.nn.Module):
        model.eval()
    inputs = _as_tuple(example_inputs)
    outs = _outputs_of(model, inputs)
    in_specs, out_specs = _specs(inputs, input_names, "input"), _specs(outs, output_names, "output")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        names = ([t.name for t in in_specs], [t.name for t in out_specs])
        _export(model, inputs, format, tmp / MODEL_FILES[format], names)
        if reference is not None:
            profile = _reference_profile(model, reference, in_specs, out_specs)
            (tmp / PROFILE_FILE).write_bytes(profile.to_json())
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = ArtifactMetadata(
            schemaVersion=METADATA_SCHEMA_VERSION_V2,
            format=format,
            modelName=model_name or _model_name(None),
            weightsDigest=files[MODEL_FILES[format]],
            inputs=in_specs,
            outputs=out_specs,
            files=files,
            metrics={**_metrics, **(metrics or {})},
            hyperparameters=dict(hyperparameters or {}),
            dataset=dataset,
            image=os.environ.get(ENV_IMAGE, ""),
            trainingJob=os.environ.get(ENV_TRAININGJOB, ""),
            createdAt=utc_now_rfc3339(),
            framework={"torch": torch.__version__, "kiln": kiln.__version__},
        )
        (tmp / METADATA_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        for f in [*files, METADATA_FILE]:
            fsync_path(tmp / f)
        verify_artifact(tmp, meta.weightsDigest)
        os.rename(tmp, final)  # fails if final appeared meanwhile: never overwrite
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
    log.info("saved %s artifact %s (%s)", format, final, meta.weightsDigest)
    return final


def publish(path: str | Path, *, metrics: Mapping[str, float] | None = None) -> TrainingResult | None:
    """Rank 0: put the artifact at ``path`` where the operator expects it and write the result.

    ``metrics`` (merged over :func:`report_metrics` and the artifact's own) go into the result,
    which the TrainingJob controller registers as the version's metrics. Other ranks: no-op.

    Returns:
        The result written (None on other ranks).
    Raises:
        ValueError: no ``KILN_OUTPUT_URI``.
        kiln.artifact.ArtifactError: the artifact at ``path`` does not verify.
        kiln.storage.StorageError: the upload failed (the message names bucket and key).
    """
    if not is_main_process():
        return None
    local = Path(path).absolute()
    meta = verify_artifact(local)
    root, remote = _output(None)
    run = _run(None)
    if remote is not None:
        dest = remote.join(_model_name(None), run)
        try:
            publish_artifact(local, dest)
        except FileExistsError:
            log.warning("artifact %s already exists (a restarted job): reporting it", dest)
            meta = storage.verify_artifact_at(dest)
        uri = dest.uri
    else:
        final = artifact_dir(root, _model_name(None), run)
        if final != local:
            if final.exists():
                log.warning("artifact %s already exists (a restarted job): reporting it", final)
                meta = read_metadata(final)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(local, final)
        uri = path_to_uri(final)
    result = TrainingResult(
        artifactUri=uri, digest=meta.weightsDigest, metrics={**meta.metrics, **_metrics, **(metrics or {})}
    )
    message = format_termination_message(result)
    term, explicit = termination_log_from_env()
    write_termination_message(term, message, explicit)
    print(message, flush=True)
    return result


def report_failure(message: str) -> bool:
    """Rank 0: record why the run failed (``kiln-train: <message>``, the first one wins) for
    the TrainingJob's ``lastFailure``. Returns whether it was written (False on other ranks)."""
    if not is_main_process():
        return False
    term, explicit = termination_log_from_env()
    return write_failure_message(term, message, explicit)
