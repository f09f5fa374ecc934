"""Prometheus metrics of the model server.

Each :class:`ServerMetrics` owns a dedicated ``CollectorRegistry`` (no global state, so several
servers can run in one test process); the process/platform/GC collectors are registered on it
too, so the ``/metrics`` page looks like the default one plus the ``kiln_`` series:

- ``kiln_inference_requests_total{model,version,protocol,code}``: infer requests by transport
  (``rest`` or ``grpc``) and HTTP status code (a gRPC call counts the HTTP status of the same
  answer over REST: 400 for INVALID_ARGUMENT, 503 for UNAVAILABLE, ...; injected 500s included);
- ``kiln_inference_request_duration_seconds{model,version,protocol}``: infer latency histogram;
- ``kiln_inference_batch_size{model,version}``: rows per forward pass (histogram);
- ``kiln_inference_inflight_requests{model,version}``: infer requests being handled;
- ``kiln_inference_cache_requests_total{model,version,result}``: cache ``hit``/``miss``;
- ``kiln_inference_injected_failures_total{model,version}`` and
  ``kiln_inference_fault_injection_rate{model,version}``: fault injection (the larger of
  ``--fail-rate`` and the artifact's ``servingFaultInjectionFailRate``), so that injected errors
  are never mistaken for real ones;
- ``kiln_model_info{model,version,digest}``: always 1, the artifact being served;
- entity-key requests (:mod:`kiln.server.features`): ``kiln_feature_lookups_total{model,version,
  feature_group,status}``, one per entity row and FeatureGroup, ``status`` PRESENT, NOT_FOUND,
  OUTSIDE_MAX_AGE (older than ``maxAgeSeconds``) or NULL_VALUE (some feature null); every
  status but PRESENT was served with a default value. ``kiln_feature_lookup_duration_seconds
  {model,version,feature_group}``: one online-store call (one round trip for the request's
  rows). ``kiln_feature_lookup_errors_total{model,version,feature_group}``: calls that failed
  (the request got 503).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Content type of the exposition format written by :meth:`ServerMetrics.render`.
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics, bound to one model name and version."""

    def __init__(
        self,
        model: str,
        version: str,
        *,
        digest: str = "",
        fail_rate: float = 0.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        mv = ("model", "version")
        self._labels = (model, version)
        self._requests = Counter(
            "kiln_inference_requests_total",
            "Inference requests by transport (rest, grpc) and HTTP status code (gRPC: the REST equivalent).",
            [*mv, "protocol", "code"],
            registry=r,
        )
        self._duration = Histogram(
            "kiln_inference_request_duration_seconds",
            "Inference request latency, from handler start to response.",
            [*mv, "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kiln_inference_batch_size", "Rows per forward pass.", mv, buckets=BATCH_BUCKETS, registry=r
        ).labels(model, version)
        self.inflight = Gauge(
            "kiln_inference_inflight_requests", "Inference requests being handled.", mv, registry=r
        ).labels(model, version)
        cache = Counter(
            "kiln_inference_cache_requests_total",
            "Response cache look-ups by result.",
            [*mv, "result"],
            registry=r,
        )
        self.cache_hits = cache.labels(model, version, "hit")
        self.cache_misses = cache.labels(model, version, "miss")
        self.injected_failures = Counter(
            "kiln_inference_injected_failures_total",
            "Inference requests answered 500 ON PURPOSE by fault injection "
            "(--fail-rate or the artifact's servingFaultInjectionFailRate); not real errors.",
            mv,
            registry=r,
        ).labels(model, version)
        Gauge(
            "kiln_inference_fault_injection_rate",
            "Fraction of inference requests failed on purpose: the larger of --fail-rate and the "
            "artifact's servingFaultInjectionFailRate; 0 in production.",
            mv,
            registry=r,
        ).labels(model, version).set(fail_rate)
        Gauge(
            "kiln_model_info", "The model artifact being served (always 1).", [*mv, "digest"], registry=r
        ).labels(model, version, digest).set(1)
        self._by_code: dict[tuple[str, int], Counter] = {}
        self._by_protocol: dict[str, Histogram] = {}
        fg = [*mv, "feature_group"]
        self._feature_lookups = Counter(
            "kiln_feature_lookups_total",
            "Entity rows looked up in the online store, by FeatureGroup and row status (PRESENT, "
            "NOT_FOUND, OUTSIDE_MAX_AGE, NULL_VALUE); all but PRESENT were served with defaults.",
            [*fg, "status"],
            registry=r,
        )
        self._feature_duration = Histogram(
            "kiln_feature_lookup_duration_seconds",
            "Latency of one online-store call (all the rows of a request, one round trip).",
            fg,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._feature_errors = Counter(
            "kiln_feature_lookup_errors_total",
            "Online-store calls that failed (the request was answered 503).",
            fg,
            registry=r,
        )

    def request_done(self, code: int, seconds: float, protocol: str = "rest") -> None:
        """Record one finished inference request.

        Args:
            code: the HTTP status of the answer (for gRPC, that of the same answer over REST).
            seconds: handler start to response.
            protocol: ``rest`` or ``grpc``.
        """
        child = self._by_code.get((protocol, code))
        if child is None:
            child = self._by_code[protocol, code] = self._requests.labels(*self._labels, protocol, str(code))
        child.inc()
        duration = self._by_protocol.get(protocol)
        if duration is None:
            duration = self._by_protocol[protocol] = self._duration.labels(*self._labels, protocol)
        duration.observe(seconds)

    def feature_lookup_done(self, feature_group: str, seconds: float, statuses: list[str]) -> None:
        """Record one online-store call: its latency and the status of each of its rows."""
        self._feature_duration.labels(*self._labels, feature_group).observe(seconds)
        for status in set(statuses):
            self._feature_lookups.labels(*self._labels, feature_group, status).inc(statuses.count(status))

    def feature_lookup_failed(self, feature_group: str) -> None:
        """Record one online-store call that failed."""
        self._feature_errors.labels(*self._labels, feature_group).inc()

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
