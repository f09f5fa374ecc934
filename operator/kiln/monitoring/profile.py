"""The reference profile: what a model's training inputs and predictions looked like.

Stored inside the artifact as ``profile.json`` (:data:`PROFILE_FILE`), listed with its sha256 in
``metadata.json``'s ``files`` like every other file (so ``kiln.artifact.check_artifact``
verifies it). Written by ``kiln-train`` (the training split of the built-in MLP and its
predicted classes) and by ``kiln.sdk.save_model(..., reference=...)``; read by kiln-serve's
:class:`~kiln.monitoring.monitor.DriftMonitor`. An artifact without it (older ones) has no
reference: drift reports say so and show no numbers.

Format (JSON, schema 1; every number a JSON number, floats written with Python's ``repr`` so
they read back bit for bit)::

    {
      "schemaVersion": 1,
      "rows": 1437,                                   # reference rows
      "inputs": [{"name": "input-0", "shape": [64]}], # per-row shape of each input tensor
      "features": [                                   # one column of one input each
        {"name": "pixel_0_0", "input": "input-0", "index": 0,   # index into the flattened row
         "type": "numerical" | "categorical",
         "rows": 1437, "missing": 0,                  # finite rows, NaN/inf rows (dropped)
         "values": [0.0, 1.0, ...], "counts": [1400, 30, ...],
         "sampled": false,
         "mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0,
         "quantiles": {"edges": [...], "counts": [...]}},   # numerical only
        ...],
      "prediction": {"name": "prediction", "output": "output-0",
                     "transform": "argmax" | "value", ...same column fields...} | null
    }

``values``/``counts``: the column as a multiset (sorted distinct values and how often each
occurs). It is the whole column when the column has at most ``sampleSize`` (default 5,000)
distinct values or rows, and always for categorical columns; otherwise (``"sampled": true``) it
is a uniform sample of ``sampleSize`` rows drawn without replacement (numpy's
``default_rng(seed)``), enough for the exact tests and distances of ``kiln.monitoring.drift``.
``sampleSize`` must exceed 1,000 so that a sampled reference and the whole one fall on the same
side of Evidently's 1,000-row rule. ``quantiles``: the column's deciles (``bins``, default 10;
equal edges merged) and the rows in each bin, last bin closed, for people and dashboards.

Predictions: the model's output tensor ``output`` turned into one value per row by
``transform``: ``argmax`` over the flattened row (the predicted class of a classifier, a
categorical column) or ``value`` (a one-number output: a regression's prediction, numerical
unless integer-typed). kiln-serve applies the same transform to what it serves.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.artifact import ArtifactError
from kiln.monitoring.drift import SMALL_REFERENCE_ROWS, Sample

PROFILE_FILE = "profile.json"
PROFILE_SCHEMA_VERSION = 1
DEFAULT_SAMPLE_SIZE = 5000
DEFAULT_BINS = 10
#: Most features a profile tracks (each is a Prometheus series per method in kiln-serve).
MAX_FEATURES = 1024
#: Most distinct values of a categorical column.
MAX_CATEGORIES = 10_000
NUMERICAL = "numerical"
CATEGORICAL = "categorical"
ARGMAX = "argmax"
VALUE = "value"


class ProfileError(ArtifactError):
    """``profile.json`` is unreadable or invalid, or a profile cannot be built from the data."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantileBins(_Strict):
    """Bin edges at the reference's quantiles and the reference rows in each bin."""

    edges: list[float]
    counts: list[int]


