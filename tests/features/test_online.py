"""Materialization into a real Redis, online lookup, and their agreement with point-in-time retrieval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from kiln.features import (
    OnlineStoreError,
    get_historical_features,
    get_online_features,
    materialize,
    online,
)
from kiln.features.materialization import split_windows

from .helpers import at, ts, view, write_source

REPO = Path(__file__).resolve().parents[2]
FEATURES = [
    {"name": "orders", "dtype": "int64"},
    {"name": "spend_log", "dtype": "float32", "transformation": {"type": "Log1p", "column": "spend"}},
    {"name": "spend_z", "dtype": "float64", "transformation": {"type": "Standardize", "column": "spend", "mean": 3.5, "std": 2.25}},
    {"name": "spend_clip", "dtype": "float32", "transformation": {"type": "Clip", "column": "spend", "max": 4.0}},
    {"name": "vip", "dtype": "bool"},
    {"name": "segment", "dtype": "string"},
]  # fmt: skip


@pytest.fixture
def source(tmp_path):
    n = 60  # 20 customers x 3 events over 48 h, one null
    return write_source(
        tmp_path / "activity.parquet",
        {
            "customer_id": [i % 20 for i in range(n)],
            "event_timestamp": ts(*[(i * 0.8) for i in range(n)]),
            "orders": [i if i != 45 else None for i in range(n)],
            "spend": [i * 0.37 for i in range(n)],
            "vip": [i % 3 == 0 for i in range(n)],
            "segment": [f"s{i % 4}" for i in range(n)],
        },
    )


def _state(client) -> dict[str, dict[bytes, bytes]]:
    return {k.decode(): client.hgetall(k) for k in client.scan_iter("kiln:fg:*")}


def test_online_equals_point_in_time(redis_server, source):
    """The skew test: after materialization, an online lookup at time T equals the point-in-time
    retrieval at T (same transformations, same dtypes, same nulls)."""
    v = view(source, features=FEATURES, lookback=86400, max_age=86400)
    client = redis_server.client()
    result = materialize(v, client, at(0), at(48), chunk_seconds=7 * 3600)
    assert result.rows_sent >= 20 and result.windows == 7 and result.watermark == at(48)
    entities = [{"customer_id": i} for i in range(22)]  # 20 and 21 do not exist
    rows = get_online_features(client, v, entities, now=at(48))
    hist = get_historical_features(
        v, pa.table({"customer_id": list(range(22)), "event_timestamp": ts(*[48] * 22)})
    ).to_pylist()
    for row, h in zip(rows, hist, strict=True):
        assert row.values == {f["name"]: h[f["name"]] for f in FEATURES}, row.entity
    assert rows[5].statuses["orders"] == "NULL_VALUE"  # customer 5's last row (i=45) has no orders
    assert rows[0].complete and rows[20].statuses["orders"] == "NOT_FOUND"
    assert rows[0].values["spend_clip"] == 4.0


def test_max_age_enforced_at_read(redis_server, source):
    v = view(source, max_age=3600)
    client = redis_server.client()
    materialize(v, client, at(0), at(48))
    last = get_online_features(client, v, [{"customer_id": "19"}], now=at(48))[0]  # "19": coerced
    assert last.event_timestamp == at(59 * 0.8)
    fresh = get_online_features(client, v, [{"customer_id": 19}], now=at(59 * 0.8 + 1))[0]
    stale = get_online_features(client, v, [{"customer_id": 19}], now=at(59 * 0.8 + 1.001))[0]
    assert fresh.complete and fresh.values["orders"] == 59
    assert stale.values == {"orders": None, "spend_log": None}
    assert set(stale.statuses.values()) == {"OUTSIDE_MAX_AGE"}
    # the caller may ask for a longer age than the spec's
    again = get_online_features(client, v, [{"customer_id": 19}], now=at(100), max_age_seconds=10**6)[0]
    assert again.values["orders"] == 59


def test_rerun_and_out_of_order_windows_are_idempotent(redis_server, source):
    v = view(source)
    client = redis_server.client()
    materialize(v, client, at(0), at(48))
    once = _state(client)
    assert len(once) == 20
    materialize(v, client, at(0), at(48))
    assert _state(client) == once
    client.flushall()
    for start, end in reversed(split_windows(at(0), at(48), 5)):  # newest first
        r = materialize(v, client, start, end)
        assert r.rows_sent > 0
    assert _state(client) == once
    # an older window replayed after the newer ones writes nothing
    assert materialize(v, client, at(0), at(10)).rows_written == 0


def test_schema_change_is_not_served_old_values(redis_server, source):
    v = view(source)
    client = redis_server.client()
    materialize(v, client, at(0), at(48))
    changed = view(source, features=[{"name": "orders", "dtype": "int64"}, {"name": "spend_log", "dtype": "float64", "transformation": {"type": "Log1p", "column": "spend"}}])  # fmt: skip
    assert changed.key_prefix != v.key_prefix
    row = get_online_features(client, changed, [{"customer_id": 1}], now=at(48))[0]
    assert set(row.statuses.values()) == {"NOT_FOUND"}


def test_redis_down_fails_and_keeps_no_watermark(redis_server, source):
    v = view(source)
    client = online.connect(redis_server.address, socket_timeout=1)
    redis_server.stop()
    with pytest.raises(OnlineStoreError) as e:
        materialize(v, client, at(0), at(48))
    assert e.value.reason == "OnlineStoreUnavailable" and e.value.transient
    with pytest.raises(OnlineStoreError):
        get_online_features(client, v, [{"customer_id": 1}])


def _cli(obj, *args):
    return subprocess.run(
        [sys.executable, "-m", "kiln.features", "materialize", "--feature-group", json.dumps(obj), *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "operator"), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )


def test_cli_indexed_windows_and_failure(redis_server, source, tmp_path):
    v = view(source)
    obj = {"metadata": {"name": v.name, "namespace": v.namespace}, "spec": v.spec.to_api()}
    common = ["--start", "2024-01-01T00:00:00Z", "--end", "2024-01-03T00:00:00Z", "--windows", "3"]
    for index in (2, 0, 1):
        r = _cli(obj, *common, "--index", str(index), "--redis", redis_server.address)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        # every customer's latest row is in the last window: the earlier ones write nobody
        assert out["index"] == index and out["rowsSent"] == (20 if index == 2 else 0)
    assert out["start"] == "2024-01-01T16:00:00.000000Z" and out["watermark"] == "2024-01-02T08:00:00.000000Z"
    client = redis_server.client()
    whole = _state(client)
    client.flushall()
    materialize(v, client, at(0), at(48))
    assert _state(client) == whole

    redis_server.stop()
    r = _cli(obj, *common, "--index", "0", "--redis", redis_server.address)
    assert r.returncode == 3 and "watermark" not in r.stdout
    assert json.loads(r.stdout)["error"]["reason"] == "OnlineStoreUnavailable"
    redis_server.start()
    (tmp_path / "activity.parquet").unlink()
    r = _cli(obj, *common, "--redis", redis_server.address)
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["reason"] == "SourceNotFound"
