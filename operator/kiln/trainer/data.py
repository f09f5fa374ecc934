"""Data sets: built-in scikit-learn data sets and CSV/Parquet files with a label column.

Every data set becomes two arrays held in memory:

- ``features``: float32, shape ``(n, d)``, C-contiguous;
- ``labels``: int64, shape ``(n,)``, class indices in ``[0, num_classes)``; ``class_names[i]`` is
  the original label value of class ``i`` (classes are the sorted distinct label values).

Dataset digest (recorded as ``DatasetInfo.digest`` in the artifact metadata)::

    sha256( features.astype('<f4', order='C').tobytes() || labels.astype('<i8').tobytes() )

written ``sha256:<hex>``: the little-endian float32 feature matrix in row-major order, followed
immediately by the little-endian int64 class indices, over the whole data set in file order
(before the split). It identifies the numbers the model saw, independent of the file format
(the same table as CSV or Parquet has the same digest); it does not cover column or class names.

Split: stratified and deterministic. For each class (in index order) the class's row indices are
permuted by ``numpy.random.default_rng(splitSeed)`` (one generator for the whole split), and the
first ``round(n_c * testFraction)`` go to test, the next ``round(n_c * validationFraction)`` to
validation, the rest to train (``round`` is half-up). Each split's indices are sorted ascending.
The algorithm is our own (not scikit-learn's) so it cannot change under a library upgrade.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kiln import storage
from kiln.artifact import ArtifactError, uri_to_path
from kiln.trainer.config import DatasetSpec, UsageError, default_staging_dir

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
DEFAULT_LABEL_COLUMN = "label"
log = logging.getLogger("kiln.trainer.data")


def _sklearn_loader(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray, list[str], list[str]]]:
    def load() -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        from sklearn import datasets

        bunch = getattr(datasets, name)()
        target_names = getattr(bunch, "target_names", None)
        classes = [str(c) for c in target_names] if target_names is not None else []
        feature_names = [str(f) for f in getattr(bunch, "feature_names", [])]
        return np.asarray(bunch.data), np.asarray(bunch.target), classes, feature_names

    return load


#: Data sets shipped inside scikit-learn (no download): name -> loader.
BUILTIN_DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str], list[str]]]] = {
    "sklearn-digits": _sklearn_loader("load_digits"),
    "sklearn-iris": _sklearn_loader("load_iris"),
    "sklearn-wine": _sklearn_loader("load_wine"),
    "sklearn-breast-cancer": _sklearn_loader("load_breast_cancer"),
}


@dataclass(frozen=True)
class Dataset:
    """An in-memory classification data set (see the module docstring for the conventions)."""

    name: str
    features: FloatArray
    labels: IntArray
    class_names: list[str]
    feature_names: list[str]
    digest: str

    @property
    def num_samples(self) -> int:
        """Number of rows ``n``."""
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        """Number of feature columns ``d``."""
        return int(self.features.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of distinct classes."""
        return len(self.class_names)


@dataclass(frozen=True)
class Split:
    """Row indices (int64, sorted ascending) of the train, validation and test splits."""

    train: IntArray
    validation: IntArray
    test: IntArray


