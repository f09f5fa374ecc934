"""Point-in-time retrieval (DuckDB ASOF JOIN) and source validation, on hand-built cases."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from kiln.features import EntityTableError, SourceError, get_historical_features, validate_source

from .helpers import at, ts, view, write_source


@pytest.fixture
def source(tmp_path):
    # customer 1: values at 0h, 10h, 20h; customer 2: at 5h and a tie at 30h (two rows).
    return write_source(
        tmp_path / "activity.parquet",
        {
            "customer_id": [1, 1, 1, 2, 2, 2],
            "event_timestamp": ts(0, 10, 20, 5, 30, 30),
            "orders": [1, 2, 3, 10, 20, 21],
            "spend": [0.0, math.e - 1, 9.0, 1.0, 2.0, 3.0],
        },
    )


def _get(v, rows):
    return get_historical_features(v, pa.table(rows)).to_pydict()


def test_point_in_time_join(source):
    v = view(source, lookback=12 * 3600)
    out = _get(
        v,
        {
            "customer_id": [1, 1, 1, 1, 2, 3, 1],
            "event_timestamp": ts(10, 9.99, 25, 33, 30, 10, -1),
            "label": [1, 0, 1, 0, 1, 0, 1],
        },
    )
    # exact timestamp match is included; 9.99h sees the 0h row (10h is in its future);
    # 25h sees 20h; 33h: the 20h row is older than the 12h lookback -> null; 2@30h: the tie,
    # resolved the same way every time (greatest values); unknown entity and a time before
    # any value -> null. Labels and order are kept.
    assert out["orders"] == [2, 1, 3, None, 21, None, None]
    assert out["label"] == [1, 0, 1, 0, 1, 0, 1]
    assert out["spend_log"][0] == pytest.approx(1.0)
    assert out["spend_log"][1] == 0.0
    assert out["spend_log"][2] == pytest.approx(math.log(10.0))


def test_never_a_future_value(source):
    v = view(source, lookback=10**7)
    hours = [h / 4 for h in range(0, 160)]
    out = _get(v, {"customer_id": [1] * len(hours), "event_timestamp": ts(*hours)})
    expected = [None if h < 0 else (1 if h < 10 else 2 if h < 20 else 3) for h in hours]
    assert out["orders"] == expected


def test_lookback_boundary_is_inclusive(source):
    v = view(source, lookback=3600)
    out = _get(v, {"customer_id": [1, 1], "event_timestamp": ts(11, 11.0001)})
    assert out["orders"] == [2, None]


def test_multiple_entities_and_string_keys(tmp_path):
    src = write_source(
        tmp_path / "s.parquet",
        {
            "store": ["a", "a", "b"],
            "sku": [1, 2, 1],
            "event_timestamp": ts(0, 0, 0),
            "stock": [5, 6, 7],
        },
    )
    v = view(
        src,
        entities=[{"name": "store", "dtype": "string"}, {"name": "sku", "dtype": "int32"}],
        features=[{"name": "stock", "dtype": "int32"}],
    )
    out = _get(v, {"store": ["b", "a", "a", "b"], "sku": [1, 2, 1, 2], "event_timestamp": ts(1, 1, 1, 1)})
    assert out["stock"] == [7, 6, 5, None]


def test_csv_source_and_naive_timestamps(tmp_path):
    src = write_source(
        tmp_path / "s.csv",
        {
            "customer_id": [1, 1],
            "event_timestamp": pa.array([at(0).replace(tzinfo=None), at(2).replace(tzinfo=None)]),
            "orders": [4, 5],
            "spend": [1, 2],
        },
    )
    v = view(src, fmt="csv")
    out = _get(v, {"customer_id": [1, 1], "event_timestamp": ts(1, 2)})
    assert out["orders"] == [4, 5]
    assert out["spend_log"][1] == pytest.approx(math.log(3.0), rel=1e-6)


@pytest.mark.parametrize(
    ("rows", "reason", "column"),
    [
        ({"customer_id": [1], "event_timestamp": ts(0), "spend": [1.0]}, "ColumnMissing", "orders"),
        ({"customer_id": [1], "event_timestamp": ts(0), "orders": ["x"], "spend": [1.0]}, "ColumnTypeMismatch", "orders"),
        ({"customer_id": [1], "event_timestamp": ts(0), "orders": [1], "spend": ["x"]}, "ColumnTypeMismatch", "spend"),
        ({"customer_id": ["1"], "event_timestamp": ts(0), "orders": [1], "spend": [1.0]}, "ColumnTypeMismatch", "customer_id"),
        ({"customer_id": [1], "event_timestamp": ["2024-01-01"], "orders": [1], "spend": [1.0]}, "TimestampColumnInvalid", "event_timestamp"),
        ({"customer_id": [1], "event_timestamp": [1704067200], "orders": [1], "spend": [1.0]}, "TimestampColumnInvalid", "event_timestamp"),
        ({"customer_id": [1], "orders": [1], "spend": [1.0]}, "ColumnMissing", "event_timestamp"),
    ],
)  # fmt: skip
def test_bad_source_names_the_column(tmp_path, rows, reason, column):
    v = view(write_source(tmp_path / "bad.parquet", rows))
    with pytest.raises(SourceError) as e:
        validate_source(v)
    assert (e.value.reason, e.value.column) == (reason, column)
    assert repr(column) in str(e.value)


def test_missing_and_unreadable_sources(tmp_path):
    with pytest.raises(SourceError) as e:
        validate_source(view(tmp_path / "absent.parquet"))
    assert e.value.reason == "SourceNotFound"
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError) as e:
        validate_source(view(garbage))
    assert e.value.reason == "SourceUnreadable"


def test_bad_entity_table(source):
    v = view(source)
    with pytest.raises(EntityTableError) as e:
        get_historical_features(v, pa.table({"customer_id": [1]}))
    assert e.value.column == "event_timestamp"
    with pytest.raises(EntityTableError) as e:
        get_historical_features(v, pa.table({"customer_id": [1], "event_timestamp": ["2024-01-01"]}))
    assert e.value.column == "event_timestamp"
    with pytest.raises(EntityTableError) as e:
        get_historical_features(v, pa.table({"customer_id": [1], "event_timestamp": ts(0), "orders": [1]}))
    assert e.value.column == "orders"
