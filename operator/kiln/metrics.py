"""The operator's own Prometheus metrics (prometheus-client, default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_TOTAL = Counter(
    "kiln_reconcile_total",
    "Reconciles run, by kind and result (success, requeue, gone, conflict, rejected, error).",
    ["kind", "result"],
)
RECONCILE_ERRORS = Counter("kiln_reconcile_errors_total", "Reconciles that raised, by kind.", ["kind"])
RECONCILE_DURATION = Histogram(
    "kiln_reconcile_duration_seconds",
    "Wall time of one reconcile, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_DEPTH = Gauge("kiln_workqueue_depth", "Objects waiting to be reconciled, by kind.", ["kind"])
API_REQUESTS = Counter(
    "kiln_api_requests_total",
    "Requests the reconcilers sent to the API server, by verb and code.",
    ["verb", "code"],
)
STATUS_WRITES = Counter(
    "kiln_status_writes_total",
    "Status writes by kind and result: written, skipped (nothing changed), conflict (409: requeued).",
    ["kind", "result"],
)
LEADER = Gauge(
    "kiln_leader",
    "1 while this replica may reconcile (it holds the leader Lease, or runs without leader "
    "election), else 0.",
)