def dataset_digest(features: np.ndarray, labels: np.ndarray) -> str:
    """``'sha256:<hex>'`` over the canonical bytes described in the module docstring.

    Args:
        features: shape ``(n, d)``, any real dtype (converted to little-endian float32).
        labels: shape ``(n,)`` class indices (converted to little-endian int64).
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(features, dtype="<f4").tobytes(order="C"))
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return "sha256:" + h.hexdigest()


def _finish(
    name: str, x: np.ndarray, y_raw: np.ndarray, class_names: list[str] | None, feature_names: list[str]
) -> Dataset:
    """Encode labels as sorted class indices, check the arrays, compute the digest."""
    if x.ndim != 2 or y_raw.ndim != 1 or x.shape[0] != y_raw.shape[0]:
        raise UsageError(f"dataset {name}: features {x.shape} and labels {y_raw.shape} do not line up")
    if x.shape[0] == 0:
        raise UsageError(f"dataset {name} has no rows")
    if x.shape[1] == 0:
        raise UsageError(f"dataset {name} has no feature columns")
    features = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(features).all():
        bad = sorted({int(c) for c in np.argwhere(~np.isfinite(features))[:, 1]})
        cols = ", ".join(feature_names[c] if c < len(feature_names) else str(c) for c in bad[:10])
        raise UsageError(f"dataset {name}: feature column(s) {cols} contain NaN or infinite values")
    values, labels = np.unique(y_raw, return_inverse=True)
    if len(values) < 2:
        raise UsageError(
            f"dataset {name}: the label has {len(values)} distinct value(s); need at least 2 classes"
        )
    if class_names is None or len(class_names) != len(values):
        class_names = [_label_name(v) for v in values]
    else:
        # scikit-learn targets are 0..k-1 indexing target_names.
        class_names = [class_names[int(v)] for v in values]
    labels = labels.astype(np.int64).reshape(-1)
    return Dataset(
        name=name,
        features=features,
        labels=labels,
        class_names=class_names,
        feature_names=feature_names,
        digest=dataset_digest(features, labels),
    )


def _label_name(v: object) -> str:
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def load_builtin(name: str) -> Dataset:
    """Load a data set shipped with scikit-learn (no network).

    Raises:
        UsageError: the name is not one of ``BUILTIN_DATASETS``.
    """
    loader = BUILTIN_DATASETS.get(name)
    if loader is None:
        raise UsageError(
            f"unknown built-in dataset {name!r}; available: {', '.join(sorted(BUILTIN_DATASETS))}"
        )
    x, y, classes, feature_names = loader()
    return _finish(name, x, y, classes or None, feature_names)


def _infer_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if path.is_dir() or any(s in (".parquet", ".pq") for s in suffixes):
        return "parquet"
    if ".csv" in suffixes or ".tsv" in suffixes:
        return "csv"
    raise UsageError(f"cannot tell the format of {path} from its name; set dataset.format to csv or parquet")


def local_dataset_path(uri: str, staging_dir: Path | None = None) -> Path:
    """The local file of a dataset URI: a path or ``file://`` URI as it is; an ``s3://`` object
    downloaded to ``<staging_dir>/dataset/<object name>`` (default staging directory:
    ``config.default_staging_dir()``), replacing an earlier copy.

    Raises:
        UsageError: an unsupported URI, or a local file that does not exist.
        kiln.storage.StorageError: the object cannot be downloaded (missing object or bucket,
            access denied, store unavailable); the message names bucket and key.
    """
    if storage.is_remote(uri):
        try:
            loc = storage.parse(uri)
        except storage.StorageError as e:
            raise UsageError(f"dataset: {e}") from None
        if not loc.key:
            raise UsageError(f"dataset {uri}: needs an object key (s3://bucket/key.csv)")
        dest = (staging_dir or default_staging_dir()) / "dataset" / loc.name
        storage.download_file(loc, dest)
        return dest
    try:
        path = uri_to_path(uri)
    except ArtifactError as e:
        raise UsageError(f"dataset: {e}") from None
    if not path.exists():
        raise UsageError(f"dataset file {path} does not exist")
    return path


def load_table_file(spec: DatasetSpec, staging_dir: Path | None = None) -> Dataset:
    """Load a CSV or Parquet file with a label column (``spec.uri`` must be set); an ``s3://``
    object is downloaded to ``staging_dir`` first (see ``local_dataset_path``).

    Feature columns must be numeric (integer, floating point, boolean or decimal) and have no
    missing values; the label column may hold integers or strings (or integral floats).

    Raises:
        UsageError: unsupported URI scheme, missing file, unreadable file, missing label column,
            non-numeric feature columns, missing values, fewer than two classes.
        kiln.storage.StorageError: an ``s3://`` object cannot be downloaded.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    assert spec.uri is not None
    path: Path | str  # what messages name: the path, or the s3:// URI (never the staging copy)
    if storage.is_remote(spec.uri):
        path = spec.uri
        fmt = spec.format or _infer_format(Path(storage.parse(spec.uri).name))  # before downloading
        local = local_dataset_path(spec.uri, staging_dir)
    else:
        path = local = local_dataset_path(spec.uri, staging_dir)
        fmt = spec.format or _infer_format(local)
    try:
        table = pacsv.read_csv(local) if fmt == "csv" else pq.read_table(local)
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"cannot read {path} as {fmt}: {e}") from None

    return table_dataset(str(spec.uri), str(path), table, spec.labelColumn, spec.featureColumns)


