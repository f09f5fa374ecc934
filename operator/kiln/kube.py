"""A thin layer over the Kubernetes REST API, on the official client's ``ApiClient``.

Paths come from a fixed table of the kinds Kiln reads and writes, so no discovery round-trips
are needed. Writes of children use server-side apply with field manager ``kiln``
(https://kubernetes.io/docs/reference/using-api/server-side-apply/); status writes use JSON
merge patches on the ``status`` subresource guarded by ``resourceVersion`` (optimistic
concurrency: the API server answers 409 Conflict when the object changed), computed and sent by
:func:`kiln.status.write_status`, the one status-write path (:func:`patch_status` is its transport).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from kiln import API_VERSION, FIELD_MANAGER
from kiln.metrics import API_REQUESTS

#: (apiVersion, kind) -> plural resource name, for every kind Kiln touches.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Pod"): "pods",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Event"): "events",
    ("v1", "Namespace"): "namespaces",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "CronJob"): "cronjobs",
    ("batch/v1", "Job"): "jobs",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproutes",
    # Gateway API Inference Extension (LLM InferenceServices, see kiln.resources.llm)
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepools",
    ("scheduling.k8s.io/v1", "PriorityClass"): "priorityclasses",
    # Kueue (TrainingJobs queued with kueue.x-k8s.io/queue-name, see kiln.queueing)
    ("kueue.x-k8s.io/v1beta2", "Workload"): "workloads",
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): "resourceflavors",
    ("kueue.x-k8s.io/v1beta2", "WorkloadPriorityClass"): "workloadpriorityclasses",
    (API_VERSION, "Model"): "models",
    (API_VERSION, "TrainingJob"): "trainingjobs",
    (API_VERSION, "InferenceService"): "inferenceservices",
    (API_VERSION, "FeatureGroup"): "featuregroups",
}


class Conflict(Exception):
    """The object changed since it was read (HTTP 409); re-read and retry."""


class Gone(LookupError):
    """The object was deleted since it was read (HTTP 404)."""


#: HTTP statuses with which the API server refuses to store an object: 422 Invalid (schema,
#: name rules), 403 Forbidden (PodSecurity admission, ResourceQuota, RBAC, a webhook's denial).
REJECTED_STATUSES = (403, 422)


class Rejected(ApiException):
    """The API server refused to store a child object (see :data:`REJECTED_STATUSES`).

    Writing it again cannot succeed until something changes (the parent's spec, the namespace's
    quota or policy), so callers report it on the parent and back off. ``kind``, ``name`` and
    ``namespace`` name the child; ``message`` is the server's ``Status`` message.
    """

    def __init__(self, manifest: dict[str, Any], error: ApiException) -> None:
        super().__init__(status=error.status, reason=error.reason, body=error.body)
        self.headers = error.headers
        meta = manifest.get("metadata") or {}
        self.kind = str(manifest.get("kind"))
        self.name = str(meta.get("name"))
        self.namespace = meta.get("namespace")
        self.message = server_message(error)

    def __str__(self) -> str:
        return f"{self.kind} {self.name} rejected by the API server ({self.status} {self.reason}): {self.message}"


def server_message(e: ApiException) -> str:
    """The ``message`` of the API server's ``Status`` body, else the HTTP reason."""
    try:
        message = json.loads(e.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or e.reason or e.status)


