"""The rules of an InferenceService's PrometheusRule (monitoring.coreos.com/v1): pure functions.

:func:`kiln.resources.inferenceservice.prometheus_rule` builds one PrometheusRule ``<name>``
per InferenceService with ``spec.monitoring.alerts``, owned by it, whose ``spec.groups`` is
:func:`rule_groups`: one rule group (rules of a group run in order, so the alerts read the values their
recording rules wrote in the same evaluation). prometheus-operator writes ``spec.groups``
unchanged into a Prometheus rule file
(https://prometheus.io/docs/prometheus/latest/configuration/recording_rules/).

Series are selected by the target labels the InferenceService's ServiceMonitor gives them:
``namespace`` and ``service`` (the Service ``<name>``, or ``<name>-stable`` / ``<name>-canary``
under GatewayAPI routing). Recording rules (names ``level:metric:operations``, Prometheus'
convention), per ``namespace, model, version``, labelled ``inferenceservice: <name>``:

- ``kiln:inference_request_duration_seconds:p95`` / ``:p99``: ``histogram_quantile`` over
  ``rate(kiln_inference_request_duration_seconds_bucket[window])`` summed by ``le`` (every
  pod and protocol of a version together);
- ``kiln:inference_requests:error_ratio``: 5xx answers over all answers in the window; 0 (not
  "no data") when a version answered requests and none failed.

Alerts (each ``for: <forSeconds>s`` with labels ``severity`` and ``inferenceservice``):
``KilnInferenceLatencyHigh`` (label ``percentile``), ``KilnInferenceErrorRatioHigh``,
``KilnFeatureDrift`` and ``KilnPredictionDrift`` (label ``method``; the drift gauges
``kiln_feature_drift`` / ``kiln_prediction_drift`` of a distance method averaged over the pods
of a version), ``KilnDatasetDrift`` (``kiln_drift_share``, the share of drifted features,
averaged likewise, at or above the threshold as Evidently's dataset drift).
"""

from __future__ import annotations

from typing import Any

from kiln.api.inferenceservice import Alerts, DriftAlert

LATENCY_RECORD = "kiln:inference_request_duration_seconds:p{percentile}"
ERROR_RATIO_RECORD = "kiln:inference_requests:error_ratio"
REQUESTS = "kiln_inference_requests_total"
DURATION_BUCKETS = "kiln_inference_request_duration_seconds_bucket"
FEATURE_DRIFT = "kiln_feature_drift"
PREDICTION_DRIFT = "kiln_prediction_drift"
DRIFT_SHARE = "kiln_drift_share"
#: What each recorded series is per: the served model version.
BY = "namespace, model, version"


def seconds(n: float) -> str:
    """A Prometheus duration of ``n`` whole seconds, e.g. ``300s``."""
    return f"{int(n)}s"


def selector(namespace: str, name: str, *matchers: str) -> str:
    """The label matchers of this InferenceService's scraped series, plus ``matchers``.

    ``service`` matches the Services its ServiceMonitor scrapes: ``<name>``, ``<name>-stable``,
    ``<name>-canary`` (Prometheus anchors the regular expression; a DNS-1035 name has no
    character to escape).
    """
    parts = [f'namespace="{namespace}"', f'service=~"{name}(-stable|-canary)?"', *matchers]
    return "{" + ",".join(parts) + "}"


def recording_rules(namespace: str, name: str, window_seconds: int) -> list[dict[str, Any]]:
    """The p95, p99 and error-ratio recording rules (see the module docstring)."""
    sel, w = selector(namespace, name), seconds(window_seconds)
    errors = selector(namespace, name, 'code=~"5.."')
    total = f"sum by ({BY}) (rate({REQUESTS}{sel}[{w}]))"
    labels = {"inferenceservice": name}
    rules: list[dict[str, Any]] = [
        {
            "record": LATENCY_RECORD.format(percentile=p),
            "expr": f"histogram_quantile({p / 100:g}, sum by ({BY}, le) (rate({DURATION_BUCKETS}{sel}[{w}])))",
            "labels": dict(labels),
        }
        for p in (95, 99)
    ]
    rules.append(
        {
            "record": ERROR_RATIO_RECORD,
            # `or total * 0`: a version with requests and no 5xx series has ratio 0, not no data.
            "expr": f"(sum by ({BY}) (rate({REQUESTS}{errors}[{w}])) or {total} * 0) / {total}",
            "labels": dict(labels),
        }
    )
    return rules


