"""profile.json: built from numpy arrays, written and read back exactly, refused when invalid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.monitoring.profile import (
    PROFILE_FILE,
    Profile,
    ProfileError,
    build_profile,
    load_profile,
    read_profile,
)


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    logits = np.eye(10, dtype=np.float32)[d.target] + np.float32(0.01)
    return d.data.astype(np.float32), logits, list(d.feature_names)


def test_digits_profile_holds_every_pixel_exactly_and_the_predicted_classes() -> None:
    x, logits, names = _digits()
    p = build_profile({"input-0": x}, {"output-0": logits}, feature_names=names)
    assert p.rows == 1797 and [i.model_dump() for i in p.inputs] == [{"name": "input-0", "shape": [64]}]
    assert [f.name for f in p.features] == names and [f.index for f in p.features] == list(range(64))
    for f in p.features:
        values, counts = np.unique(x[:, f.index], return_counts=True)
        assert not f.sampled and f.values == values.tolist() and f.counts == counts.tolist()
        assert f.type == "numerical" and f.rows == 1797 and f.missing == 0
        assert f.quantiles is not None and sum(f.quantiles.counts) == 1797
    blank = p.features[0]  # pixel_0_0 is always 0
    assert blank.values == [0.0] and blank.quantiles is not None and blank.quantiles.edges == [0.0, 0.0]
    pred = p.prediction
    assert pred is not None and (pred.output, pred.transform, pred.type) == (
        "output-0",
        "argmax",
        "categorical",
    )
    assert (
        pred.values == [float(c) for c in range(10)] and pred.counts == np.bincount(logits.argmax(1)).tolist()
    )


def test_json_round_trip_is_exact_and_load_profile_reads_the_artifact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 2, 3)).astype(np.float32)  # 6 features per row
    p = build_profile(x, rng.normal(size=3000))
    data = p.to_json()
    assert read_profile(data) == p
    (tmp_path / PROFILE_FILE).write_bytes(data)
    assert load_profile(tmp_path) == p
    assert load_profile(tmp_path / "elsewhere") is None  # an artifact without one: no reference
    assert [f.name for f in p.features][:2] == ["input-0[0]", "input-0[1]"]
    assert p.prediction is not None and (p.prediction.transform, p.prediction.type) == ("value", "numerical")
    assert json.loads(data)["schemaVersion"] == 1


def test_a_column_with_many_distinct_values_keeps_a_uniform_sample_of_5000_rows() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20_000, 1))
    x[::100, 0] = np.nan
    p = build_profile(x, sample_size=5000)
    f = p.features[0]
    assert f.sampled and sum(f.counts) == 5000 and f.rows == 19_800 and f.missing == 200
    assert set(f.values) <= set(x[np.isfinite(x[:, 0]), 0].tolist())
    assert f.mean == pytest.approx(np.nanmean(x)) and f.std == pytest.approx(np.nanstd(x))
    again = build_profile(x, sample_size=5000)
    assert again.features[0].values == f.values  # seeded: the same artifact twice
    small = build_profile(x[:4000])  # at most sample_size rows: all of them
    assert not small.features[0].sampled and sum(small.features[0].counts) == small.features[0].rows


def test_categorical_features_and_integer_predictions() -> None:
    rng = np.random.default_rng(2)
    x = np.stack([rng.integers(0, 3, 500), rng.normal(size=500)], axis=1)
    p = build_profile(
        {"features": x},
        {"label": rng.integers(0, 4, (500, 1))},
        feature_names=["color", "size"],
        categorical=["color"],
    )
    color, size = p.features
    assert color.type == "categorical" and color.quantiles is None and color.values == [0.0, 1.0, 2.0]
    assert size.type == "numerical" and size.quantiles is not None
    assert p.prediction is not None and (p.prediction.transform, p.prediction.type) == (
        "value",
        "categorical",
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inputs": {"a": np.zeros((3, 2)), "b": np.zeros((4, 1))}}, "disagree on the number of rows"),
        ({"inputs": np.array(["a", "b"])}, "numeric array"),
        ({"inputs": np.zeros((3, 2)), "feature_names": ["one"]}, "2 columns but 1 feature names"),
        ({"inputs": np.zeros((3, 2)), "categorical": ["nope"]}, "unknown features"),
        ({"inputs": np.zeros((3, 1025))}, "over 1024"),
        ({"inputs": np.zeros((3, 2)), "sample_size": 1000}, "must exceed 1000"),
        (
            {"inputs": np.zeros((3, 2)), "predictions": {"a": np.zeros(3), "b": np.zeros(3)}},
            "prediction_output",
        ),
        ({"inputs": np.zeros((3, 2)), "predictions": np.zeros((4, 2))}, "4 rows"),
        (
            {"inputs": np.zeros((3, 2)), "predictions": np.zeros((3, 2)), "prediction_transform": "value"},
            "one number",
        ),
        ({"inputs": np.zeros((3, 2)), "predictions": np.zeros(3), "prediction_transform": "mean"}, "argmax"),
        ({"inputs": np.arange(20_000.0)[:, None] % 10_001, "categorical": ["input-0[0]"]}, "over 10000"),
    ],
)
def test_bad_input_is_refused_naming_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        build_profile(**kwargs)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["features"][0].update(counts=[1, 2]),
        lambda d: d["features"][0].update(values=[2.0, 1.0], counts=[1, 1]),
        lambda d: d["features"][0].update(index=9),
        lambda d: d.update(schemaVersion=2),
        lambda d: d.update(surprise=True),
        lambda d: d["features"].append(dict(d["features"][0])),
    ],
)
def test_an_invalid_profile_file_is_refused(tmp_path: Path, change) -> None:
    doc = json.loads(build_profile(np.arange(6.0).reshape(3, 2)).to_json())
    change(doc)
    (tmp_path / PROFILE_FILE).write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=r"profile\.json is invalid"):
        load_profile(tmp_path)
    with pytest.raises(ProfileError):
        read_profile(b"not json")


def test_profile_has_no_torch_pandas_or_scipy_import() -> None:
    import subprocess
    import sys

    code = (
        "import sys, kiln.monitoring.monitor, kiln.monitoring.profile; "
        "bad = {'torch', 'pandas', 'scipy'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert Profile.model_fields  # the module is importable here too
