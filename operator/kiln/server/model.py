"""Loading a verified Kiln artifact for inference (the server's torch-importing module).

Every file's digest is checked (``kiln.artifact.verify_artifact``: unknown format, missing file
and digest mismatch are refused) *before* anything is loaded, then the artifact's ``format``
picks the loader:

- ``kiln-mlp``: weights read with ``safetensors.torch.load_file`` (never pickle) into the
  network rebuilt from ``config.json``, ``load_state_dict(strict=True)``. Inputs and outputs
  come from ``config.json``; besides the logits it answers ``predicted_class`` (the arg-max).
- ``torch-export``: ``model.pt2`` loaded with ``torch.export.load``. That loader unpickles some
  payloads (tensor subclasses, custom and opaque objects, legacy ``.pt`` weights; sample inputs
  fall back to ``weights_only=False``), so the archive is scanned first (:func:`scan_pt2`) and
  refused if it holds any of them, or compiled code (AOTInductor), or sample inputs that
  ``torch.load(weights_only=True)`` cannot read: no pickle of user code is ever executed.
- ``onnx``: ``model.onnx`` run with onnxruntime (CPU execution provider).

The signature served (``GET /v2/models/{name}``) is the metadata's, checked against the loaded
program (count, names for ONNX) and by one warm-up forward pass of two rows of zeros whose output
shapes must fit it; any failure refuses the artifact (``ArtifactError``: kiln-serve exits 1).
Models run under ``torch.inference_mode`` (eval mode for the MLP).

FAULT INJECTION: a ``kiln-mlp`` artifact may carry ``servingFaultInjectionFailRate`` in its
weights header (covered by the digest; see ``kiln.artifact``), a deliberately broken version for
canary-rollback drills. It is read here into ``fault_injection_fail_rate`` and logged as a
warning; the server then fails that fraction of requests on purpose.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.artifact import (
    FAULT_INJECTION_FAIL_RATE_KEY,
    FORMAT_MLP,
    FORMAT_ONNX,
    FORMAT_TORCH_EXPORT,
    WEIGHTS_FILE,
    ArtifactError,
    ArtifactMetadata,
    ModelConfig,
    TensorSpec,
    fault_injection_fail_rate,
    model_file,
    read_config,
    uri_to_path,
    verify_artifact,
)
from kiln.server.batcher import Tensors
from kiln.server.protocol import NUMERIC_DATATYPES, PREDICTED_CLASS, TensorMetadata

log = logging.getLogger(__name__)

#: OIP model metadata ``platform`` of each format.
PLATFORMS = {
    FORMAT_MLP: "pytorch_safetensors",
    FORMAT_TORCH_EXPORT: "pytorch_torch_export",
    FORMAT_ONNX: "onnxruntime_onnx",
}

_thread_state = threading.local()


def _tensor_metadata(specs: Sequence[TensorSpec]) -> tuple[TensorMetadata, ...]:
    return tuple(TensorMetadata(t.name, t.datatype, list(t.shape)) for t in specs)


@dataclass
class ServedModel:
    """A verified artifact ready for inference (one subclass per format).

    ``predict`` may be called from any thread. torch's intra-op thread count is an OpenMP setting
    *of the calling thread*, so each new calling thread (e.g. the server's executor thread) sets it
    to ``threads`` on first use; without that, the executor thread would use every core and
    compute slightly different floats from the main thread.
    """

    name: str
    version: str
    digest: str
    metadata: ArtifactMetadata
    #: The model's inputs and outputs (OIP names, datatypes, shapes with -1 free).
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    threads: int = field(default_factory=torch.get_num_threads)
    #: FAULT INJECTION carried by the artifact (its ``servingFaultInjectionFailRate``): the
    #: fraction of requests to fail on purpose; 0.0 for every normal artifact.
    fault_injection_fail_rate: float = 0.0

    @property
    def platform(self) -> str:
        """The OIP ``platform`` of the model metadata."""
        return PLATFORMS[self.metadata.format]

    def predict(self, x: Tensors) -> Tensors:
        """Outputs for a batch.

        Args:
            x: input name -> array (the inputs' datatypes, rows first); or, for a model with
                one input, that input's array alone.
        Returns:
            output name -> array (rows first, the outputs' datatypes); for an array ``x``, the
            first output's array alone.
        """
        if getattr(_thread_state, "threads", None) != self.threads:
            torch.set_num_threads(self.threads)
            _thread_state.threads = self.threads
        single = isinstance(x, np.ndarray)
        feed = {self.inputs[0].name: x} if isinstance(x, np.ndarray) else dict(x)
        with torch.inference_mode():
            out = self._forward(feed)
        return out[self.outputs[0].name] if single else out

    def _forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _named_outputs(self, values: Sequence[Any]) -> dict[str, np.ndarray]:
        if len(values) != len(self.outputs):
            raise ValueError(
                f"the model returned {len(values)} outputs, its signature has {len(self.outputs)}"
            )
        out: dict[str, np.ndarray] = {}
        for spec, v in zip(self.outputs, values, strict=True):
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            out[spec.name] = np.ascontiguousarray(
                arr, dtype=NUMERIC_DATATYPES[spec.datatype].newbyteorder("=")
            )
        return out


@dataclass
class LoadedModel(ServedModel):
    """A ``kiln-mlp`` artifact: the MLP rebuilt from ``config.json``."""

    config: ModelConfig | None = None
    module: torch.nn.Module | None = None

    def _forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.module is not None
        logits = self.module(torch.from_numpy(inputs[self.inputs[0].name])).numpy()
        return {self.outputs[0].name: logits, PREDICTED_CLASS: logits.argmax(axis=1).astype(np.int64)}


@dataclass
class ExportedModel(ServedModel):
    """A ``torch-export`` artifact: ``ExportedProgram.module()`` called positionally."""

    module: torch.nn.Module | None = None

    def _forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.module is not None
        result = self.module(*(torch.from_numpy(inputs[t.name]) for t in self.inputs))
        return self._named_outputs(list(result) if isinstance(result, tuple | list) else [result])


@dataclass
class OnnxModel(ServedModel):
    """An ``onnx`` artifact run by an onnxruntime ``InferenceSession``."""

    session: Any = None

    def _forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [t.name for t in self.outputs]
        return self._named_outputs(self.session.run(names, {t.name: inputs[t.name] for t in self.inputs}))


def configure_torch(threads: int) -> None:
    """Set torch's intra-op thread count (for the calling thread) and, if still possible, inter-op."""
    torch.set_num_threads(threads)
    # RuntimeError: already set, or parallel work has started in this process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def load_model(
    artifact: str | Path, digest: str, *, name: str, version: str, threads: int | None = None
) -> ServedModel:
    """Verify and load an artifact of any format (see the module docstring).

    Args:
        artifact: ``file://`` URI or path of the artifact directory.
        digest: the expected ``sha256:<hex>`` of the artifact's model file.
        threads: intra-op threads for every thread that calls ``predict`` (default: the
            calling thread's current torch setting).
    Raises:
        ArtifactError: unknown format, a file missing or invalid, a digest that does not match,
            a program that does not load, holds pickled payloads, or does not fit its signature.
    """
    path = uri_to_path(str(artifact))
    if not path.is_dir():
        raise ArtifactError(f"artifact directory {path} does not exist")
    metadata = verify_artifact(path, digest)
    threads = threads or torch.get_num_threads()
    loaders = {FORMAT_MLP: _load_mlp, FORMAT_TORCH_EXPORT: _load_exported, FORMAT_ONNX: _load_onnx}
    loader = loaders.get(metadata.format)
    if loader is None:  # a format kiln.artifact knows but kiln-serve does not serve (hf-transformers)
        raise ArtifactError(
            f"artifact {path} has format {metadata.format!r}, which kiln-serve does not serve "
            f"(it serves {', '.join(sorted(loaders))}); an LLM artifact is served by spec.runtime.engine "
            "(docs/llm.md)"
        )
    model = loader(path, metadata, name=name, version=version, digest=digest, threads=threads)
    _warm_up(model, path)
    log.info("loaded %s artifact %s (%s) as %s version %s", metadata.format, path, digest, name, version)
    if model.fault_injection_fail_rate > 0:
        log.warning(
            "FAULT INJECTION: artifact %s (model %s version %s) carries %s=%s: this version answers "
            "%.1f%% of inference requests with 500 ON PURPOSE (a deliberately broken version for "
            "canary-rollback drills); it must never serve real traffic",
            path,
            name,
            version,
            FAULT_INJECTION_FAIL_RATE_KEY,
            model.fault_injection_fail_rate,
            100 * model.fault_injection_fail_rate,
        )
    return model


def _warm_up(model: ServedModel, path: Path) -> None:
    """One forward pass of two rows of zeros (free dimensions 1); outputs must fit the signature.

    Raises:
        ArtifactError: the forward pass fails or an output does not fit.
    """
    feed = {
        t.name: np.zeros([2, *(d if d >= 0 else 1 for d in t.shape[1:])], NUMERIC_DATATYPES[t.datatype])
        for t in model.inputs
    }
    try:
        out = model.predict(feed)
    except Exception as e:
        raise ArtifactError(f"artifact {path}: the model fails on its own input signature: {e}") from e
    assert isinstance(out, Mapping)
    for t in model.outputs:
        shape = list(out[t.name].shape)
        if (
            len(shape) != len(t.shape)
            or shape[0] != 2
            or any(w not in (-1, d) for d, w in zip(shape, t.shape, strict=True))
        ):
            raise ArtifactError(
                f"artifact {path}: output {t.name!r} has shape {shape} for 2 rows, its signature says {t.shape}"
            )


def _load_mlp(
    path: Path, metadata: ArtifactMetadata, *, name: str, version: str, digest: str, threads: int
) -> ServedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from kiln.nn import build_model

    config = read_config(path)
    try:
        module = build_model(config)
    except ValueError as e:
        raise ArtifactError(f"artifact {path}: config.json describes no buildable model: {e}") from e
    try:
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"artifact {path}: {WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"artifact {path}: weights do not match config.json: {e}") from e
    module.eval()
    return LoadedModel(
        name,
        version,
        digest,
        metadata,
        inputs=(TensorMetadata(config.inputName, "FP32", [-1, config.inputSize]),),
        outputs=(
            TensorMetadata(config.outputName, "FP32", [-1, config.numClasses]),
            TensorMetadata(PREDICTED_CLASS, "INT64", [-1]),
        ),
        threads=threads,
        # in the weights file's header: digest-checked above
        fault_injection_fail_rate=fault_injection_fail_rate(path),
        config=config,
        module=module,
    )


#: Parts of a .pt2 archive (below its root folder) that torch.export.load would unpickle or run.
_PT2_REFUSED_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")


def scan_pt2(path: Path) -> None:
    """Refuse a ``torch.export`` archive whose loading would execute pickle or compiled code.

    Checked: it is a zip; no AOTInductor/ExecuTorch/MTIA parts; no legacy ``.pt`` weights or
    constants; every weight and constant is a plain tensor stored raw (``use_pickle`` false,
    no custom or opaque objects); sample inputs load with ``torch.load(weights_only=True)``.

    Raises:
        ArtifactError: naming the part of the archive refused.
    """
    what = f"{path.name} is refused"
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path.name} is not a torch.export archive (.pt2 is a zip file): {e}") from e
    with archive:
        for member in archive.namelist():
            rel = member.split("/", 1)[1] if "/" in member else member
            if rel.startswith(_PT2_REFUSED_DIRS):
                raise ArtifactError(f"{what}: {member} holds compiled code or another runtime's payload")
            if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt"):
                raise ArtifactError(f"{what}: {member} is a legacy pickled weights file")
            constants = rel.endswith("_constants_config.json")
            if constants or rel.endswith("_weights_config.json"):
                try:
                    config = json.loads(archive.read(member)).get("config", {})
                except (ValueError, AttributeError) as e:
                    raise ArtifactError(f"{what}: {member} is not valid JSON: {e}") from e
                for fqn, meta in config.items():
                    pickled = meta.get("use_pickle") or (
                        constants and not str(meta.get("path_name", "")).startswith("tensor_")
                    )
                    if pickled:
                        raise ArtifactError(f"{what}: {fqn!r} ({member}) is stored with pickle")
            if rel.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(archive.read(member)), weights_only=True)
                except Exception as e:
                    raise ArtifactError(f"{what}: {member} is not plain tensors: {e}") from e


