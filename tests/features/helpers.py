"""Builders for feature-store tests: a FeatureView over a Parquet/CSV file written by the test."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from kiln.features import FeatureView

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def at(hours: float) -> dt.datetime:
    """T0 plus ``hours``."""
    return T0 + dt.timedelta(hours=hours)


def write_source(path: Path, rows: dict[str, list[Any]], schema: pa.Schema | None = None) -> Path:
    table = pa.table(rows, schema=schema)
    if path.suffix == ".csv":
        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path, row_group_size=1000)
    return path


def view(source: Path, *, fmt: str = "parquet", lookback: int = 86400, max_age: int = 86400,
         features: list[dict[str, Any]] | None = None, entities: list[dict[str, Any]] | None = None,
         name: str = "activity") -> FeatureView:  # fmt: skip
    obj = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "FeatureGroup",
        "metadata": {"name": name, "namespace": "test"},
        "spec": {
            "entities": entities or [{"name": "customer_id", "dtype": "int64"}],
            "features": features
            or [
                {"name": "orders", "dtype": "int64"},
                {
                    "name": "spend_log",
                    "dtype": "float32",
                    "transformation": {"type": "Log1p", "column": "spend"},
                },
            ],
            "source": {"uri": source.as_uri(), "format": fmt, "timestampField": "event_timestamp"},
            "offline": {"lookbackSeconds": lookback},
            "online": {"enabled": True, "store": {"address": "127.0.0.1:1"}, "maxAgeSeconds": max_age},
        },
    }
    return FeatureView.from_object(obj)


def ts(*hours: float) -> pa.Array:
    return pa.array([at(h) for h in hours], pa.timestamp("us", tz="UTC"))