class ColumnProfile(_Strict):
    """One column of the reference: its multiset (``values``/``counts``) and summary numbers."""

    name: str = Field(min_length=1)
    type: Literal["numerical", "categorical"]
    rows: int = Field(ge=0, description="Finite rows in the reference.")
    missing: int = Field(ge=0, description="Rows that were NaN or infinite (dropped).")
    values: list[float] = Field(description="Sorted distinct values (of the sample when sampled).")
    counts: list[int] = Field(description="How often each value occurs, aligned with values.")
    sampled: bool = Field(description="values/counts hold a sample of the rows, not all of them.")
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    quantiles: QuantileBins | None = None

    @model_validator(mode="after")
    def _multiset(self) -> ColumnProfile:
        if len(self.values) != len(self.counts):
            raise ValueError(f"{self.name}: {len(self.values)} values but {len(self.counts)} counts")
        if any(c < 1 for c in self.counts) or any(not math.isfinite(v) for v in self.values):
            raise ValueError(f"{self.name}: counts must be >= 1 and values finite")
        if any(b <= a for a, b in zip(self.values, self.values[1:], strict=False)):
            raise ValueError(f"{self.name}: values must be sorted and distinct")
        if not self.sampled and sum(self.counts) != self.rows:
            raise ValueError(f"{self.name}: counts sum to {sum(self.counts)}, not rows={self.rows}")
        return self

    def sample(self) -> Sample:
        """The reference column as a :class:`~kiln.monitoring.drift.Sample`."""
        return Sample(np.asarray(self.values, dtype=np.float64), np.asarray(self.counts, dtype=np.int64))

    @property
    def numerical(self) -> bool:
        """Whether the column is numerical (else categorical)."""
        return self.type == NUMERICAL


class FeatureProfile(ColumnProfile):
    """A feature: column ``index`` of the flattened rows of input tensor ``input``."""

    input: str = Field(min_length=1)
    index: int = Field(ge=0)


class PredictionProfile(ColumnProfile):
    """The model's prediction: output tensor ``output`` through ``transform``."""

    output: str = Field(min_length=1)
    transform: Literal["argmax", "value"]


class InputSpec(_Strict):
    """An input tensor and the shape of one of its rows."""

    name: str = Field(min_length=1)
    shape: list[int] = Field(description="Per-row shape (the tensor's shape without the batch dimension).")

    @property
    def width(self) -> int:
        """Numbers per row."""
        return math.prod(self.shape)


class Profile(_Strict):
    """Contents of ``profile.json`` (module docstring)."""

    schemaVersion: int = PROFILE_SCHEMA_VERSION
    rows: int = Field(ge=0, description="Reference rows.")
    inputs: list[InputSpec]
    features: list[FeatureProfile]
    prediction: PredictionProfile | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.schemaVersion != PROFILE_SCHEMA_VERSION:
            raise ValueError(f"schemaVersion {self.schemaVersion} is not {PROFILE_SCHEMA_VERSION}")
        widths = {i.name: i.width for i in self.inputs}
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        for f in self.features:
            if f.input not in widths or f.index >= widths[f.input]:
                raise ValueError(f"feature {f.name}: input {f.input!r} has no column {f.index}")
        return self

    def to_json(self) -> bytes:
        """The ``profile.json`` bytes."""
        return (self.model_dump_json(indent=1, exclude_none=True) + "\n").encode()


def read_profile(data: bytes, where: str = PROFILE_FILE) -> Profile:
    """Parse ``profile.json`` bytes.

    Raises:
        ProfileError: not JSON or not the schema (the message names ``where``).
    """
    try:
        return Profile.model_validate_json(data)
    except ValidationError as e:
        raise ProfileError(f"{where} is invalid: {e}") from e


def load_profile(artifact_dir: str | Path) -> Profile | None:
    """The profile of a local artifact directory; None when it has none (an older artifact).

    Raises:
        ProfileError: ``profile.json`` exists but is invalid.
    """
    p = Path(artifact_dir) / PROFILE_FILE
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    return read_profile(data, str(p))