def _alert(
    alert: str,
    expr: str,
    for_seconds: int,
    severity: str,
    name: str,
    summary: str,
    subject: str = "",
    **labels: str,
) -> dict[str, Any]:
    return {
        "alert": alert,
        "expr": expr,
        "for": seconds(for_seconds),
        "labels": {"severity": severity, "inferenceservice": name, **labels},
        "annotations": {
            "summary": summary,
            "description": (
                f"{summary}{subject}: {{{{ $value }}}} for version {{{{ $labels.version }}}} of model "
                f"{{{{ $labels.model }}}} (InferenceService {{{{ $labels.namespace }}}}/{name})."
            ),
        },
    }


def _drift_alerts(namespace: str, name: str, d: DriftAlert) -> list[dict[str, Any]]:
    out = []
    sel = selector(namespace, name, f'method="{d.method}"')
    for alert, metric, by, what, subject in (
        (
            "KilnFeatureDrift",
            FEATURE_DRIFT,
            f"{BY}, feature, method",
            "feature drift",
            " (feature {{ $labels.feature }})",
        ),
        ("KilnPredictionDrift", PREDICTION_DRIFT, f"{BY}, method", "prediction drift", ""),
    ):
        expr = f"avg by ({by}) ({metric}{sel}) > {d.threshold:g}"
        summary = f"{what} ({d.method}) above {d.threshold:g}"
        out.append(_alert(alert, expr, d.for_seconds, d.severity, name, summary, subject, method=d.method))
    return out


def alerting_rules(namespace: str, name: str, alerts: Alerts) -> list[dict[str, Any]]:
    """The configured alerts, over the recording rules (latency, errors) or the drift gauges."""
    own = f'{{namespace="{namespace}",inferenceservice="{name}"}}'
    rules = []
    for lat in sorted(alerts.latency or [], key=lambda a: a.percentile):
        expr = f"{LATENCY_RECORD.format(percentile=lat.percentile)}{own} > {lat.threshold_seconds:g}"
        summary = f"p{lat.percentile} latency above {lat.threshold_seconds:g}s"
        rules.append(
            _alert(
                "KilnInferenceLatencyHigh",
                expr,
                lat.for_seconds,
                lat.severity,
                name,
                summary,
                percentile=str(lat.percentile),
            )
        )
    if (er := alerts.error_ratio) is not None:
        expr = f"{ERROR_RATIO_RECORD}{own} > {er.threshold:g}"
        summary = f"error ratio above {er.threshold:g}"
        rules.append(_alert("KilnInferenceErrorRatioHigh", expr, er.for_seconds, er.severity, name, summary))
    for d in sorted(alerts.drift or [], key=lambda a: a.method):
        rules += _drift_alerts(namespace, name, d)
    if (ds := alerts.drift_share) is not None:
        expr = f"avg by ({BY}) ({DRIFT_SHARE}{selector(namespace, name)}) >= {ds.threshold:g}"
        summary = f"share of drifted features at or above {ds.threshold:g}"
        rules.append(_alert("KilnDatasetDrift", expr, ds.for_seconds, ds.severity, name, summary))
    return rules


def rule_groups(namespace: str, name: str, alerts: Alerts) -> list[dict[str, Any]]:
    """``spec.groups`` of the PrometheusRule: one group, recording rules first, then alerts."""
    return [
        {
            "name": f"kiln.inferenceservice.{namespace}.{name}",
            "rules": recording_rules(namespace, name, alerts.window_seconds)
            + alerting_rules(namespace, name, alerts),
        }
    ]
