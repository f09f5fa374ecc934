"""A TrainingJob's featureGroupRef as the trainer sees it: KILN_DATASET -> point-in-time training set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from kiln.api.trainingjob import TrainingJobSpec
from kiln.resources import trainingjob as build
from kiln.trainer.config import UsageError, parse_dataset
from kiln.trainer.data import load_dataset

from .helpers import at, ts, write_source


def feature_group(source: Path) -> dict:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "FeatureGroup",
        "metadata": {"name": "activity", "namespace": "ml"},
        "spec": {
            "entities": [{"name": "customer_id", "dtype": "int64"}],
            "features": [
                {"name": "orders", "dtype": "int64"},
                {
                    "name": "spend_log",
                    "dtype": "float32",
                    "transformation": {"type": "Log1p", "column": "spend"},
                },
            ],
            "source": {"uri": source.as_uri(), "format": "parquet"},
            "offline": {"lookbackSeconds": 3 * 3600},
        },
    }


def job_spec(entities: Path) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(
        {
            "image": "kiln/trainer:dev",
            "dataset": {
                "featureGroupRef": {"name": "activity"},
                "entityUri": entities.as_uri(),
                "labelColumn": "churned",
                "timestampColumn": "as_of",
            },
        }
    )


def kiln_dataset(spec: TrainingJobSpec, fg: dict) -> dict:
    """KILN_DATASET exactly as the operator puts it on the pods."""
    job = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "churn", "namespace": "ml", "uid": "u1"},
    }
    pod = build.pod(job, spec, rank=0, gang=0, feature_group=fg)
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return json.loads(env["KILN_DATASET"])


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path]:
    source = write_source(
        tmp_path / "activity.parquet",
        {
            "customer_id": [1, 1, 2, 2, 3],
            "orders": [1, 5, 2, 7, 9],
            "spend": [0.0, 9.0, 1.0, 99.0, 4.0],
            "event_timestamp": ts(0, 2, 0, 3, 0),
        },
    )
    entities = write_source(
        tmp_path / "labels.parquet",
        {
            "customer_id": [1, 1, 2, 2, 3],
            # customer 1 before and after its second value; customer 2 one hour before its second
            # value arrives (so the first); customer 3 five hours later (past the 3 h lookback)
            "as_of": pa.array([at(1), at(2), at(2), at(3), at(5)], pa.timestamp("us", tz="UTC")),
            "churned": [0, 1, 0, 1, 1],
        },
    )
    return source, entities


def test_operator_env_gives_the_trainer_a_point_in_time_training_set(tables):
    source, entities = tables
    fg = feature_group(source)
    ds = kiln_dataset(job_spec(entities), fg)
    assert ds["featureGroup"]["schemaDigest"].startswith("sha256:")
    data = load_dataset(parse_dataset(ds))
    # customer 3's row has no value within the lookback: dropped, not trained on as a zero
    assert data.num_samples == 4 and data.feature_names == ["orders", "spend_log"]
    expected = np.array(
        [[1, np.log1p(0.0)], [5, np.log1p(9.0)], [2, np.log1p(1.0)], [7, np.log1p(99.0)]], dtype=np.float32
    )
    np.testing.assert_allclose(data.features, expected, rtol=1e-6)
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert data.name == "featuregroup:ml/activity"


def test_a_changed_definition_is_refused(tables):
    source, entities = tables
    ds = kiln_dataset(job_spec(entities), feature_group(source))
    ds["featureGroup"]["spec"]["features"][0]["dtype"] = "float64"  # not what was resolved
    with pytest.raises(UsageError, match="schema digest"):
        load_dataset(parse_dataset(ds))


def test_entity_table_without_the_timestamp_column_names_it(tables, tmp_path):
    source, _ = tables
    bad = write_source(tmp_path / "bad.parquet", {"customer_id": [1], "churned": [1]})
    ds = kiln_dataset(job_spec(bad), feature_group(source))
    with pytest.raises(UsageError, match="as_of"):
        load_dataset(parse_dataset(ds))


def test_blocker_names_a_missing_or_invalid_feature_group(tables):
    source, entities = tables
    spec = job_spec(entities)
    assert build.feature_group_blocker(spec, None)[0] == "FeatureGroupNotFound"
    broken = feature_group(source)
    broken["spec"]["features"] = []
    reason, message = build.feature_group_blocker(spec, broken)
    assert reason == "FeatureGroupInvalid" and "features" in message
    assert build.feature_group_blocker(spec, feature_group(source)) is None