def _numpy(x: Any, what: str) -> np.ndarray:
    """``x`` as a numeric array with a batch dimension (torch tensors without importing torch)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 0 or a.dtype.kind not in "biuf":
        raise ProfileError(f"{what} must be a numeric array with a batch dimension, got {a.dtype} {a.shape}")
    return a


def _column(
    name: str, x: npt.NDArray[Any], categorical: bool, sample_size: int, bins: int, rng: np.random.Generator
) -> dict[str, Any]:
    """The fields of a :class:`ColumnProfile` for the column ``x`` (one value per row)."""
    f = np.asarray(x, dtype=np.float64)
    finite = f[np.isfinite(f)]
    values, counts = np.unique(finite, return_counts=True)
    sampled = not categorical and values.size > sample_size and finite.size > sample_size
    if categorical and values.size > MAX_CATEGORIES:
        raise ProfileError(f"categorical feature {name} has {values.size} values, over {MAX_CATEGORIES}")
    if sampled:
        values, counts = np.unique(rng.choice(finite, size=sample_size, replace=False), return_counts=True)
    out: dict[str, Any] = {
        "name": name,
        "type": CATEGORICAL if categorical else NUMERICAL,
        "rows": int(finite.size),
        "missing": int(f.size - finite.size),
        "values": values.tolist(),
        "counts": counts.tolist(),
        "sampled": bool(sampled),
    }
    if finite.size:
        out |= {"mean": float(finite.mean()), "std": float(finite.std())}
        out |= {"min": float(finite.min()), "max": float(finite.max())}
        if not categorical:
            edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)))
            edges = edges if edges.size > 1 else np.repeat(edges, 2)
            hist = np.histogram(finite, edges)[0] if edges[0] < edges[-1] else np.array([finite.size])
            out["quantiles"] = {"edges": edges.tolist(), "counts": hist.tolist()}
    return out


def prediction_column(output: npt.NDArray[Any], transform: str) -> npt.NDArray[Any]:
    """One value per row of a model output: ``argmax`` over the flattened row, or the row's
    single ``value``.

    Raises:
        ValueError: ``value`` of an output with more than one number per row.
    """
    rows = output.reshape(output.shape[0], -1)
    if transform == ARGMAX:
        return rows.argmax(axis=1)
    if rows.shape[1] != 1:
        raise ValueError(f"transform 'value' needs one number per row, got {rows.shape[1]}")
    return rows[:, 0]


def _feature_names(
    specs: list[InputSpec], names: Mapping[str, Sequence[str]] | Sequence[str] | None
) -> dict[str, list[str]]:
    if names is None:
        return {s.name: [f"{s.name}[{j}]" for j in range(s.width)] for s in specs}
    if not isinstance(names, Mapping):
        if len(specs) != 1:
            raise ProfileError("feature_names as a list needs a single input; pass {input: [names]}")
        names = {specs[0].name: names}
    out = {}
    for s in specs:
        given = [str(n) for n in names.get(s.name, [f"{s.name}[{j}]" for j in range(s.width)])]
        if len(given) != s.width:
            raise ProfileError(f"input {s.name} has {s.width} columns but {len(given)} feature names")
        out[s.name] = given
    return out


def _prediction(
    predictions: Mapping[str, Any] | Any,
    output: str | None,
    transform: str | None,
    categorical: bool | None,
    rows: int,
) -> tuple[str, str, npt.NDArray[Any], bool]:
    """(output name, transform, one value per row, categorical) of the reference predictions."""
    outs = dict(predictions) if isinstance(predictions, Mapping) else {output or "output-0": predictions}
    if output is None and len(outs) != 1:
        raise ProfileError(
            f"the model has outputs {sorted(outs)}: name the prediction with prediction_output"
        )
    name = output or next(iter(outs))
    if name not in outs:
        raise ProfileError(f"prediction_output {name!r} is not among the outputs {sorted(outs)}")
    arr = _numpy(outs[name], f"output {name}")
    if arr.shape[0] != rows:
        raise ProfileError(f"output {name} has {arr.shape[0]} rows, the inputs {rows}")
    per_row = math.prod(arr.shape[1:])
    how = transform or (ARGMAX if per_row > 1 else VALUE)
    if how not in (ARGMAX, VALUE):
        raise ProfileError(f"prediction_transform must be {ARGMAX!r} or {VALUE!r}, got {how!r}")
    try:
        column = prediction_column(arr, how)
    except ValueError as e:
        raise ProfileError(f"output {name}: {e}") from None
    is_cat = categorical if categorical is not None else (how == ARGMAX or arr.dtype.kind in "biu")
    return name, how, column, is_cat


def build_profile(
    inputs: Mapping[str, Any] | Any,
    predictions: Mapping[str, Any] | Any | None = None,
    *,
    feature_names: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    categorical: Collection[str] = (),
    prediction_output: str | None = None,
    prediction_transform: str | None = None,
    prediction_categorical: bool | None = None,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    bins: int = DEFAULT_BINS,
    seed: int = 0,
) -> Profile:
    """The reference profile of a model's training inputs and its outputs on them.

    Args:
        inputs: ``{input tensor name: array (rows, ...)}`` as the model is served, or one
            array (the input ``input-0``); numpy arrays or CPU/GPU torch tensors. Each row is
            flattened; every number of it is a feature.
        predictions: the model's outputs for those rows, ``{output name: array}`` or one array
            (``output-0``); None for no prediction profile.
        feature_names: per input, one name per flattened column (a plain list for a single
            input); default ``<input>[<column>]``.
        categorical: names of the features that are categories (numeric codes); the others are
            numerical.
        prediction_output: which output is the prediction (needed with several outputs).
        prediction_transform: ``argmax`` (default for outputs with several numbers per row) or
            ``value`` (default for one number per row).
        prediction_categorical: whether the prediction is a category; default: yes for
            ``argmax`` and integer outputs.
        sample_size: most rows kept per numerical column with more distinct values than this
            (> 1000); bins: quantile bins per numerical column; seed: of the sample.
    Raises:
        ProfileError: inputs that are not numeric or disagree on rows, names that do not fit,
            more than :data:`MAX_FEATURES` features, a bad prediction option.
    """
    if sample_size <= SMALL_REFERENCE_ROWS:
        raise ProfileError(f"sample_size must exceed {SMALL_REFERENCE_ROWS}, got {sample_size}")
    named = dict(inputs) if isinstance(inputs, Mapping) else {"input-0": inputs}
    arrays = {k: _numpy(v, f"input {k}") for k, v in named.items()}
    row_counts = {a.shape[0] for a in arrays.values()}
    if len(row_counts) != 1:
        raise ProfileError(f"inputs disagree on the number of rows: {sorted(row_counts)}")
    rows = row_counts.pop()
    specs = [InputSpec(name=k, shape=list(a.shape[1:])) for k, a in arrays.items()]
    names = _feature_names(specs, feature_names)
    total = sum(len(v) for v in names.values())
    if total > MAX_FEATURES:
        raise ProfileError(f"{total} features, over {MAX_FEATURES}: profile fewer inputs")
    unknown = set(categorical) - {n for v in names.values() for n in v}
    if unknown:
        raise ProfileError(f"categorical names unknown features: {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    features = []
    for s in specs:
        flat = arrays[s.name].reshape(rows, -1)
        for j, fname in enumerate(names[s.name]):
            col = _column(fname, flat[:, j], fname in categorical, sample_size, bins, rng)
            features.append(FeatureProfile(input=s.name, index=j, **col))
    prediction = None
    if predictions is not None:
        out, how, column, is_cat = _prediction(
            predictions, prediction_output, prediction_transform, prediction_categorical, rows
        )
        col = _column("prediction", column, is_cat, sample_size, bins, rng)
        prediction = PredictionProfile(output=out, transform=how, **col)
    try:
        return Profile(rows=rows, inputs=specs, features=features, prediction=prediction)
    except ValidationError as e:
        raise ProfileError(f"invalid profile: {e}") from e
