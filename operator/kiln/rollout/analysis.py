"""Metric analysis of a canary (pure): query templating and evaluation of query results.

Semantics follow Argo Rollouts' AnalysisRun (https://argo-rollouts.readthedocs.io/en/stable/features/analysis/),
simplified to one bound per metric:

- a *measurement* runs every metric's query once; each metric result is ``Successful``,
  ``Failed`` (value outside ``min``/``max``), ``Inconclusive`` (no data under
  ``noDataPolicy: Inconclusive``) or ``Error`` (Prometheus unreachable, bad query, several series);
- the measurement as a whole is ``Failed`` if any metric failed, else ``Inconclusive`` if any
  metric was inconclusive or errored, else ``Successful``;
- the rollout rolls back once more than ``failureLimit`` measurements failed, and pauses (never
  aborts) once more than ``inconclusiveLimit`` measurements in a row were inconclusive.

Unlike Argo (whose ``consecutiveErrorLimit`` aborts the rollout), an *error* counts as
inconclusive: a Prometheus outage says nothing about the canary, so it neither promotes nor rolls
back; it pauses the rollout with a condition saying why.

"No data" is an empty query result, or NaN (e.g. an error ratio ``0/0`` when no request came
in): what it means is ``noDataPolicy``'s choice. Low-traffic models should use ``Inconclusive``
(the default): the measurement is retried at the next interval and the step does not advance.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from kiln.api.inferenceservice import AnalysisMetric, MetricResult, NoDataPolicy

SUCCESSFUL, FAILED, INCONCLUSIVE, ERROR = "Successful", "Failed", "Inconclusive", "Error"

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render_query(query: str, variables: Mapping[str, str]) -> str:
    """Substitute ``{{name}}`` placeholders (spaces inside the braces allowed).

    Args:
        query: PromQL with placeholders, e.g. ``rate(x{version="{{version}}"}[1m])``.
        variables: e.g. ``{"version": "3", "namespace": "ml", "service": "digits"}``.
    Raises:
        KeyError: a placeholder has no variable (the message names it and the known ones).
    """

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in variables:
            raise KeyError(f"unknown placeholder {{{{{key}}}}}; known: {', '.join(sorted(variables))}")
        return variables[key]

    return _PLACEHOLDER.sub(sub, query)


def evaluate_metric(
    metric: AnalysisMetric,
    values: Sequence[float] | None,
    no_data_policy: str,
    *,
    error: str | None = None,
) -> MetricResult:
    """Judge one metric's query result.

    Args:
        metric: the metric and its bounds (``max``: fails when the value is above; ``min``: fails
            when below; both inclusive bounds, as in ``value <= max``).
        values: one number per returned series (an instant vector's samples or a scalar); None
            when the query could not run (then ``error`` says why).
        no_data_policy: ``Fail``, ``Inconclusive`` or ``Pass``: what an empty result or NaN means.
        error: why the query could not run.
    Returns:
        A :class:`MetricResult` with phase, value (when there is one) and a message.
    """
    if error is not None or values is None:
        return MetricResult(name=metric.name, phase=ERROR, message=(error or "query did not run")[:1024])
    if len(values) > 1:
        return MetricResult(
            name=metric.name,
            phase=ERROR,
            message=f"query returned {len(values)} series, want one: aggregate it (e.g. sum(...))",
        )
    value = values[0] if values else None
    if value is None or math.isnan(value):
        what = "no data (empty result)" if value is None else "no data (NaN)"
        if no_data_policy == NoDataPolicy.FAIL:
            return MetricResult(name=metric.name, phase=FAILED, message=f"{what}; noDataPolicy is Fail")
        if no_data_policy == NoDataPolicy.PASS:
            return MetricResult(name=metric.name, phase=SUCCESSFUL, message=f"{what}; noDataPolicy is Pass")
        return MetricResult(
            name=metric.name, phase=INCONCLUSIVE, message=f"{what}; retried at the next interval"
        )
    if metric.max is not None and value > metric.max:
        return MetricResult(
            name=metric.name, value=value, phase=FAILED, message=f"{value:g} > max {metric.max:g}"
        )
    if metric.min is not None and value < metric.min:
        return MetricResult(
            name=metric.name, value=value, phase=FAILED, message=f"{value:g} < min {metric.min:g}"
        )
    return MetricResult(name=metric.name, value=value, phase=SUCCESSFUL, message="within bounds")


def summarize(results: Sequence[MetricResult]) -> str:
    """Phase of a whole measurement: Failed > Inconclusive (incl. Error) > Successful.

    An empty measurement (no metrics) is ``Inconclusive``.
    """
    phases = {r.phase for r in results}
    if FAILED in phases:
        return FAILED
    if not results or INCONCLUSIVE in phases or ERROR in phases:
        return INCONCLUSIVE
    return SUCCESSFUL


def describe(results: Sequence[MetricResult]) -> str:
    """One line for conditions and events, e.g. ``error-rate=0.5 (0.5 > max 0.05); p99=...``."""
    parts = []
    for r in results:
        shown = f"{r.value:g}" if r.value is not None else "-"
        parts.append(f"{r.name}={shown} {r.phase}" + (f" ({r.message})" if r.message else ""))
    return "; ".join(parts)
