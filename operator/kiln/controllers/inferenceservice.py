"""InferenceService controller (skeleton; the full reconcile lands with issue 6)."""

from __future__ import annotations

from kubernetes import client as k8s

from kiln import API_VERSION
from kiln.controllers.runtime import ReconcileFn, Result, watch

KIND = "InferenceService"
watch(KIND, API_VERSION, "inferenceservices")


def reconcile(api: k8s.ApiClient, namespace: str, name: str) -> Result | None:
    """Placeholder reconcile: does nothing until the controller is complete."""
    return None


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    return lambda ns, name: reconcile(api, ns, name)