def path(
    api_version: str,
    kind: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """REST path of a collection or object, e.g. ``/api/v1/namespaces/ns/pods/p``.

    Raises:
        KeyError: for a kind not in :data:`PLURALS`.
    """
    plural = PLURALS[(api_version, kind)]
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    p = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        p += f"/{name}"
        if subresource:
            p += f"/{subresource}"
    return p


def request(
    api: k8s.ApiClient,
    method: str,
    url: str,
    *,
    body: Any = None,
    query: list[tuple[str, Any]] | None = None,
    content_type: str | None = None,
    verb: str | None = None,
) -> Any:
    """One REST call; returns the decoded JSON body (None when empty).

    ``verb`` is the ``kiln_api_requests_total`` label when it is not the HTTP method: the API
    server's own verbs (``LIST`` for a collection GET, ``APPLY`` for a server-side apply PATCH),
    as ``apiserver_request_total`` counts them.

    Uses the generated client's own request pipeline (``param_serialize`` -> ``call_api``), so
    authentication, TLS and retries are the client's.

    Raises:
        kubernetes.client.rest.ApiException: for any non-2xx answer.
    """
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    method, full_url, headers, body, post = api.param_serialize(
        method, url, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"]
    )
    resp = api.call_api(method, full_url, header_params=headers, body=body, post_params=post)
    data = resp.read()
    API_REQUESTS.labels(verb or method, str(resp.status)).inc()
    if not 200 <= resp.status < 300:
        raise ApiException(http_resp=resp)
    return json.loads(data) if data else None


def _status(e: ApiException) -> int:
    return int(e.status or 0)


def get(
    api: k8s.ApiClient, api_version: str, kind: str, namespace: str | None, name: str
) -> dict[str, Any] | None:
    """The object, or None when it does not exist."""
    try:
        return request(api, "GET", path(api_version, kind, namespace, name))
    except ApiException as e:
        if _status(e) == 404:
            return None
        raise


def list_objects(
    api: k8s.ApiClient, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
) -> list[dict[str, Any]]:
    """Every object of a kind in ``namespace`` (all namespaces when None) matching the selector."""
    query = [("labelSelector", label_selector)] if label_selector else []
    out = request(api, "GET", path(api_version, kind, namespace), query=query, verb="LIST")
    items: list[dict[str, Any]] = out.get("items", [])
    for it in items:  # list items carry no apiVersion/kind
        it.setdefault("apiVersion", api_version)
        it.setdefault("kind", kind)
    return items


def apply(api: k8s.ApiClient, manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
    """Server-side apply ``manifest`` as field manager ``kiln``; returns the object as stored.

    Raises:
        Rejected: the API server refused the object (422, 403).
    """
    meta = manifest["metadata"]
    url = path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
    query = [("fieldManager", FIELD_MANAGER)] + ([("force", "true")] if force else [])
    try:
        return request(
            api,
            "PATCH",
            url,
            body=manifest,
            query=query,
            content_type="application/apply-patch+yaml",
            verb="APPLY",
        )
    except ApiException as e:
        if _status(e) in REJECTED_STATUSES:
            raise Rejected(manifest, e) from e
        raise


def covers(live: Any, desired: Any) -> bool:
    """Whether ``live`` already has every field ``desired`` sets, with the same value.

    The test behind "apply only what changed": a server-side apply of ``desired`` over such a
    ``live`` object would change nothing we own, so the request can be skipped. It is
    apimachinery's ``equality.Semantic.DeepDerivative`` on JSON: maps compare the keys
    ``desired`` has (extra keys in ``live``, such as defaults and other managers' fields, are
    ignored); lists must have the same length and cover element by element; a ``None`` in
    ``desired`` needs the key absent or null; other values compare with ``==``. A value the
    server normalizes (``cpu: 1000m`` stored as ``"1"``) reads as a difference, which only costs
    the apply that would have been sent anyway; a field someone else changed is a difference too,
    so drift is still corrected.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return False
        return all(
            live.get(k) is None if v is None else (k in live and covers(live[k], v))
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return isinstance(live, list) and len(live) == len(desired) and all(map(covers, live, desired))
    return bool(live == desired) and type(live) is type(desired)


def create(api: k8s.ApiClient, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Create ``manifest``; None when an object of that name already exists (409).

    Raises:
        Rejected: the API server refused the object (422, 403).
    """
    meta = manifest["metadata"]
    try:
        return request(
            api,
            "POST",
            path(manifest["apiVersion"], manifest["kind"], meta.get("namespace")),
            body=manifest,
            query=[("fieldManager", FIELD_MANAGER)],
        )
    except ApiException as e:
        if _status(e) == 409:
            return None
        if _status(e) in REJECTED_STATUSES:
            raise Rejected(manifest, e) from e
        raise


def delete(
    api: k8s.ApiClient,
    api_version: str,
    kind: str,
    namespace: str | None,
    name: str,
    *,
    uid: str | None = None,
    propagation: str = "Background",
    grace_period_seconds: int | None = None,
) -> bool:
    """Delete an object; with ``uid`` only that incarnation. Returns False when already gone."""
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
    if uid:
        body["preconditions"] = {"uid": uid}
    if grace_period_seconds is not None:
        body["gracePeriodSeconds"] = grace_period_seconds
    try:
        request(api, "DELETE", path(api_version, kind, namespace, name), body=body)
        return True
    except ApiException as e:
        if _status(e) in (404, 409):  # gone, or a different incarnation (uid precondition)
            return False
        raise


def patch_status(
    api: k8s.ApiClient, obj: dict[str, Any], status: dict[str, Any], *, resource_version: str | None = None
) -> dict[str, Any]:
    """JSON-merge-patch ``status`` into ``obj``'s status subresource (the transport of
    :func:`kiln.status.write_status`; controllers call that, never this).

    With ``resource_version`` the patch applies only if the object is unchanged since then.

    Raises:
        Conflict: the resourceVersion precondition failed.
        Gone: the object no longer exists.
    """
    meta = obj["metadata"]
    body: dict[str, Any] = {"status": status}
    if resource_version:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        return request(
            api,
            "PATCH",
            path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"], "status"),
            body=body,
            content_type="application/merge-patch+json",
        )
    except ApiException as e:
        if _status(e) == 409:
            raise Conflict(str(e.reason)) from e
        if _status(e) == 404:
            raise Gone(f"{obj['kind']} {meta.get('namespace')}/{meta['name']}") from e
        raise


def patch(
    api: k8s.ApiClient, api_version: str, kind: str, namespace: str | None, name: str, body: dict[str, Any]
) -> dict[str, Any]:
    """JSON-merge-patch an object's main resource (e.g. spec of a kiln.dev object)."""
    return request(
        api,
        "PATCH",
        path(api_version, kind, namespace, name),
        body=body,
        content_type="application/merge-patch+json",
    )


def iter_errors(e: ApiException) -> Iterator[str]:
    """Field-level causes of an API error (e.g. a 422 from schema validation), for messages."""
    try:
        details = json.loads(e.body or "{}").get("details", {})
    except ValueError:
        return
    for cause in details.get("causes", []):
        yield f"{cause.get('field', '')}: {cause.get('message', '')}"
