"""The PrometheusRule an InferenceService gets, evaluated by a REAL Prometheus.

The operator (in-process, real API server) applies the PrometheusRule for an InferenceService
with ``spec.monitoring.alerts``; the test reads it back from the API server (so it is what the
upstream PrometheusRule CRD admitted) and turns its ``spec.groups`` into a rule file as
prometheus-operator does (``hack/kilndev/prometheus.rule_file``). A real Prometheus (Debian's
package) loads it, evaluates every second and scrapes, with the target labels a ServiceMonitor
gives (``namespace``, ``service``):

- three REAL ``kiln-serve`` processes of the model, driven with traffic: version 1 healthy,
  version 2 answering half its requests 500 (``--fail-rate 0.5``), version 3 slow (a model hook
  that sleeps 300 ms per batch);
- a synthetic exporter (prometheus_client, in this process) with the drift gauges
  ``kiln_feature_drift`` / ``kiln_prediction_drift`` and the labels kiln-serve gives them.

The alerts must fire for exactly the version and feature that deserve it, pass through
``pending`` for their ``for``, and resolve when the drift falls back.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kiln import kube
from kiln.conditions import get_condition

from .helpers import wait_for
from .test_inferenceservice import (
    MODEL,
    ModelServer,
    Prometheus,
    Store,
    Traffic,
    _stop,
    create_isvc,
    create_model,
    free_port,
    patch_spec,
    start_prometheus,
    start_server,
    wait_status,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))
from kilndev.prometheus import rule_file  # noqa: E402

ALERTS: dict[str, Any] = {
    "labels": {"release": "prometheus"},
    "windowSeconds": 10,
    "latency": [{"percentile": 99, "thresholdSeconds": 0.2, "forSeconds": 2, "severity": "critical"}],
    "errorRatio": {"threshold": 0.1, "forSeconds": 2, "severity": "critical"},
    "drift": [{"method": "psi", "threshold": 0.2, "forSeconds": 5}],
    "driftShare": {"threshold": 0.5, "forSeconds": 1},
}
SLOW_HOOK = '''
import time


class Slow:
    """Sleeps 300 ms per batch: a slow model for the latency alert."""

    def preprocess(self, inputs):
        time.sleep(0.3)
        return inputs
'''


@dataclass
class DriftExporter:
    """The drift gauges kiln-serve exports, with values the test sets."""

    port: int
    namespace: str
    feature: Gauge
    prediction: Gauge
    share: Gauge

    def set(self, version: int, feature: str, method: str, value: float) -> None:
        self.feature.labels(MODEL, str(version), self.namespace, feature, method).set(value)


def drift_exporter(namespace: str) -> DriftExporter:
    registry = CollectorRegistry()
    labels = ["model", "version", "namespace", "feature", "method"]
    feature = Gauge("kiln_feature_drift", "Feature drift statistic.", labels, registry=registry)
    prediction = Gauge(
        "kiln_prediction_drift", "Prediction drift statistic.", [*labels[:3], "method"], registry=registry
    )
    share = Gauge("kiln_drift_share", "Share of features that drifted.", labels[:3], registry=registry)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)  # a daemon thread
    return DriftExporter(port, namespace, feature, prediction, share)


def alerts(prom: Prometheus) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{prom.address}/api/v1/alerts", timeout=5) as r:
        return list(json.loads(r.read())["data"]["alerts"])


def firing(prom: Prometheus, name: str, **labels: str) -> list[dict[str, Any]]:
    return [
        a
        for a in alerts(prom)
        if a["labels"]["alertname"] == name
        and a["state"] == "firing"
        and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


@dataclass
class Setup:
    ns: str
    rule: dict[str, Any]
    prom: Prometheus
    drift: DriftExporter


@pytest.fixture
def setup(kube, namespace, operator, tmp_path) -> Iterator[Setup]:
    api: client.ApiClient = kube
    ns = namespace
    store = Store(tmp_path / "artifacts")
    create_model(api, ns, [store.version(1)], production=1)
    create_isvc(
        api, ns, monitoring={"serviceMonitor": {"labels": {"release": "prometheus"}}, "alerts": ALERTS}
    )
    wait_status(
        api,
        ns,
        lambda s: (get_condition(s.get("conditions"), "Ready") or {}).get("status") == "True",
        message="Ready=True",
    )
    rule = kube_rule(api, ns)
    assert rule is not None, "no PrometheusRule applied"
    (tmp_path / "rules.yaml").write_text(json.dumps(rule_file(rule)))  # JSON is YAML

    (tmp_path / "slow_hook.py").write_text(SLOW_HOOK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    procs = []
    traffic: Traffic | None = None
    try:
        servers: list[ModelServer] = [
            start_server(tmp_path, store.artifact(1), 1),
            start_server(tmp_path, store.artifact(2), 2, "--fail-rate", "0.5"),
            start_server(tmp_path, store.artifact(3), 3, "--model-hook", "slow_hook:Slow", env=env),
        ]
        procs += [s.proc for s in servers]
        drift = drift_exporter(ns)
        targets = [f"127.0.0.1:{s.metrics_port}" for s in servers] + [f"127.0.0.1:{drift.port}"]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "kiln-serve",
                    # what the InferenceService's ServiceMonitor makes Prometheus add
                    "static_configs": [{"targets": targets, "labels": {"namespace": ns, "service": MODEL}}],
                }
            ],
        }
        prom = start_prometheus(tmp_path, [], config)
        procs.append(prom.proc)
        traffic = Traffic(servers)
        yield Setup(ns, rule, prom, drift)
    finally:
        if traffic is not None:
            traffic.stop()
        for p in reversed(procs):
            _stop(p)


def kube_rule(api: client.ApiClient, ns: str) -> dict[str, Any] | None:
    return kube.get(api, "monitoring.coreos.com/v1", "PrometheusRule", ns, MODEL)


def test_alerts_fire_for_the_versions_and_features_that_deserve_them(setup: Setup, kube):
    prom, d = setup.prom, setup.drift
    rule = setup.rule
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
    loaded = json.loads(urllib.request.urlopen(f"{prom.address}/api/v1/rules", timeout=5).read())
    names = {r["name"] for g in loaded["data"]["groups"] for r in g["rules"]}
    assert "kiln:inference_request_duration_seconds:p99" in names and "KilnFeatureDrift" in names

    d.set(1, "pixel-3", "psi", 0.05)  # below the threshold
    d.set(1, "pixel-7", "wasserstein", 0.9)  # no alert configured for this method
    d.prediction.labels(MODEL, "1", setup.ns, "psi").set(0.01)

    # Error ratio: version 2 (half its answers are 500s) and no other.
    wait_for(lambda: firing(prom, "KilnInferenceErrorRatioHigh"), 90, message="error-ratio alert firing")
    # Latency: version 3 (300 ms per request) and no other.
    wait_for(lambda: firing(prom, "KilnInferenceLatencyHigh"), 90, message="p99 latency alert firing")
    ratios = {
        r["metric"]["version"]: float(r["value"][1])
        for r in prom.query("kiln:inference_requests:error_ratio")
    }
    assert ratios["1"] == 0 and ratios["3"] == 0 and 0.3 < ratios["2"] < 0.7, ratios
    assert {a["labels"]["version"] for a in firing(prom, "KilnInferenceErrorRatioHigh")} == {"2"}
    fired = firing(prom, "KilnInferenceLatencyHigh")
    assert {a["labels"]["version"] for a in fired} == {"3"}
    assert fired[0]["labels"]["severity"] == "critical" and fired[0]["labels"]["inferenceservice"] == MODEL
    p99 = {
        r["metric"]["version"]: float(r["value"][1])
        for r in prom.query("kiln:inference_request_duration_seconds:p99")
    }
    assert p99["3"] > 0.2 and p99["1"] < 0.2, p99

    # Drift: feature pixel-5 of version 1 crosses the PSI threshold: pending for `for`, then firing.
    seen: list[str] = []

    def drift_state() -> bool:
        states = [
            a["state"]
            for a in alerts(prom)
            if a["labels"]["alertname"] == "KilnFeatureDrift" and a["labels"].get("feature") == "pixel-5"
        ]
        if states and (not seen or seen[-1] != states[0]):
            seen.append(states[0])
        return "firing" in states

    started = time.monotonic()
    d.set(1, "pixel-5", "psi", 0.45)
    wait_for(drift_state, 60, interval=0.2, message="feature drift alert firing")
    assert seen[0] == "pending" and seen[-1] == "firing", seen
    assert time.monotonic() - started >= 5  # its `for`
    (alert,) = firing(prom, "KilnFeatureDrift")
    assert alert["labels"]["method"] == "psi" and alert["labels"]["version"] == "1"
    assert not firing(prom, "KilnPredictionDrift")

    # Dataset drift: half the features drifted (Evidently's rule: share >= 0.5).
    d.share.labels(MODEL, "1", setup.ns).set(0.25)
    d.share.labels(MODEL, "2", setup.ns).set(0.5)
    wait_for(lambda: firing(prom, "KilnDatasetDrift"), 30, interval=0.2, message="dataset drift firing")
    assert {a["labels"]["version"] for a in firing(prom, "KilnDatasetDrift")} == {"2"}

    # ... and resolves when the drift falls back.
    d.set(1, "pixel-5", "psi", 0.1)
    wait_for(lambda: not firing(prom, "KilnFeatureDrift"), 30, interval=0.2, message="drift alert resolved")
    # the healthy version never alerted
    assert not [
        a
        for a in alerts(prom)
        if a["labels"].get("version") == "1" and a["labels"]["alertname"] != "KilnFeatureDrift"
    ]

    # No alerts configured any more: the PrometheusRule is deleted.
    patch_spec(kube, setup.ns, {"monitoring": {"alerts": None}})
    wait_for(lambda: kube_rule(kube, setup.ns) is None, 30, message="PrometheusRule deleted")
