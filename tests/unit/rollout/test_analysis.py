"""Metric evaluation, noDataPolicy, query templating and replica rounding."""

from __future__ import annotations

import math
import socket

import pytest

from kiln.api.inferenceservice import AnalysisMetric, MetricResult
from kiln.rollout.analysis import describe, evaluate_metric, render_query, summarize
from kiln.rollout.prometheus import PrometheusClient, PrometheusError, parse_result
from kiln.rollout.replicas import canary_replicas, replica_split

MAX = AnalysisMetric(name="error-rate", query="q", max=0.05)
MIN = AnalysisMetric(name="success-rate", query="q", min=0.99)
BOTH = AnalysisMetric(name="latency", query="q", min=0.0, max=0.25)


@pytest.mark.parametrize(
    ("metric", "values", "policy", "phase"),
    [
        (MAX, [0.01], "Inconclusive", "Successful"),
        (MAX, [0.05], "Inconclusive", "Successful"),  # bounds are inclusive
        (MAX, [0.06], "Inconclusive", "Failed"),
        (MAX, [math.inf], "Inconclusive", "Failed"),  # x/0 with errors
        (MIN, [0.999], "Inconclusive", "Successful"),
        (MIN, [0.5], "Inconclusive", "Failed"),
        (BOTH, [-1.0], "Inconclusive", "Failed"),
        (BOTH, [1.0], "Inconclusive", "Failed"),
        (BOTH, [0.1], "Inconclusive", "Successful"),
        # no data: empty vector or NaN (0/0 when nothing was requested)
        (MAX, [], "Inconclusive", "Inconclusive"),
        (MAX, [math.nan], "Inconclusive", "Inconclusive"),
        (MAX, [], "Fail", "Failed"),
        (MAX, [math.nan], "Fail", "Failed"),
        (MAX, [], "Pass", "Successful"),
        (MAX, [math.nan], "Pass", "Successful"),
        # several series: the query must aggregate
        (MAX, [0.01, 0.02], "Pass", "Error"),
    ],
)
def test_evaluate_metric(metric, values, policy, phase):
    r = evaluate_metric(metric, values, policy)
    assert r.phase == phase and r.name == metric.name
    assert r.message
    if phase in ("Successful", "Failed") and values and not math.isnan(values[0]):
        assert r.value == values[0]


def test_query_error_is_an_error_result():
    r = evaluate_metric(MAX, None, "Pass", error="Prometheus unreachable")
    assert r.phase == "Error" and r.value is None and "unreachable" in (r.message or "")


@pytest.mark.parametrize(
    ("phases", "overall"),
    [
        (["Successful", "Successful"], "Successful"),
        (["Successful", "Failed"], "Failed"),
        (["Inconclusive", "Failed"], "Failed"),
        (["Successful", "Inconclusive"], "Inconclusive"),
        (["Successful", "Error"], "Inconclusive"),
        ([], "Inconclusive"),
    ],
)
def test_summarize(phases, overall):
    assert summarize([MetricResult(name=f"m{i}", phase=p) for i, p in enumerate(phases)]) == overall


def test_describe():
    text = describe([MetricResult(name="e", value=0.5, phase="Failed", message="0.5 > max 0.05")])
    assert text == "e=0.5 Failed (0.5 > max 0.05)"


def test_render_query():
    q = 'sum(rate(x{namespace="{{namespace}}",version="{{ version }}"}[1m])) / {{service}}'
    assert render_query(q, {"namespace": "ml", "version": "3", "service": "s"}) == (
        'sum(rate(x{namespace="ml",version="3"}[1m])) / s'
    )
    assert render_query("up{}", {}) == "up{}"  # PromQL braces are not placeholders
    with pytest.raises(KeyError, match="unknown placeholder"):
        render_query("{{nope}}", {"version": "1"})


@pytest.mark.parametrize(
    ("total", "weight", "canary"),
    [
        (5, 0, 0),
        (5, 1, 1),  # min 1 when weight > 0
        (5, 20, 1),
        (5, 21, 2),  # ceil(1.05)
        (5, 50, 3),  # ceil(2.5)
        (5, 100, 5),
        (10, 10, 1),
        (10, 33, 4),  # ceil(3.3)
        (1, 20, 1),
        (0, 50, 0),  # scaled to zero: no canary pods
        (3, 150, 3),  # clamped
    ],
)
def test_canary_replicas(total, weight, canary):
    assert canary_replicas(total, weight) == canary


@pytest.mark.parametrize(
    ("total", "target", "granted", "ratio", "kw", "stable", "canary", "share"),
    [
        (5, 20, 0, True, {}, 5, 1, 17),  # not granted yet: stable not reduced (surge), 1/(1+5)
        (5, 20, 20, True, {}, 4, 1, 20),
        (5, 50, 20, True, {}, 4, 3, 43),  # scaling to the next step: 3 canary pods (all Ready) vs 4
        (5, 50, 50, True, {}, 2, 3, 60),
        (5, 100, 100, True, {}, 0, 5, 100),
        (1, 20, 20, True, {}, 1, 1, 50),  # stable never below 1 under 100%
        (10, 10, 10, True, {}, 9, 1, 10),
        (5, 50, 50, True, {"promoting": True}, 5, 3, 38),
        (5, 50, 50, True, {"autoscaled": True}, None, 3, 38),
        (5, 50, 20, True, {"canary_ready": 1}, 4, 3, 20),  # only Ready pods take traffic
        (5, 50, 20, False, {}, 5, 3, 20),  # GatewayAPI: the route weight
        (5, 50, 50, False, {"autoscaled": True}, None, 3, 50),
    ],
)
def test_replica_split(total, target, granted, ratio, kw, stable, canary, share):
    s = replica_split(total, target, granted, replica_ratio=ratio, **kw)
    assert (s.stable, s.canary, s.canary_share) == (stable, canary, share)


def test_parse_result():
    vector = {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "0.25"]}]}
    assert parse_result(vector) == [0.25]
    assert parse_result({"resultType": "vector", "result": []}) == []
    assert parse_result({"resultType": "scalar", "result": [1.0, "+Inf"]}) == [math.inf]
    assert math.isnan(parse_result({"resultType": "scalar", "result": [1.0, "NaN"]})[0])
    with pytest.raises(PrometheusError, match="matrix"):
        parse_result({"resultType": "matrix", "result": []})
    with pytest.raises(PrometheusError, match="malformed"):
        parse_result({"resultType": "vector", "result": [{"metric": {}}]})


def test_unreachable_prometheus_is_a_prometheus_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PrometheusError, match="unreachable"):
        PrometheusClient(f"http://127.0.0.1:{port}/", timeout=2).query("up")
