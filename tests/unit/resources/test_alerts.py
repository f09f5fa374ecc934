"""The PrometheusRule of an InferenceService (kiln.resources.alerts, inferenceservice.prometheus_rule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kiln import kube
from kiln.api.inferenceservice import Alerts, InferenceServiceSpec
from kiln.resources import alerts
from kiln.resources import inferenceservice as build
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden"
DIGEST = "sha256:" + "ab" * 32
ISVC: dict[str, Any] = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "digits", "namespace": "ml", "uid": "0c8e6a1e-1111-2222-3333-444455556666"},
}
ALERTS: dict[str, Any] = {
    "labels": {"release": "prometheus"},
    "windowSeconds": 120,
    "latency": [
        {"percentile": 99, "thresholdSeconds": 0.5, "forSeconds": 60, "severity": "critical"},
        {"percentile": 95, "thresholdSeconds": 0.25},
    ],
    "errorRatio": {"threshold": 0.05, "forSeconds": 120, "severity": "critical"},
    "drift": [{"method": "psi", "threshold": 0.2, "forSeconds": 600}],
    "driftShare": {"forSeconds": 900, "severity": "critical"},
}


def spec(**monitoring: Any) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(
        {"modelRef": {"name": "digits", "stage": "Production"}, "runtime": {"image": "kiln/server:dev"}}
        | {"monitoring": monitoring}
    )


def rules(rule: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (group,) = rule["spec"]["groups"]
    return {r.get("record") or f"{r['alert']}/{sorted(r['labels'].items())}": r for r in group["rules"]}


def test_prometheus_rule_golden():
    rule = build.prometheus_rule(ISVC, spec(alerts=ALERTS))
    assert_golden(GOLDEN, "inferenceservice-prometheusrule", rule)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["metadata"]["labels"][build.LABEL_ISVC] == "digits"
    assert rule["metadata"]["ownerReferences"][0]["uid"] == ISVC["metadata"]["uid"]


def test_recording_rules_aggregate_pods_and_protocols_per_version():
    by = rules(build.prometheus_rule(ISVC, spec(alerts={})))
    p99 = by["kiln:inference_request_duration_seconds:p99"]
    assert p99["expr"] == (
        "histogram_quantile(0.99, sum by (namespace, model, version, le) "
        '(rate(kiln_inference_request_duration_seconds_bucket{namespace="ml",service=~"digits(-stable|-canary)?"}[300s])))'
    )
    assert p99["labels"] == {"inferenceservice": "digits"}
    ratio = by["kiln:inference_requests:error_ratio"]["expr"]
    assert 'code=~"5.."' in ratio and " * 0) / " in ratio
    # No alert configured: the recording rules only.
    assert all("record" in r for r in by.values()) and len(by) == 3


def test_alerts_read_the_recording_rules_of_this_service_only():
    by = rules(build.prometheus_rule(ISVC, spec(alerts=ALERTS)))
    lat = by[
        "KilnInferenceLatencyHigh/[('inferenceservice', 'digits'), ('percentile', '99'), ('severity', 'critical')]"
    ]
    assert lat["expr"] == (
        'kiln:inference_request_duration_seconds:p99{namespace="ml",inferenceservice="digits"} > 0.5'
    )
    assert lat["for"] == "60s"
    err = by["KilnInferenceErrorRatioHigh/[('inferenceservice', 'digits'), ('severity', 'critical')]"]
    assert (
        err["expr"] == 'kiln:inference_requests:error_ratio{namespace="ml",inferenceservice="digits"} > 0.05'
    )
    drift = by[
        "KilnFeatureDrift/[('inferenceservice', 'digits'), ('method', 'psi'), ('severity', 'warning')]"
    ]
    assert drift["expr"] == (
        "avg by (namespace, model, version, feature, method) "
        '(kiln_feature_drift{namespace="ml",service=~"digits(-stable|-canary)?",method="psi"}) > 0.2'
    )
    assert drift["for"] == "600s"
    share = by["KilnDatasetDrift/[('inferenceservice', 'digits'), ('severity', 'critical')]"]
    assert share["expr"] == (
        'avg by (namespace, model, version) (kiln_drift_share{namespace="ml",service=~"digits(-stable|-canary)?"}) >= 0.5'
    )
    assert "$value" in drift["annotations"]["description"]


def test_no_rule_without_alerts_and_rule_is_a_child_kind():
    kinds = {o["kind"] for o in build.children(ISVC, spec(), stable=(1, "u", DIGEST), stable_replicas=1)}
    assert "PrometheusRule" not in kinds
    kinds = {
        o["kind"] for o in build.children(ISVC, spec(alerts={}), stable=(1, "u", DIGEST), stable_replicas=1)
    }
    assert "PrometheusRule" in kinds
    assert ("monitoring.coreos.com/v1", "PrometheusRule") in build.CHILD_KINDS
    assert all(k in kube.PLURALS for k in build.CHILD_KINDS)  # the controller lists each kind


@pytest.mark.parametrize(
    "bad",
    [
        {"latency": [{"percentile": 90, "thresholdSeconds": 1}]},
        {"latency": [{"percentile": 99, "thresholdSeconds": 0}]},
        {"latency": [{"percentile": 99, "thresholdSeconds": 1}, {"percentile": 99, "thresholdSeconds": 2}]},
        {"errorRatio": {"threshold": 1.5}},
        {"drift": [{"method": "PSI", "threshold": 0.2}]},
        {"drift": [{"method": "ks", "threshold": 0.05}]},  # a p-value: it falls with drift
        {"driftShare": {"threshold": 0}},
        {"drift": [{"method": "psi", "threshold": 0.2}, {"method": "psi", "threshold": 0.3}]},
        {"errorRatio": {"threshold": 0.1, "severity": "Page me"}},
        {"windowSeconds": 1},
    ],
)
def test_invalid_alerts_are_refused(bad: dict[str, Any]):
    with pytest.raises(ValidationError):
        Alerts.model_validate(bad)


def test_selector_matches_every_scraped_service():
    assert alerts.selector("ns", "a", 'method="psi"') == (
        '{namespace="ns",service=~"a(-stable|-canary)?",method="psi"}'
    )
