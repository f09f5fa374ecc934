"""Data sets: built-in digits, CSV/Parquet with a label column, split, digest, input errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the train extra (torch, numpy, scikit-learn, pyarrow)

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kiln.trainer.config import DatasetSpec, UsageError
from kiln.trainer.data import (
    dataset_digest,
    load_builtin,
    load_dataset,
    normalisation,
    stratified_split,
)

pytestmark = pytest.mark.torch

#: sha256 over float32 features || int64 labels of sklearn's bundled digits (1797 x 64). The
#: file ships inside scikit-learn, so this must never change; if it does, lineage breaks.
DIGITS_DIGEST = "sha256:faf2d98f61250c1cdc0b114323133d3c58da04f5c5d28bb78e4bde3c936a75b1"


def test_digits_shape_classes_and_stable_digest():
    ds = load_builtin("sklearn-digits")
    assert ds.features.shape == (1797, 64) and ds.features.dtype == np.float32
    assert ds.features.flags["C_CONTIGUOUS"]
    assert ds.labels.shape == (1797,) and ds.labels.dtype == np.int64
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.digest == DIGITS_DIGEST
    # The documented canonical bytes, computed independently.
    h = hashlib.sha256(ds.features.astype("<f4").tobytes() + ds.labels.astype("<i8").tobytes())
    assert ds.digest == "sha256:" + h.hexdigest()
    assert load_builtin("sklearn-digits").digest == ds.digest


def test_digest_depends_on_values_and_labels():
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    y = np.array([0, 1, 0, 1])
    d = dataset_digest(x, y)
    assert d == dataset_digest(x.astype(np.float32), y.astype(np.int32))  # dtype-independent
    assert d != dataset_digest(x, np.array([1, 0, 0, 1]))
    x2 = x.copy()
    x2[0, 0] = 0.5
    assert d != dataset_digest(x2, y)


def test_split_is_deterministic_disjoint_and_stratified():
    ds = load_builtin("sklearn-digits")
    a = stratified_split(ds.labels, seed=0, validation_fraction=0.15, test_fraction=0.15)
    b = stratified_split(ds.labels, seed=0, validation_fraction=0.15, test_fraction=0.15)
    c = stratified_split(ds.labels, seed=1, validation_fraction=0.15, test_fraction=0.15)
    for part in ("train", "validation", "test"):
        assert np.array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.test, c.test)
    all_idx = np.concatenate([a.train, a.validation, a.test])
    assert len(all_idx) == ds.num_samples and len(np.unique(all_idx)) == ds.num_samples
    assert len(a.train) == 1259 and len(a.validation) == 269 and len(a.test) == 269
    for idx in (a.validation, a.test):
        counts = np.bincount(ds.labels[idx], minlength=10)
        expected = np.bincount(ds.labels, minlength=10) * 0.15
        assert np.all(np.abs(counts - expected) <= 1), counts  # every class in proportion


def test_split_too_small_is_a_clear_error():
    with pytest.raises(UsageError, match="too small"):
        stratified_split(np.array([0, 1, 0, 1]), seed=0, validation_fraction=0.15, test_fraction=0.15)


def test_normalisation_floors_constant_features():
    ds = load_builtin("sklearn-digits")
    mean, std = normalisation(ds.features)
    assert len(mean) == len(std) == 64
    assert std[0] == 1.0  # the top-left pixel is always blank
    assert all(s > 0 for s in std)
    assert mean[0] == 0.0


def _table() -> pa.Table:
    rng = np.random.default_rng(0)
    n = 60
    return pa.table(
        {
            "f_int": pa.array(rng.integers(0, 10, n)),
            "species": pa.array(["setosa", "virginica", "versicolor"] * (n // 3)),
            "f_float": pa.array(rng.normal(size=n)),
            "f_bool": pa.array(rng.integers(0, 2, n).astype(bool)),
        }
    )


def test_csv_and_parquet_give_the_same_data_and_digest(tmp_path: Path):
    t = _table()
    pacsv.write_csv(t, tmp_path / "d.csv")
    pq.write_table(t, tmp_path / "d.parquet")
    from_csv = load_dataset(DatasetSpec(uri=str(tmp_path / "d.csv"), labelColumn="species"))
    from_pq = load_dataset(
        DatasetSpec(uri=(tmp_path / "d.parquet").as_uri(), format="parquet", labelColumn="species")
    )
    assert from_csv.class_names == ["setosa", "versicolor", "virginica"]  # sorted
    assert from_csv.feature_names == ["f_int", "f_float", "f_bool"]  # file order, label removed
    assert from_csv.features.shape == (60, 3)
    assert from_csv.labels[:3].tolist() == [0, 2, 1]
    assert np.allclose(from_csv.features, from_pq.features)
    assert from_csv.digest == from_pq.digest
    assert from_csv.name == str(tmp_path / "d.csv")


def test_integer_labels_and_feature_columns(tmp_path: Path):
    t = pa.table({"a": [1.0, 2.0, 3.0, 4.0] * 5, "b": ["x"] * 20, "y": [3, 7, 3, 7] * 5})
    pq.write_table(t, tmp_path / "d.pq")
    ds = load_dataset(DatasetSpec(uri=str(tmp_path / "d.pq"), labelColumn="y", featureColumns=["a"]))
    assert ds.class_names == ["3", "7"] and ds.labels[:2].tolist() == [0, 1]
    assert ds.features.shape == (20, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"builtin": "sklearn-nope"},
            "unknown built-in dataset 'sklearn-nope'; available: sklearn-breast-cancer",
        ),
        ({"uri": "/does/not/exist.csv", "labelColumn": "y"}, "does not exist"),
        ({"uri": "gs://bucket/x.csv", "labelColumn": "y"}, "unsupported artifact URI scheme"),
        # s3:// objects (downloaded; see test_trainer_s3): checked before any request is made
        ({"uri": "s3://bucket", "labelColumn": "y"}, r"needs an object key \(s3://bucket/key.csv\)"),
        ({"uri": "s3://bucket/x.bin", "labelColumn": "y"}, "cannot tell the format of x.bin"),
        (
            {"uri": "CSV", "labelColumn": "target"},
            "label column 'target' not found; columns are: f_int, species",
        ),
        ({"uri": "CSV", "labelColumn": "f_int"}, r"non-numeric: species \(string\)"),
        ({"uri": "CSV", "labelColumn": "species", "featureColumns": ["zz"]}, "not found: zz"),
        ({"uri": "CSV", "labelColumn": "f_float", "featureColumns": ["f_int"]}, "non-integral numbers"),
        ({"uri": "NULLS", "labelColumn": "y"}, r"missing values in column\(s\): a \(1\)"),
        ({"uri": "ONECLASS", "labelColumn": "y"}, "need at least 2 classes"),
        ({"uri": "NOEXT", "labelColumn": "y"}, "cannot tell the format"),
    ],
)
def test_bad_datasets_are_clear_usage_errors(tmp_path: Path, spec: dict, message: str):
    pacsv.write_csv(_table(), tmp_path / "d.csv")
    pacsv.write_csv(pa.table({"a": [1.0, None, 2.0], "y": [0, 1, 0]}), tmp_path / "nulls.csv")
    pacsv.write_csv(pa.table({"a": [1.0, 2.0], "y": [1, 1]}), tmp_path / "one.csv")
    (tmp_path / "data.bin").write_text("a,y\n1,0\n")
    paths = {"CSV": "d.csv", "NULLS": "nulls.csv", "ONECLASS": "one.csv", "NOEXT": "data.bin"}
    if spec.get("uri") in paths:
        spec = {**spec, "uri": str(tmp_path / paths[spec["uri"]])}
    with pytest.raises(UsageError, match=message):
        load_dataset(DatasetSpec.model_validate(spec))