def table_dataset(
    name: str, path: str, table: Any, label_column: str | None, feature_columns: list[str] | None
) -> Dataset:
    """A pyarrow Table as a :class:`Dataset`: ``label_column`` (default ``label``) holds the class,
    ``feature_columns`` (default: every other column) the numeric features. ``path`` is what
    messages name.

    Raises:
        UsageError: missing label column, non-numeric feature columns, missing values, fewer
            than two classes.
    """
    import pyarrow as pa

    label_column = label_column or DEFAULT_LABEL_COLUMN
    columns = list(table.column_names)
    if label_column not in columns:
        raise UsageError(
            f"dataset {path}: label column {label_column!r} not found; columns are: {', '.join(columns[:50])}"
            + (" ..." if len(columns) > 50 else "")
        )
    if feature_columns is not None:
        missing = [c for c in feature_columns if c not in columns]
        if missing:
            raise UsageError(f"dataset {path}: feature column(s) not found: {', '.join(missing)}")
        if label_column in feature_columns:
            raise UsageError(f"dataset {path}: the label column {label_column!r} cannot also be a feature")
        feature_cols = list(feature_columns)
    else:
        feature_cols = [c for c in columns if c != label_column]
    if not feature_cols:
        raise UsageError(f"dataset {path}: no feature columns besides the label {label_column!r}")

    def numeric(t: pa.DataType) -> bool:
        return bool(
            pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_boolean(t)
            or pa.types.is_decimal(t)
        )

    bad = [
        f"{c} ({table.schema.field(c).type})" for c in feature_cols if not numeric(table.schema.field(c).type)
    ]
    if bad:
        raise UsageError(
            f"dataset {path}: feature columns must be numeric; non-numeric: {', '.join(bad[:20])}"
            + (" ..." if len(bad) > 20 else "")
            + " (encode them, or list the numeric ones in dataset.featureColumns)"
        )
    nulls = [
        f"{c} ({table.column(c).null_count})"
        for c in [*feature_cols, label_column]
        if table.column(c).null_count
    ]
    if nulls:
        raise UsageError(f"dataset {path}: missing values in column(s): {', '.join(nulls[:20])}")

    x = np.column_stack([table.column(c).cast(pa.float64()).to_numpy() for c in feature_cols])
    label_type = table.schema.field(label_column).type
    y_raw: np.ndarray
    if pa.types.is_floating(label_type):
        y_f = table.column(label_column).to_numpy()
        if not np.all(np.isfinite(y_f)) or not np.all(np.equal(np.floor(y_f), y_f)):
            raise UsageError(
                f"dataset {path}: label column {label_column!r} holds non-integral numbers; "
                "classification needs discrete labels (integers or strings)"
            )
        y_raw = y_f.astype(np.int64)
    elif pa.types.is_integer(label_type) or pa.types.is_boolean(label_type):
        y_raw = table.column(label_column).to_numpy().astype(np.int64)
    elif (
        pa.types.is_string(label_type)
        or pa.types.is_large_string(label_type)
        or pa.types.is_dictionary(label_type)
    ):
        y_raw = np.asarray(table.column(label_column).cast(pa.string()).to_pylist(), dtype=object).astype(str)
    else:
        raise UsageError(f"dataset {path}: label column {label_column!r} has unsupported type {label_type}")
    return _finish(name, x, y_raw, None, feature_cols)


