"""DriftMonitor: the window holds the last rows served, the numbers are drift of exactly those,
the gauges carry them (or say "no reference"), and nothing on the request path can fail."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kiln.monitoring import drift
from kiln.monitoring.drift import Sample
from kiln.monitoring.monitor import DriftMonitor, DriftSettings
from kiln.monitoring.profile import PROFILE_FILE, Profile, build_profile

LABELS = {"model": "digits", "version": "7", "namespace": "team-a"}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), np.eye(10, dtype=np.float32)[d.target]


def _profile(rows: int = 1400) -> Profile:
    x, logits = _digits()
    return build_profile({"input-0": x[:rows]}, {"output-0": logits[:rows]})


def _monitor(profile: Profile | None, registry: CollectorRegistry | None = None, **settings) -> DriftMonitor:
    return DriftMonitor(profile, settings=DriftSettings(**settings), registry=registry, **LABELS)


def _series(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _serve(m: DriftMonitor, x: np.ndarray, logits: np.ndarray, sizes: list[int]) -> int:
    """Observe x/logits in batches of the given sizes (cycled); returns the rows sent."""
    i = k = 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        m.observe({"input-0": x[i : i + n]}, {"output-0": logits[i : i + n]})
        i, k = i + n, k + 1
    return len(x)


def test_the_numbers_are_drift_of_exactly_the_last_window_rows() -> None:
    profile = _profile()
    x, logits = _digits()
    served_x, served_logits = 16.0 - x[1400:], logits[1400:]  # inverted digits: drift
    m = _monitor(profile, window_rows=300, min_rows=10)
    _serve(m, served_x, served_logits, [1, 32, 7, 301, 5])  # wraps around; one batch > window
    report = m.compute()
    last_x, last_pred = served_x[-300:].astype(np.float64), served_logits[-300:].argmax(1)
    assert report.window_rows == 300
    for f, got in zip(profile.features, report.features, strict=True):
        ref, cur = f.sample(), Sample.of(last_x[:, f.index])
        want = drift.score(ref, cur, True)
        assert (got.method, got.score, got.drifted) == (want.method, want.score, want.drifted), f.name
        assert got.psi == drift.psi(ref, cur, True) and got.rows == 300 and got.missing == 0
    assert profile.prediction is not None and report.prediction is not None
    want = drift.score(profile.prediction.sample(), Sample.of(last_pred), False)
    assert (report.prediction.method, report.prediction.score) == (want.method, want.score)
    assert report.drift_share is not None and report.drift_share > 0.5  # inverted images drift


def test_a_small_reference_uses_ks_batched_and_equal_to_one_by_one() -> None:
    rng = np.random.default_rng(4)
    profile = build_profile(rng.normal(size=(600, 3)), rng.normal(size=(600, 4)))
    m = _monitor(profile, window_rows=400, min_rows=10)
    served = rng.normal([0.0, 0.3, 2.0], 1.0, size=(500, 3))
    m.observe({"input-0": served}, {"output-0": rng.normal(size=(500, 4))})
    report = m.compute()
    for f, got in zip(profile.features, report.features, strict=True):
        p = drift.ks_2samp(f.sample(), Sample.of(served[-400:, f.index]))[1]
        assert (got.method, got.score, got.drifted) == ("ks", p, p <= 0.05)
    assert [f.drifted for f in report.features] == [False, True, True]
    assert report.prediction is not None and report.prediction.method == "chisquare"


def test_gauges_carry_scores_verdicts_and_psi_with_model_labels() -> None:
    registry = CollectorRegistry()
    x, logits = _digits()
    m = _monitor(_profile(), registry, window_rows=397, min_rows=10)
    _serve(m, 16.0 - x[1400:], logits[1400:], [32])
    m.compute()
    s = _series(registry)
    assert s["kiln_drift_reference_present"] == [(LABELS, 1.0)]
    assert s["kiln_drift_window_rows"] == [(LABELS, 397.0)]
    assert s["kiln_drift_observed_rows_total"] == [(LABELS, 397.0)]
    feature = {(lb["feature"], lb["method"]): v for lb, v in s["kiln_feature_drift"]}
    assert all({k: lb[k] for k in LABELS} == LABELS for lb, _ in s["kiln_feature_drift"])
    r = m.report
    for f in r.features:
        assert feature[(f.name, f.method)] == f.score and feature[(f.name, "psi")] == f.psi
    detected = {lb["feature"]: v for lb, v in s["kiln_drift_detected"]}
    assert detected == {f.name: float(f.drifted) for f in r.features}
    assert {lb["method"] for lb, _ in s["kiln_prediction_drift"]} == {"jensenshannon", "psi"}
    assert s["kiln_drift_share"] == [(LABELS, r.drift_share)]
    assert s["kiln_drift_computation_seconds"][0][1] > 0


def test_traffic_like_the_training_data_does_not_drift() -> None:
    x, logits = _digits()
    order = np.random.default_rng(0).permutation(len(x))  # the file is in writer order: shuffle
    x, logits = x[order], logits[order]
    for reference_rows in (1000, 1200):  # K-S, then Wasserstein / Jensen-Shannon
        profile = build_profile({"input-0": x[:reference_rows]}, {"output-0": logits[:reference_rows]})
        m = _monitor(profile, window_rows=500, min_rows=10)
        _serve(m, x[reference_rows:], logits[reference_rows:], [64])
        r = m.compute()
        assert r.drift_share is not None and r.drift_share < 0.1, reference_rows
        assert r.prediction is not None and r.prediction.drifted is False


def test_no_reference_is_a_value_a_dashboard_shows_and_nothing_else(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    m = DriftMonitor.from_artifact(tmp_path, registry=registry, **LABELS)
    x, logits = _digits()
    m.observe({"input-0": x[:50]}, {"output-0": logits[:50]})
    m.start()  # nothing to compute: no thread
    assert m.compute().reference is False
    s = _series(registry)
    assert s["kiln_drift_reference_present"] == [(LABELS, 0.0)]
    assert not {
        "kiln_feature_drift",
        "kiln_drift_detected",
        "kiln_prediction_drift",
        "kiln_drift_share",
    } & set(s)
    snap = m.snapshot()
    assert snap["reference"] is False and "no reference profile" in snap["reason"] and snap["features"] == []
    m.stop()


def test_an_invalid_profile_is_reported_as_no_reference_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / PROFILE_FILE).write_text('{"schemaVersion": 1}')
    m = DriftMonitor.from_artifact(tmp_path, **LABELS)
    assert m.report.reference is False and "invalid" in m.snapshot()["reason"]
    (tmp_path / PROFILE_FILE).write_bytes(_profile().to_json())
    assert DriftMonitor.from_artifact(tmp_path, **LABELS).report.reference is True


def test_disabled_monitoring_records_nothing() -> None:
    m = _monitor(_profile(), enabled=False)
    assert m.report.reference is False and "disabled" in m.snapshot()["reason"]


def test_batches_that_do_not_fit_the_profile_are_skipped_never_raised() -> None:
    registry = CollectorRegistry()
    m = _monitor(_profile(), registry, min_rows=1)
    x, logits = _digits()
    bad = [
        {},  # the input is missing
        {"input-0": x[:5, :10]},  # 10 numbers per row, not 64
        {"input-0": x[:5].tolist()},  # not an array
        {"input-0": np.float32(3.0)},  # no batch dimension
    ]
    for inputs in bad:
        m.observe(inputs, {"output-0": logits[:5]})
    m.observe(None, None)  # type: ignore[arg-type]  # garbage: counted, not raised
    m.observe({"input-0": x[:3].reshape(3, 8, 8)}, {"output-0": logits[:2]})  # 8x8 rows fit; outputs do not
    assert _series(registry)["kiln_drift_skipped_batches_total"] == [(LABELS, 4.0)]
    r = m.compute()
    assert r.window_rows == 3 and r.features[10].rows == 3
    assert r.prediction is not None and r.prediction.rows == 0 and "no finite values" in r.prediction.reason


def test_nan_inputs_are_dropped_and_counted_and_few_rows_give_no_numbers() -> None:
    registry = CollectorRegistry()
    m = _monitor(_profile(), registry, min_rows=50)
    x, logits = _digits()
    batch = x[1400:1440].copy()
    batch[::4, 5] = np.nan
    m.observe({"input-0": batch}, {"output-0": logits[1400:1440]})
    r = m.compute()
    assert r.features == () and "40 rows" in r.reason and "kiln_feature_drift" not in _series(registry)
    m.observe({"input-0": x[1440:1460]}, {"output-0": logits[1440:1460]})
    r = m.compute()
    assert (r.features[5].rows, r.features[5].missing) == (50, 10) and r.features[6].rows == 60


def test_snapshot_is_strict_json_with_histograms() -> None:
    x, logits = _digits()
    m = _monitor(_profile(), window_rows=200, min_rows=10)
    _serve(m, x[1400:], logits[1400:], [16])
    m.compute()
    snap = json.loads(json.dumps(m.snapshot(), allow_nan=False))
    assert (
        snap["windowRows"] == 200 and snap["observedRows"] == 397 and snap["settings"]["window_rows"] == 200
    )
    f = snap["features"][20]
    q = f["quantiles"]
    assert sum(q["current"]) + q["outside"] == f["rows"] == 200 and len(q["reference"]) == len(q["edges"]) - 1
    assert {"method", "score", "threshold", "drifted", "psi"} <= set(f)


def test_the_background_thread_computes_every_period_and_stops() -> None:
    x, logits = _digits()
    m = _monitor(_profile(), window_rows=100, min_rows=10, period_seconds=0.05)
    m.start()
    try:
        m.observe({"input-0": x[1400:1500]}, {"output-0": logits[1400:1500]})
        deadline = time.monotonic() + 30
        while not m.report.features and time.monotonic() < deadline:
            time.sleep(0.02)
        assert m.report.features and m.report.window_rows == 100
        first = m.report.computed_at
        while m.report.computed_at == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert m.report.computed_at > first  # again, a period later
    finally:
        m.stop()
    assert m._thread is None


def test_settings_from_the_environment() -> None:
    assert DriftSettings.from_env({}) == DriftSettings()
    s = DriftSettings.from_env(
        {
            "KILN_DRIFT_ENABLED": "false",
            "KILN_DRIFT_WINDOW_ROWS": "5000",
            "KILN_DRIFT_PERIOD_SECONDS": "2.5",
            "KILN_DRIFT_MIN_ROWS": "10",
        }
    )
    assert s == DriftSettings(enabled=False, window_rows=5000, period_seconds=2.5, min_rows=10)
    for env, name in [
        ({"KILN_DRIFT_WINDOW_ROWS": "20000"}, "KILN_DRIFT_WINDOW_ROWS"),
        ({"KILN_DRIFT_WINDOW_ROWS": "ten"}, "KILN_DRIFT_WINDOW_ROWS"),
        ({"KILN_DRIFT_MIN_ROWS": "2000"}, "KILN_DRIFT_MIN_ROWS"),
        ({"KILN_DRIFT_PERIOD_SECONDS": "0"}, "KILN_DRIFT_PERIOD_SECONDS"),
        ({"KILN_DRIFT_ENABLED": "maybe"}, "KILN_DRIFT_ENABLED"),
    ]:
        with pytest.raises(ValueError, match=name):
            DriftSettings.from_env(env)
