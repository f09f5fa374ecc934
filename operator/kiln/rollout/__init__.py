"""Canary rollouts guarded by Prometheus metrics.

- :mod:`kiln.rollout.replicas`: traffic weights -> replica counts (pure).
- :mod:`kiln.rollout.analysis`: query templating and metric evaluation (pure).
- :mod:`kiln.rollout.machine`: the rollout state machine, a pure function of
  (spec, status, observed state, measurement, now).
- :mod:`kiln.rollout.prometheus`: a small Prometheus HTTP API client (standard library only).
"""

from kiln.rollout.analysis import evaluate_metric, render_query, summarize
from kiln.rollout.machine import Action, Decision, Measurement, Observed, Plan, analysis_due, decide
from kiln.rollout.prometheus import PrometheusClient, PrometheusError
from kiln.rollout.replicas import canary_replicas, replica_split

__all__ = [
    "Action",
    "Decision",
    "Measurement",
    "Observed",
    "Plan",
    "PrometheusClient",
    "PrometheusError",
    "analysis_due",
    "canary_replicas",
    "decide",
    "evaluate_metric",
    "render_query",
    "replica_split",
    "summarize",
]