def load_feature_group(spec: DatasetSpec) -> Dataset:
    """The training set of a ``featureGroup`` dataset: the point-in-time join
    (:func:`kiln.features.offline.get_historical_features`) of the entity table ``entityUri``
    with the FeatureGroup's source, the FeatureGroup's features as the feature columns.

    Rows that get no value for some feature (no source row at or before their time within the
    lookback) are dropped, and counted in the log: a model cannot train on a missing value.

    Raises:
        UsageError: the schema digest differs from what the operator resolved, the entity table
            or the source is unusable (the column is named), a feature is not numeric, or no row
            is left.
    """
    from kiln.api.featuregroup import FeatureGroupSpec
    from kiln.features.errors import FeatureError
    from kiln.features.offline import get_historical_features, read_table
    from kiln.features.schema import FeatureView

    fg = spec.featureGroup
    assert fg is not None and spec.entityUri is not None
    view = FeatureView(fg.namespace, fg.name, FeatureGroupSpec.model_validate(fg.spec))
    if view.digest != fg.schemaDigest:
        raise UsageError(
            f"FeatureGroup {fg.name}: schema digest {view.digest} is not the resolved {fg.schemaDigest}"
        )
    try:
        entities = read_table(spec.entityUri)
        joined = get_historical_features(view, entities, timestamp_column=spec.timestampColumn)
    except FeatureError as e:
        raise UsageError(f"FeatureGroup {fg.name}: {e}") from None
    label = spec.labelColumn or DEFAULT_LABEL_COLUMN
    features = list(view.feature_names)
    complete = joined.select([*features, label]).drop_null()
    dropped = joined.num_rows - complete.num_rows
    if dropped:
        log.warning(
            "FeatureGroup %s: %d of %d entity rows have no value for some feature as of their time; dropped",
            fg.name,
            dropped,
            joined.num_rows,
        )
    return table_dataset(spec.display_name, spec.entityUri, complete, label, features)


def load_dataset(spec: DatasetSpec, staging_dir: Path | None = None) -> Dataset:
    """Load the data set a ``DatasetSpec`` names (``s3://`` objects via ``staging_dir``).

    Raises:
        UsageError: see ``load_builtin`` and ``load_table_file``.
        kiln.storage.StorageError: an ``s3://`` object cannot be downloaded.
    """
    if spec.builtin is not None:
        return load_builtin(spec.builtin)
    if spec.featureGroup is not None:
        return load_feature_group(spec)
    return load_table_file(spec, staging_dir)


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(
    labels: np.ndarray, *, seed: int, validation_fraction: float, test_fraction: float
) -> Split:
    """Deterministic stratified train/validation/test split (algorithm in the module docstring).

    Args:
        labels: int class indices, shape ``(n,)``.
    Raises:
        UsageError: the validation or test split would be empty, or train would be empty.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = _round_half_up(len(idx) * test_fraction)
        n_val = _round_half_up(len(idx) * validation_fraction)
        if n_test + n_val >= len(idx):  # keep at least one training example per class
            n_test, n_val = min(n_test, max(len(idx) - 1, 0)), 0
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    out = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}
    for k, v in out.items():
        if len(v) == 0:
            raise UsageError(
                f"dataset too small: the {k} split is empty ({len(labels)} rows, "
                f"validationFraction={validation_fraction}, testFraction={test_fraction})"
            )
    return Split(train=out["train"], validation=out["validation"], test=out["test"])


def normalisation(train_features: np.ndarray, min_std: float = 1e-6) -> tuple[list[float], list[float]]:
    """Per-feature mean and population std of the training split, for ``ModelConfig``.

    Features whose std is below ``min_std`` (e.g. the always-blank border pixels of the digits)
    get a std of 1.0, so the model only centres them instead of dividing by ~0.

    Args:
        train_features: shape ``(n_train, d)``.
    Returns:
        ``(mean, std)``, each a list of ``d`` floats; every std is > 0.
    """
    x = np.asarray(train_features, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std < min_std, 1.0, std)
    return [float(v) for v in mean.astype(np.float32)], [float(v) for v in std.astype(np.float32)]
