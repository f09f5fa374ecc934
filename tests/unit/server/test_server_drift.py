"""Drift monitoring in kiln-serve: the artifact's reference profile, the served traffic, the gauges."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from kiln.monitoring.profile import PROFILE_FILE, build_profile

from .conftest import MODEL_NAME


def infer(url: str, rows: np.ndarray) -> None:
    body = {
        "inputs": [
            {"name": "input-0", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}
        ]
    }
    req = urllib.request.Request(
        f"{url}/v2/models/{MODEL_NAME}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.fixture
def profile_dir(tmp_path: Path, digits_artifact, loaded_model) -> Path:
    """A reference profile of the digits as the trainer writes one (inputs and predicted classes)."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)[:1400]
    logits = loaded_model.predict({"input-0": x})["output-0"]
    (tmp_path / PROFILE_FILE).write_bytes(build_profile({"input-0": x}, {"output-0": logits}).to_json())
    return tmp_path


@pytest.mark.parametrize(("inverted", "drifted"), [(False, False), (True, True)])
def test_served_traffic_is_compared_with_the_reference(
    make_server, digits_artifact, profile_dir, monkeypatch, inverted, drifted
):
    monkeypatch.setenv("KILN_DRIFT_MIN_ROWS", "50")
    server = make_server(profile_dir=profile_dir)
    rows = digits_artifact.x_test[:300]
    if inverted:
        rows = (16.0 - rows).astype(np.float32)  # the demo's "inverted digits"
    for chunk in np.array_split(rows, 30):
        infer(server.url, chunk)
    report = server.server.core.drift.compute()
    assert report.reference and report.window_rows == 300
    share = report.drift_share
    assert share is not None and ((share > 0.5) if drifted else (share < 0.2)), share
    assert report.prediction is not None and report.prediction.drifted is drifted

    metrics = get(server.metrics_url)
    present = next(x for x in metrics.splitlines() if x.startswith("kiln_drift_reference_present"))
    assert present.endswith(" 1.0")
    assert sum(x.startswith("kiln_feature_drift{") for x in metrics.splitlines()) >= 64
    snapshot = json.loads(get(server.metrics_url.replace("/metrics", "/debug/drift")))
    assert snapshot["windowRows"] == 300 and snapshot["reference"] is True
    assert (snapshot["driftShare"] > 0.5) is drifted


def test_no_reference_is_a_state_not_an_error(make_server, tmp_path):
    server = make_server(profile_dir=tmp_path)  # no profile.json
    metrics = get(server.metrics_url)
    line = next(x for x in metrics.splitlines() if x.startswith("kiln_drift_reference_present"))
    assert line.endswith(" 0.0")
    assert "kiln_feature_drift{" not in metrics


def test_every_answered_row_is_recorded_once_batched_or_cached(make_server, digits_artifact, profile_dir):
    """The forward thread records a whole batch at once; a cache hit (no forward pass) is recorded
    by itself: concurrent requests, batched together, and repeats answered from the cache each
    count their rows exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    server = make_server(profile_dir=profile_dir, cache_size=64, max_batch_delay_ms=20.0)
    drift = server.server.core.drift
    rows = digits_artifact.x_test[:96]
    with ThreadPoolExecutor(16) as pool:  # 48 requests of 2 rows, 16 at a time: batched
        list(pool.map(lambda i: infer(server.url, rows[2 * i : 2 * i + 2]), range(48)))
    batches = server.server.metrics.batch_size.collect()[0].samples
    passes = next(s.value for s in batches if s.name.endswith("_count"))
    assert passes < 48, "the concurrent requests were not batched: the test shows nothing"
    assert drift.snapshot()["observedRows"] == 96
    for _ in range(10):  # the same 2 rows again: answered from the cache
        infer(server.url, rows[:2])
    assert server.server.metrics.cache_hits._value.get() == 10
    assert drift.snapshot()["observedRows"] == 116
    assert drift.compute().window_rows == 116
