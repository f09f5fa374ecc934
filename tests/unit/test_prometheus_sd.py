"""hack/kilndev/prometheus.py: ServiceMonitor -> Prometheus scrape configuration (no cluster)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))

from kiln.api.inferenceservice import InferenceServiceSpec
from kiln.resources.inferenceservice import prometheus_rule, service_monitor
from kilndev.prometheus import (
    UnsupportedServiceMonitor,
    config,
    rule_file,
    rule_file_name,
    sanitize_label_name,
    scrape_configs,
    selects,
)


def monitor(**spec) -> dict:
    base = {
        "selector": {"matchLabels": {"app": "x"}},
        "endpoints": [{"port": "metrics", "interval": "2s"}],
    }
    return {"metadata": {"name": "m", "namespace": "ns"}, "spec": {**base, **spec}}


def rule(job: dict, target: str) -> dict:
    return next(r for r in job["relabel_configs"] if r.get("target_label") == target)


def test_the_generated_servicemonitor_becomes_one_job_keeping_its_services_and_port() -> None:
    isvc = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "digits", "namespace": "demo", "uid": "u1"},
    }
    spec = InferenceServiceSpec.model_validate(
        {"modelRef": {"name": "digits", "stage": "Production"}, "runtime": {"image": "i"}}
    )
    sm = service_monitor(isvc, spec)
    [job] = scrape_configs(sm, kubeconfig="/k")
    assert job["job_name"] == "serviceMonitor/demo/digits/0"
    sd = job["kubernetes_sd_configs"][0]
    assert sd == {"role": "endpointslice", "namespaces": {"names": ["demo"]}, "kubeconfig_file": "/k"}
    keeps = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert {
        "action": "keep",
        "source_labels": [
            "__meta_kubernetes_service_label_kiln_dev_inferenceservice",
            "__meta_kubernetes_service_labelpresent_kiln_dev_inferenceservice",
        ],
        "regex": "(digits);true",
    } in keeps
    assert {
        "action": "keep",
        "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
        "regex": "metrics",
    } in keeps
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == f"{spec.monitoring.service_monitor.interval_seconds}s"
    assert rule(job, "namespace")["source_labels"] == ["__meta_kubernetes_namespace"]
    assert rule(job, "pod")["source_labels"] == ["__meta_kubernetes_pod_name"]
    assert rule(job, "job")["source_labels"] == ["__meta_kubernetes_service_name"]


def test_endpoints_role_uses_the_endpoint_port_label() -> None:
    [job] = scrape_configs(monitor(), role="endpoints")
    assert job["kubernetes_sd_configs"][0]["role"] == "endpoints"
    assert any(
        r.get("source_labels") == ["__meta_kubernetes_endpoint_port_name"] for r in job["relabel_configs"]
    )
    with pytest.raises(ValueError):
        scrape_configs(monitor(), role="pod")


def test_match_expressions() -> None:
    sel = {
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a", "b.c"]},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ]
    }
    [job] = scrape_configs(monitor(selector=sel))
    rules = job["relabel_configs"]
    assert {"action": "keep", "regex": r"(a|b\.c);true"}.items() <= next(
        r for r in rules if "__meta_kubernetes_service_label_tier" in r.get("source_labels", [])
    ).items()
    assert (
        next(r for r in rules if "__meta_kubernetes_service_label_env" in r.get("source_labels", []))[
            "action"
        ]
        == "drop"
    )
    assert {
        "action": "keep",
        "source_labels": ["__meta_kubernetes_service_labelpresent_team"],
        "regex": "true",
    } in rules
    assert {
        "action": "drop",
        "source_labels": ["__meta_kubernetes_service_labelpresent_legacy"],
        "regex": "true",
    } in rules


def test_namespace_selector_any_discovers_everywhere_and_matchnames_narrows() -> None:
    [job] = scrape_configs(monitor(namespaceSelector={"any": True}))
    assert "namespaces" not in job["kubernetes_sd_configs"][0]
    [job] = scrape_configs(monitor(namespaceSelector={"matchNames": ["a", "b"]}))
    assert job["kubernetes_sd_configs"][0]["namespaces"] == {"names": ["a", "b"]}
    [job] = scrape_configs(monitor())
    assert job["kubernetes_sd_configs"][0]["namespaces"] == {"names": ["ns"]}


def test_endpoint_relabelings_are_translated_to_snake_case() -> None:
    ep = {
        "port": "metrics",
        "relabelings": [{"sourceLabels": ["__meta_x"], "targetLabel": "x", "action": "Replace"}],
        "metricRelabelings": [{"sourceLabels": ["__name__"], "regex": "go_.*", "action": "drop"}],
    }
    [job] = scrape_configs(monitor(endpoints=[ep]))
    assert job["relabel_configs"][-1] == {
        "source_labels": ["__meta_x"],
        "target_label": "x",
        "action": "replace",
    }
    assert job["metric_relabel_configs"] == [
        {"source_labels": ["__name__"], "regex": "go_.*", "action": "drop"}
    ]


@pytest.mark.parametrize(
    "spec",
    [
        {"endpoints": [{"port": "metrics", "bearerTokenFile": "/t"}]},
        {"endpoints": [{"targetPort": 9090}]},
        {"targetLabels": ["team"]},
        {"selector": {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}},
        {"endpoints": [{"port": "m", "relabelings": [{"sourceLabels": ["a"], "bogus": 1}]}]},
    ],
)
def test_unsupported_fields_are_refused_not_ignored(spec: dict) -> None:
    with pytest.raises(UnsupportedServiceMonitor):
        scrape_configs(monitor(**spec))


def test_config_orders_jobs_and_selects_by_labels() -> None:
    a = monitor()
    b = {**monitor(), "metadata": {"name": "a", "namespace": "ns"}}
    cfg = config([a, b], scrape_interval="5s")
    assert [j["job_name"] for j in cfg["scrape_configs"]] == [
        "serviceMonitor/ns/a/0",
        "serviceMonitor/ns/m/0",
    ]
    assert cfg["global"]["scrape_interval"] == "5s"
    assert selects({"release": "prometheus"}, {"release": "prometheus", "x": "y"})
    assert not selects({"release": "prometheus"}, {"x": "y"})
    assert not selects({"release": "prometheus"}, None)
    assert sanitize_label_name("kiln.dev/model-version") == "kiln_dev_model_version"


def test_a_prometheusrule_becomes_a_rule_file_as_prometheus_operator_writes_it():
    isvc = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "digits", "namespace": "ml", "uid": "u-1"},
    }
    spec = InferenceServiceSpec.model_validate(
        {
            "modelRef": {"name": "digits", "stage": "Production"},
            "runtime": {"image": "kiln/server:dev"},
            "monitoring": {"alerts": {"errorRatio": {"threshold": 0.1}}},
        }
    )
    rule = prometheus_rule(isvc, spec) | {"metadata": {"name": "digits", "namespace": "ml", "uid": "r-1"}}
    out = rule_file(rule)
    assert out == {"groups": rule["spec"]["groups"]}
    assert [r.get("record") or r.get("alert") for r in out["groups"][0]["rules"]][
        -1
    ] == "KilnInferenceErrorRatioHigh"
    assert rule_file_name(rule) == "ml-digits-r-1.yaml"
