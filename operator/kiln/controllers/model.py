"""Model controller (work in progress: full registry logic lands with issue 5)."""

from __future__ import annotations

from kubernetes import client as k8s

from kiln import API_VERSION
from kiln.controllers.runtime import ReconcileFn, Result, watch

KIND = "Model"
watch(KIND, API_VERSION, "models")


def reconcile(api: k8s.ApiClient, namespace: str, name: str) -> Result | None:
    """Reconcile one Model (placeholder until the registry lands)."""
    return None


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    """The work-queue reconcile function of the Model kind."""
    return lambda ns, name: reconcile(api, ns, name)
