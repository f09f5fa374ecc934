"""User pre/post-processing around a served model (like a KServe ``Model`` subclass, no fork).

``KILN_MODEL_HOOK`` (``--model-hook``) names the hook, either ``package.module:attr`` or the name
of an entry point in the group :data:`ENTRY_POINT_GROUP` (``kiln.model_hooks``) of a
distribution installed in the server image. ``attr`` is a class (instantiated with no arguments)
or an object, with any of:

- ``preprocess(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]``: runs on each batch
  before the model; must return arrays for every model input (rows first, the same row count);
- ``postprocess(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]``: runs on each batch's
  outputs; what it returns is what clients get (rows first, the same row count);
- ``inputs`` / ``outputs``: sequences of ``{"name", "datatype", "shape"}`` that replace the
  model's signature in the model metadata and in request validation (when the hook changes what
  a client sends or gets; e.g. UINT8 pixels in, normalised FP32 to the model).

Isolation: none. The hook runs in the server process and thread that runs the model, with the
server's privileges and memory, on every batch; an exception in it fails that batch's requests
(500) and a hang blocks the server. It is code from the user's image, trusted like the image.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.artifact import ArtifactError, TensorSpec
from kiln.server.batcher import Tensors, rows
from kiln.server.protocol import NUMERIC_DATATYPES, TensorMetadata

ENTRY_POINT_GROUP = "kiln.model_hooks"


class HookError(ArtifactError):
    """The hook cannot be imported or does not have the expected shape."""


def load_hook(ref: str) -> Any:
    """Import the hook ``ref`` (``module:attr`` or an entry point name) and instantiate it.

    Raises:
        HookError: it cannot be imported, or has neither ``preprocess`` nor ``postprocess``.
    """
    try:
        if ":" in ref:
            module, _, attr = ref.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        else:
            found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=ref)
            if not found:
                raise HookError(f"no entry point {ref!r} in group {ENTRY_POINT_GROUP}")
            obj = next(iter(found)).load()
        hook = obj() if isinstance(obj, type) else obj
    except HookError:
        raise
    except Exception as e:
        raise HookError(f"model hook {ref!r} cannot be loaded: {type(e).__name__}: {e}") from e
    if not callable(getattr(hook, "preprocess", None)) and not callable(getattr(hook, "postprocess", None)):
        raise HookError(f"model hook {ref!r} has neither preprocess(inputs) nor postprocess(outputs)")
    return hook


def _signature(hook: Any, attr: str, default: tuple[TensorMetadata, ...]) -> tuple[TensorMetadata, ...]:
    specs = getattr(hook, attr, None)
    if specs is None:
        return default
    try:
        parsed = [TensorSpec.model_validate(dict(s)) for s in specs]
    except Exception as e:
        raise HookError(f"model hook {attr} must be a list of {{name, datatype, shape}}: {e}") from e
    return tuple(TensorMetadata(t.name, t.datatype, list(t.shape)) for t in parsed)


@dataclass
class HookedModel:
    """A served model with a hook around its ``predict``: the server's ``Predictor``."""

    model: Any
    hook: Any
    inputs: tuple[TensorMetadata, ...] = field(init=False)
    outputs: tuple[TensorMetadata, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = _signature(self.hook, "inputs", tuple(self.model.inputs))
        self.outputs = _signature(self.hook, "outputs", tuple(self.model.outputs))

    def __getattr__(self, name: str) -> Any:  # name, version, digest, platform, fault injection
        return getattr(self.model, name)

    def predict(self, x: Tensors) -> Tensors:
        """``postprocess(model.predict(preprocess(x)))``, each step optional.

        Raises:
            ValueError: the hook returned something else than arrays of the batch's row count.
        """
        single = isinstance(x, np.ndarray)
        feed: Mapping[str, np.ndarray] = {self.inputs[0].name: x} if isinstance(x, np.ndarray) else x
        n = rows(feed)
        if callable(getattr(self.hook, "preprocess", None)):
            feed = self._checked(self.hook.preprocess(dict(feed)), n, "preprocess")
        out = self.model.predict(dict(feed))
        if callable(getattr(self.hook, "postprocess", None)):
            got = self._checked(self.hook.postprocess(dict(out)), n, "postprocess")
            missing = [t.name for t in self.outputs if t.name not in got]
            if missing:
                raise ValueError(f"model hook postprocess returned no {missing[0]!r}")
            out = {
                t.name: got[t.name].astype(NUMERIC_DATATYPES[t.datatype], copy=False) for t in self.outputs
            }
        return out[self.outputs[0].name] if single else out

    @staticmethod
    def _checked(got: Any, n: int, step: str) -> dict[str, np.ndarray]:
        if not isinstance(got, Mapping):
            raise ValueError(f"model hook {step} returned {type(got).__name__}, not a dict of arrays")
        out = {str(k): np.asarray(v) for k, v in got.items()}
        for k, v in out.items():
            if v.ndim == 0 or v.shape[0] != n:
                raise ValueError(f"model hook {step} returned {k!r} of shape {list(v.shape)} for {n} rows")
        return out