def _load_exported(
    path: Path, metadata: ArtifactMetadata, *, name: str, version: str, digest: str, threads: int
) -> ServedModel:
    program_file = path / model_file(metadata)
    scan_pt2(program_file)
    try:
        program = torch.export.load(program_file)
        module = program.module()
    except Exception as e:
        raise ArtifactError(
            f"artifact {path}: {program_file.name} does not load: {type(e).__name__}: {e}"
        ) from e
    sig = program.graph_signature
    if len(sig.user_inputs) != len(metadata.inputs) or len(sig.user_outputs) != len(metadata.outputs):
        raise ArtifactError(
            f"artifact {path}: {program_file.name} takes {len(sig.user_inputs)} inputs and returns "
            f"{len(sig.user_outputs)} outputs; metadata.json lists {len(metadata.inputs)} and {len(metadata.outputs)}"
        )
    return ExportedModel(
        name,
        version,
        digest,
        metadata,
        inputs=_tensor_metadata(metadata.inputs),
        outputs=_tensor_metadata(metadata.outputs),
        threads=threads,
        module=module,
    )


def _load_onnx(
    path: Path, metadata: ArtifactMetadata, *, name: str, version: str, digest: str, threads: int
) -> ServedModel:
    import onnxruntime as ort

    program_file = path / model_file(metadata)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(program_file), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ArtifactError(
            f"artifact {path}: {program_file.name} does not load: {type(e).__name__}: {e}"
        ) from e
    have = ({i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()})
    want = ({t.name for t in metadata.inputs}, {t.name for t in metadata.outputs})
    if have[0] != want[0] or not want[1] <= have[1]:
        raise ArtifactError(
            f"artifact {path}: {program_file.name} has inputs {sorted(have[0])} and outputs {sorted(have[1])}; "
            f"metadata.json lists {sorted(want[0])} and {sorted(want[1])}"
        )
    return OnnxModel(
        name,
        version,
        digest,
        metadata,
        inputs=_tensor_metadata(metadata.inputs),
        outputs=_tensor_metadata(metadata.outputs),
        threads=threads,
        session=session,
    )
