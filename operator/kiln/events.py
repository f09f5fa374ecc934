"""Kubernetes Events for transitions (core/v1 Event, as ``kubectl describe`` shows them)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from kiln import kube
from kiln.conditions import rfc3339

log = logging.getLogger("kiln.events")
NORMAL, WARNING = "Normal", "Warning"


def record(api: k8s.ApiClient, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event about ``obj``; failures are logged, never raised (events are best effort)."""
    meta = obj["metadata"]
    now = rfc3339()
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "kiln-operator"},
        "reportingComponent": "kiln.dev/operator",
        "reportingInstance": "kiln-operator",
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
    try:
        kube.create(api, event)
    except ApiException as e:  # pragma: no cover - best effort
        log.warning("could not post event %s on %s: %s", reason, meta["name"], e.reason)
