"""Canned analysis queries (``spec.rollout.analysis.metrics[].template``), pure.

A template is PromQL with the same ``{{namespace}}`` / ``{{version}}`` placeholders as a user's
``query`` (:func:`kiln.rollout.analysis.render_query` fills them), so the rollout machine treats
both alike. The LLM templates read the engine's own metrics as vLLM exports them
(``vllm/v1/metrics/loggers.py`` of vLLM 0.32), which carry neither ``namespace`` nor
``version``: the InferenceService's ServiceMonitor adds both as target labels (``version`` from
the pod label ``kiln.dev/model-version``, see :func:`kiln.resources.inferenceservice.service_monitor`).

- ``TimeToFirstTokenP95``: p95 of ``vllm:time_to_first_token_seconds`` (seconds from the
  request's arrival to its first output token: queueing plus prefill);
- ``InterTokenLatencyP95``: p95 of ``vllm:inter_token_latency_seconds`` (seconds between two
  output tokens of a request: the decode pace a streaming client sees);
- ``LLMErrorRatio``: the share of the OpenAI API's answers (``/v1/...`` handlers) that were 5xx,
  from ``http_requests_total`` (prometheus-fastapi-instrumentator, status grouped as ``5xx``).
  4xx (prompt over the context length, bad sampling parameters) are the caller's errors and do
  not count.

Each is computed over :data:`WINDOW` and across the canary's pods. With no request in the window
the histogram quantiles are NaN and the ratio is empty, which the analysis counts as no data
(``noDataPolicy``).
"""

from __future__ import annotations

from kiln.api.inferenceservice import AnalysisMetric, MetricTemplate

#: Rate window of the templates (PromQL duration).
WINDOW = "2m"
#: The series selector every template filters by.
_SELECTOR = 'namespace="{{namespace}}",version="{{version}}"'


def _quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{_SELECTOR}}}[{WINDOW}])))"


#: PromQL of each template.
QUERIES: dict[MetricTemplate, str] = {
    MetricTemplate.TIME_TO_FIRST_TOKEN_P95: _quantile(0.95, "vllm:time_to_first_token_seconds"),
    MetricTemplate.INTER_TOKEN_LATENCY_P95: _quantile(0.95, "vllm:inter_token_latency_seconds"),
    # `or vector(0)`: a healthy engine has no 5xx series at all, which is 0 errors, not "no data"
    MetricTemplate.LLM_ERROR_RATIO: (
        f'(sum(rate(http_requests_total{{{_SELECTOR},handler=~"/v1/.*",status="5xx"}}[{WINDOW}])) or vector(0))'
        f' / sum(rate(http_requests_total{{{_SELECTOR},handler=~"/v1/.*"}}[{WINDOW}]))'
    ),
}


def query_of(metric: AnalysisMetric) -> str:
    """The PromQL of ``metric``: its ``query``, else its ``template``'s (placeholders unfilled)."""
    if metric.query is not None:
        return metric.query
    assert metric.template is not None  # the model requires one of the two
    return QUERIES[metric.template]
