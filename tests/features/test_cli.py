"""``kiln features get-online`` / ``get-historical`` (with ``-f``, no cluster) and the entry point's
Job interface: the environment, the termination log, ``--end now``, ``validate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from kiln.cli import main
from kiln.features import materialize

from .helpers import at, ts, view, write_source

REPO = Path(__file__).resolve().parents[2]


def _source(tmp_path: Path) -> Path:
    return write_source(
        tmp_path / "activity.parquet",
        {
            "customer_id": [1, 2, 1, 2],
            "event_timestamp": ts(1, 2, 3, 4),
            "orders": [10, 20, 11, 21],
            "spend": [1.0, 2.0, 3.0, 4.0],
        },
    )


def _manifest(tmp_path: Path, v) -> Path:  # type: ignore[no-untyped-def]
    obj = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "FeatureGroup",
        "metadata": {"name": v.name, "namespace": v.namespace},
        "spec": v.spec.to_api(),
    }
    path = tmp_path / "fg.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


def test_get_online_prints_values_and_statuses(redis_server, tmp_path, capsys):
    v = view(_source(tmp_path), max_age=10**9)
    materialize(v, redis_server.client(), at(0), at(5))
    fg = _manifest(tmp_path, v)
    code = main(["features", "get-online", "activity", "-f", str(fg), "-n", "test", "--redis", redis_server.address,
                 "-e", "customer_id=1", "--entity", "customer_id=3"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["entity"] == {"customer_id": "1"} and out[0]["values"]["orders"] == 11
    assert out[0]["statuses"] == {"orders": "PRESENT", "spend_log": "PRESENT"}
    assert out[0]["eventTimestamp"] == "2024-01-01T03:00:00Z"
    assert set(out[1]["statuses"].values()) == {"NOT_FOUND"}
    # a bad entity argument is a clear error, not a traceback
    assert (
        main(
            ["features", "get-online", "activity", "-f", str(fg), "--redis", redis_server.address, "-e", "42"]
        )
        == 1
    )
    assert "key=value" in capsys.readouterr().err


def test_get_historical_writes_the_point_in_time_join(tmp_path, capsys):
    v = view(_source(tmp_path))
    fg = _manifest(tmp_path, v)
    entities = tmp_path / "entities.parquet"
    pq.write_table(
        pa.table({"customer_id": [1, 2, 1], "event_timestamp": ts(2.5, 2.5, 0.5), "label": [0, 1, 0]}),
        entities,
    )
    out = tmp_path / "train.parquet"
    assert (
        main(
            [
                "features",
                "get-historical",
                "activity",
                "-f",
                str(fg),
                "--entities",
                str(entities),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    rows = pq.read_table(out).to_pylist()
    assert [r["orders"] for r in rows] == [10, 20, None]  # never a value from the future
    assert [r["label"] for r in rows] == [0, 1, 0]
    assert main(["features", "get-historical", "activity", "-f", str(fg), "--entities", str(entities)]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0].startswith('"customer_id","event_timestamp","label","orders"')
    )


def _entry(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln.features", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "operator"), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        timeout=120,
    )


def test_entry_point_reads_the_job_environment_and_writes_the_termination_log(redis_server, tmp_path):
    v = view(_source(tmp_path))
    obj = {"metadata": {"name": v.name, "namespace": v.namespace}, "spec": v.spec.to_api()}
    obj["spec"]["online"]["store"]["address"] = redis_server.address
    log = tmp_path / "termination-log"
    env = {
        "KILN_FEATURE_GROUP": json.dumps(obj),
        "KILN_TERMINATION_LOG": str(log),
        "JOB_COMPLETION_INDEX": "1",
    }
    r = _entry(["materialize", "--start", "2024-01-01T00:00:00Z", "--end", "now", "--windows", "2"], env)
    assert r.returncode == 0, r.stderr
    result = json.loads(log.read_text())
    assert result == json.loads(r.stdout) and result["index"] == 1 and result["windowCount"] == 2
    assert result["rowsWritten"] == 0  # window 1 of [2024, now) holds no event
    # an empty range succeeds without moving anything
    r = _entry(["materialize", "--start", "2030-01-01T00:00:00Z", "--end", "2029-01-01T00:00:00Z"], env)
    assert r.returncode == 0 and json.loads(log.read_text())["watermark"] == "2030-01-01T00:00:00.000000Z"
    # validate: the columns, or the missing one by name (exit 1)
    assert (
        _entry(["validate"], env).returncode == 0 and "customer_id" in json.loads(log.read_text())["columns"]
    )
    obj["spec"]["features"][0]["name"] = "returns"
    r = _entry(["validate"], {**env, "KILN_FEATURE_GROUP": json.dumps(obj)})
    error = json.loads(log.read_text())["error"]
    assert r.returncode == 1 and error["reason"] == "ColumnMissing" and error["column"] == "returns"
    # an invalid FeatureGroup is a permanent failure, with a reason
    r = _entry(["validate"], {**env, "KILN_FEATURE_GROUP": '{"metadata": {"name": "x"}, "spec": {}}'})
    assert r.returncode == 1 and json.loads(log.read_text())["error"]["reason"] == "InvalidSpec"
