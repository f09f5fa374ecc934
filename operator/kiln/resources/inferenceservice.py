"""Pure builders for an InferenceService's children.

Children (all owned by the InferenceService, labelled ``kiln.dev/inferenceservice: <name>``):

- ``<name>-stable`` and ``<name>-canary`` Deployments of the model server (kiln-serve), pods
  labelled ``kiln.dev/track: stable|canary`` and ``kiln.dev/model-version: <N>``;
- Service ``<name>`` (port 80 -> ``http``, 8081 ``grpc``, 9090 ``metrics``). With ``ReplicaRatio`` routing it
  selects the pods of both tracks, so traffic splits by Ready pod counts. With ``GatewayAPI`` it
  selects the stable track only (in-cluster callers bypass the gateway), and per-track Services
  ``<name>-stable`` / ``<name>-canary`` are the HTTPRoute's weighted backends;
- ServiceMonitor ``<name>`` (monitoring.coreos.com/v1) scraping the named port ``metrics`` of
  every Service labelled ``kiln.dev/scrape: "true"`` (each pod exactly once: the shared Service
  under ReplicaRatio, the per-track Services under GatewayAPI);
- PrometheusRule ``<name>`` (monitoring.coreos.com/v1) with ``monitoring.alerts``: recording
  rules and alerts, see :mod:`kiln.resources.alerts`;
- HorizontalPodAutoscaler ``<name>`` (autoscaling/v2) on the stable Deployment, with ``autoscaling``;
- HTTPRoute ``<name>`` (gateway.networking.k8s.io/v1) with ``trafficRouting: GatewayAPI``;
- InferencePool ``<name>`` (inference.networking.k8s.io/v1) with ``runtime.llm.inferencePool``.

With an LLM engine (``runtime.engine: vllm``) the pods run vLLM's OpenAI-compatible server
instead of kiln-serve, see :mod:`kiln.resources.llm`; everything else is the same.

The server is configured through environment variables (names from ``kiln.server.settings``).
Graceful shutdown: on SIGTERM kiln-serve reports not-ready but keeps serving for
``KILN_SHUTDOWN_DELAY_SECONDS`` (so endpoints and gateways drop the pod before it stops
listening, the job a ``preStop`` sleep usually does, without needing a shell in the image), then
drains in-flight requests for up to ``KILN_DRAIN_TIMEOUT_SECONDS``;
``terminationGracePeriodSeconds`` covers both.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from kiln.api.inferenceservice import (
    GRPC_PORT,
    METRICS_PORT,
    SERVER_PORT,
    InferenceServiceSpec,
    TrafficRouting,
)
from kiln.features.schema import FeatureView
from kiln.resources import llm
from kiln.resources.alerts import rule_groups
from kiln.resources.common import child_name, owner_reference, pod_placement, standard_labels
from kiln.resources.storage import StorageDefaults, is_s3, storage_env

LABEL_ISVC = "kiln.dev/inferenceservice"
LABEL_TRACK = "kiln.dev/track"
LABEL_VERSION = "kiln.dev/model-version"
LABEL_SCRAPE = "kiln.dev/scrape"
STABLE, CANARY = "stable", "canary"
CONTAINER = "server"
SERVICE_PORT = 80
#: appProtocol of the gRPC Service port: HTTP/2 with prior knowledge (cleartext), the value Gateway
#: API implementations use to speak HTTP/2 to a backend (GEP-1911, conformance-tested); the port's
#: name ``grpc`` is what name-based protocol detection (e.g. Istio's) reads.
GRPC_APP_PROTOCOL = "kubernetes.io/h2c"
SHUTDOWN_DELAY_SECONDS = 5
DRAIN_TIMEOUT_SECONDS = 30
TERMINATION_GRACE_SECONDS = SHUTDOWN_DELAY_SECONDS + DRAIN_TIMEOUT_SECONDS + 5

#: Every (apiVersion, kind) an InferenceService may own: the controller deletes undesired ones.
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    (llm.INFERENCE_POOL_API_VERSION, "InferencePool"),
)

#: Server environment variables (must match kiln.server.settings.OPTIONS; a unit test checks).
ENV_ARTIFACT_URI = "KILN_ARTIFACT_URI"
ENV_ARTIFACT_DIGEST = "KILN_ARTIFACT_DIGEST"
ENV_MODEL_NAME = "KILN_MODEL_NAME"
ENV_MODEL_VERSION = "KILN_MODEL_VERSION"
ENV_PORT = "KILN_PORT"
ENV_GRPC_PORT = "KILN_GRPC_PORT"
ENV_METRICS_PORT = "KILN_METRICS_PORT"
ENV_MAX_BATCH_SIZE = "KILN_MAX_BATCH_SIZE"
ENV_MAX_BATCH_DELAY_MS = "KILN_MAX_BATCH_DELAY_MS"
ENV_CACHE_SIZE = "KILN_CACHE_SIZE"
ENV_SHUTDOWN_DELAY = "KILN_SHUTDOWN_DELAY_SECONDS"
ENV_DRAIN_TIMEOUT = "KILN_DRAIN_TIMEOUT_SECONDS"
ENV_MODEL_DIR = "KILN_MODEL_DIR"
ENV_FEATURE_GROUPS = "KILN_FEATURE_GROUPS"
#: Key of an online store's password in its ``online.store.secretRef`` Secret (the FeatureGroup's).
REDIS_PASSWORD_KEY = "KILN_REDIS_PASSWORD"
#: The init container fetching s3:// artifacts (KServe's name for the same job).
STORAGE_INITIALIZER = "storage-initializer"
#: emptyDir an s3:// artifact is downloaded into, and where.
MODEL_VOLUME = "model"
MODEL_DIR = "/var/lib/kiln/model"


def deployment_name(isvc: str, track: str) -> str:
    """``<isvc>-stable`` / ``<isvc>-canary``."""
    return child_name(isvc, track)


def service_name(isvc: str) -> str:
    """The Service callers use: ``<isvc>``."""
    return isvc


def track_service_name(isvc: str, track: str) -> str:
    """Per-track Service, an HTTPRoute backend (GatewayAPI routing only)."""
    return child_name(isvc, track)


def url(isvc: str, namespace: str, model: str, *, openai: bool = False) -> str:
    """In-cluster base URL of the model: ``http://<svc>.<ns>.svc.cluster.local/v2/models/<model>``,
    or with ``openai`` (an LLM engine) the OpenAI API's base URL ``http://<svc>.<ns>.svc.cluster.local/v1``
    (the ``base_url`` of the ``openai`` client; the model is named in each request)."""
    base = f"http://{service_name(isvc)}.{namespace}.svc.cluster.local"
    return f"{base}/v1" if openai else f"{base}/v2/models/{model}"


def _meta(
    isvc: dict[str, Any], name: str, component: str, extra: dict[str, str] | None = None
) -> dict[str, Any]:
    m = isvc["metadata"]
    return {
        "name": name,
        "namespace": m["namespace"],
        "labels": standard_labels(isvc, component) | {LABEL_ISVC: m["name"]} | (extra or {}),
        "ownerReferences": [owner_reference(isvc)],
    }


def feature_groups_env(groups: Sequence[FeatureView]) -> str:
    """``KILN_FEATURE_GROUPS``: the JSON list ``[{name, namespace, spec, schemaDigest}]`` kiln-serve
    reads entity-key requests with (:mod:`kiln.server.features`), in ``spec.featureGroups`` order.

    Each spec keeps only what the server reads (entities, features, source without its storage,
    online), so the variable stays small and does not change with materialization settings;
    ``schemaDigest`` is the digest of the full spec's features (the server checks it). A
    FeatureGroup whose store has a ``secretRef`` gets ``passwordEnv``: the variable
    :func:`feature_group_secret_env` fills from that Secret.
    """
    out = []
    for i, g in enumerate(groups):
        full = g.spec.to_api()
        spec: dict[str, Any] = {k: full[k] for k in ("entities", "features", "online") if k in full}
        spec["source"] = {k: v for k, v in full["source"].items() if k in ("uri", "format", "timestampField")}
        entry = {"name": g.name, "namespace": g.namespace, "spec": spec, "schemaDigest": g.digest}
        store = g.spec.online.store
        if store is not None and store.secret_ref is not None:
            entry["passwordEnv"] = f"{REDIS_PASSWORD_KEY}_{i}"
        out.append(entry)
    return json.dumps(out, separators=(",", ":"), sort_keys=True)


def feature_group_secret_env(feature_groups: str | None) -> list[dict[str, Any]]:
    """The server's password variables for ``KILN_FEATURE_GROUPS`` (:func:`feature_groups_env`):
    each ``passwordEnv`` from key ``KILN_REDIS_PASSWORD`` of its store's ``secretRef`` Secret.

    Derived from the variable's value, so a track that keeps the definitions it was deployed
    with keeps their Secrets too. Only the server container gets them (not the storage-initializer).
    """
    out = []
    for g in json.loads(feature_groups or "[]"):
        secret = ((g.get("spec", {}).get("online") or {}).get("store") or {}).get("secretRef")
        if g.get("passwordEnv") and secret:
            ref = {"name": secret["name"], "key": REDIS_PASSWORD_KEY}
            out.append({"name": g["passwordEnv"], "valueFrom": {"secretKeyRef": ref}})
    return out


def server_env(
    spec: InferenceServiceSpec,
    version: int,
    artifact_uri: str,
    digest: str,
    feature_groups: str | None = None,
) -> list[dict[str, str]]:
    """The kiln-serve environment; ``runtime.env`` entries override Kiln's by name. For an LLM
    engine, only the artifact and model variables (the storage-initializer's).

    ``feature_groups`` is the track's ``KILN_FEATURE_GROUPS`` (:func:`feature_groups_env`), or None.
    """
    rt = spec.runtime
    env = {
        ENV_ARTIFACT_URI: artifact_uri,
        ENV_ARTIFACT_DIGEST: digest,
        ENV_MODEL_NAME: spec.model_ref.name,
        ENV_MODEL_VERSION: str(version),
    }
    if rt.is_llm:  # what the storage-initializer needs; runtime.env is the engine's (kiln.resources.llm)
        return [{"name": k, "value": v} for k, v in env.items()]
    env |= {
        ENV_PORT: str(SERVER_PORT),
        ENV_GRPC_PORT: str(GRPC_PORT),
        ENV_METRICS_PORT: str(METRICS_PORT),
        ENV_MAX_BATCH_SIZE: str(rt.max_batch_size),
        ENV_MAX_BATCH_DELAY_MS: str(rt.max_batch_delay_milliseconds),
        ENV_CACHE_SIZE: str(rt.cache_size),
        ENV_SHUTDOWN_DELAY: str(SHUTDOWN_DELAY_SECONDS),
        ENV_DRAIN_TIMEOUT: str(DRAIN_TIMEOUT_SECONDS),
    }
    if feature_groups:
        env[ENV_FEATURE_GROUPS] = feature_groups
    for e in rt.env or []:
        env[e.name] = e.value
    return [{"name": k, "value": v} for k, v in env.items()]


def storage_initializer(
    spec: InferenceServiceSpec, server: dict[str, Any], defaults: StorageDefaults
) -> dict[str, Any]:
    """The init container that downloads an ``s3://`` artifact into the ``model`` emptyDir and
    verifies its digest (``kiln-serve --fetch-only``), before the server container starts.

    KServe's ``storage-initializer`` pattern: a failed download leaves the pod in ``Init:Error``
    / ``Init:CrashLoopBackOff`` (the kubelet retries with its back-off), never Ready, with the
    cause (bucket, key, reason) in the container's log and termination message. Only this
    container gets the store's credentials. It asks for the server's CPU and memory (not its
    GPUs): an init container's requests never add to the pod's.
    """
    env, env_from = storage_env(spec.storage, defaults)
    resources = copy.deepcopy(server.get("resources") or {})
    for key in ("requests", "limits"):
        if key in resources:
            resources[key] = {k: v for k, v in resources[key].items() if not k.endswith("gpu")}
    init: dict[str, Any] = {
        "name": STORAGE_INITIALIZER,
        "image": server["image"],
        "args": ["--fetch-only"],
        "env": server["env"] + env,
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": MODEL_VOLUME, "mountPath": MODEL_DIR},
        ],
        "securityContext": copy.deepcopy(server["securityContext"]),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if env_from:
        init["envFrom"] = env_from
    if "imagePullPolicy" in server:
        init["imagePullPolicy"] = server["imagePullPolicy"]
    if any(resources.values()):
        init["resources"] = resources
    return init


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _kiln_container(
    spec: InferenceServiceSpec, env: list[dict[str, str]], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The kiln-serve container (Open Inference Protocol on ``http`` and ``grpc``, ``/metrics``)."""
    rt = spec.runtime
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": rt.image,
        "env": env,
        "ports": [
            {"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        # Loading a large model can take a while: liveness starts once the server is up.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 90,
        },
        "volumeMounts": mounts,
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if rt.image_pull_policy:
        container["imagePullPolicy"] = rt.image_pull_policy
    if spec.resources:
        container["resources"] = spec.resources.to_api()
    return container


def _llm_containers(
    spec: InferenceServiceSpec,
    artifact_uri: str,
    digest: str,
    env: list[dict[str, str]],
    mounts: list[dict[str, Any]],
    defaults: StorageDefaults,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(engine, storage-initializer)`` of an LLM engine pod (:mod:`kiln.resources.llm`).

    The storage-initializer runs ``kiln-serve --fetch-only`` (in ``runtime.storageInitializerImage``,
    else the runtime image) for every artifact: it downloads an ``s3://`` one into the ``model``
    emptyDir and verifies it, and verifies a ``file://`` one in place, so the engine only ever
    reads a directory whose every file matched its digest.
    """
    rt = spec.runtime
    path = llm.model_path(artifact_uri, digest, MODEL_DIR)
    engine = llm.engine_container(
        spec, name=CONTAINER, path=path, kiln_env=env, mounts=mounts, security_context=_security_context()
    )
    fetcher: dict[str, Any] = {
        "image": rt.storage_initializer_image or rt.image,
        "env": env,
        "securityContext": _security_context(),
        "resources": engine.get("resources") or {},
    }
    if rt.image_pull_policy and fetcher["image"] == rt.image:
        fetcher["imagePullPolicy"] = rt.image_pull_policy
    init = storage_initializer(spec, fetcher, defaults)
    init["command"] = ["kiln-serve"]
    if not is_s3(artifact_uri):  # verified in place: /tmp and the artifact volume (read-only)
        init["volumeMounts"] = copy.deepcopy(mounts)
    return engine, init


def deployment(
    isvc: dict[str, Any],
    spec: InferenceServiceSpec,
    track: str,
    version: int,
    artifact_uri: str,
    digest: str,
    replicas: int | None,
    defaults: StorageDefaults | None = None,
    feature_groups: str | None = None,
) -> dict[str, Any]:
    """A Deployment of the model server for ``track`` serving ``version`` from ``artifact_uri``:
    kiln-serve, or the LLM engine of ``runtime.engine`` (:func:`_llm_containers`).

    Args:
        replicas: pod count; None leaves it to an HPA (the field is then not applied).
        feature_groups: the server's ``KILN_FEATURE_GROUPS`` (:func:`feature_groups_env`), or None.
        defaults: the operator's storage configuration, for an ``s3://`` artifact: then the pod
            gets a :func:`storage_initializer` and a ``model`` emptyDir the server reads (and
            re-verifies) the artifact from; ``runtime.artifactVolume`` is for ``file://`` ones.

    The selector (immutable) is ``{inferenceservice, track}``; the version is a pod label only,
    so a new version rolls the same Deployment (``maxUnavailable: 0``: capacity never dips).
    Both tracks get the same placement (``nodeSelector``, ``tolerations`` plus the GPU one when
    ``resources`` ask for GPUs, ``priorityClassName``, ``serviceAccountName``).
    """
    name = isvc["metadata"]["name"]
    rt = spec.runtime
    defaults = defaults or StorageDefaults()
    pod_labels = standard_labels(isvc, "server") | {
        LABEL_ISVC: name,
        LABEL_TRACK: track,
        LABEL_VERSION: str(version),
    }
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    remote = is_s3(artifact_uri)
    env = server_env(spec, version, artifact_uri, digest, feature_groups)
    if remote:
        env.append({"name": ENV_MODEL_DIR, "value": MODEL_DIR})
        volumes.append({"name": MODEL_VOLUME, "emptyDir": {}})
        mounts.append({"name": MODEL_VOLUME, "mountPath": MODEL_DIR, "readOnly": True})
    elif rt.artifact_volume:
        volumes.append({"name": "artifacts", **copy.deepcopy(rt.artifact_volume)})
        mounts.append({"name": "artifacts", "mountPath": rt.artifact_mount_path, "readOnly": True})
    init: list[dict[str, Any]] = []
    if rt.is_llm:
        container, fetcher = _llm_containers(spec, artifact_uri, digest, env, mounts, defaults)
        init.append(fetcher)
        volumes.append(llm.shm_volume())
        grace = llm.TERMINATION_GRACE_SECONDS
    else:
        container = _kiln_container(spec, env, mounts)
        if remote:
            init.append(storage_initializer(spec, container, defaults))
        # after the storage-initializer took its copy of the environment: no store password there
        container["env"] = env + feature_group_secret_env(feature_groups)
        grace = TERMINATION_GRACE_SECONDS
    pod_spec: dict[str, Any] = {
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_spec.update(
        pod_placement(
            node_selector=spec.node_selector,
            tolerations=spec.tolerations,
            resources=spec.resources,
            priority_class_name=spec.priority_class_name,
            service_account_name=spec.service_account_name,
        )
    )
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": {LABEL_ISVC: name, LABEL_TRACK: track}},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": "25%"}},
        "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
        "revisionHistoryLimit": 3,
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if replicas is not None:
        dep_spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            isvc, deployment_name(name, track), "server", {LABEL_TRACK: track, LABEL_VERSION: str(version)}
        ),
        "spec": dep_spec,
    }


def _ports(spec: InferenceServiceSpec) -> list[dict[str, Any]]:
    """Service ports: ``http`` (80), ``grpc`` and ``metrics`` of kiln-serve; an LLM engine has
    no gRPC and serves ``/metrics`` on its ``http`` port, which port ``metrics`` then targets."""
    if spec.runtime.is_llm:
        return [
            {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"},
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "http", "protocol": "TCP"},
        ]
    return [
        {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"},
        {
            "name": "grpc",
            "port": GRPC_PORT,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": GRPC_APP_PROTOCOL,
        },
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
    ]


def service(isvc: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    """Service ``<name>``: both tracks (ReplicaRatio, scraped) or the stable track (GatewayAPI)."""
    name = isvc["metadata"]["name"]
    ratio = spec.rollout.traffic_routing == TrafficRouting.REPLICA_RATIO
    selector = {LABEL_ISVC: name} if ratio else {LABEL_ISVC: name, LABEL_TRACK: STABLE}
    extra = {LABEL_SCRAPE: "true"} if ratio else {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(isvc, service_name(name), "server", extra),
        "spec": {"type": "ClusterIP", "selector": selector, "ports": _ports(spec)},
    }


def track_service(isvc: dict[str, Any], spec: InferenceServiceSpec, track: str) -> dict[str, Any]:
    """Service ``<name>-<track>`` selecting one track: a weighted HTTPRoute backend (scraped)."""
    name = isvc["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(
            isvc, track_service_name(name, track), "server", {LABEL_TRACK: track, LABEL_SCRAPE: "true"}
        ),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_ISVC: name, LABEL_TRACK: track},
            "ports": _ports(spec),
        },
    }


def service_monitor(isvc: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    """ServiceMonitor scraping ``/metrics`` on port ``metrics`` of the scraped Services.

    ``monitoring.serviceMonitor.labels`` go on the object so a Prometheus's
    ``serviceMonitorSelector`` can pick it; Prometheus adds ``namespace``, ``service`` and
    ``pod`` target labels, and kiln-serve exports ``model`` and ``version``. An LLM engine's
    metrics carry neither, so for it the target gets ``version`` (the pod's
    ``kiln.dev/model-version``), ``track`` and ``model`` (the Model's name) by relabeling: the
    same queries (and :mod:`kiln.rollout.templates`) select a version's series.
    """
    name = isvc["metadata"]["name"]
    sm = spec.monitoring.service_monitor
    meta = _meta(isvc, name, "monitoring")
    meta["labels"] = meta["labels"] | dict(sm.labels or {})
    endpoint: dict[str, Any] = {"port": "metrics", "path": "/metrics", "interval": f"{sm.interval_seconds}s"}
    if spec.runtime.is_llm:
        endpoint["relabelings"] = [
            {"sourceLabels": [_pod_label_meta(LABEL_VERSION)], "targetLabel": "version", "action": "replace"},
            {"sourceLabels": [_pod_label_meta(LABEL_TRACK)], "targetLabel": "track", "action": "replace"},
            {"targetLabel": "model", "replacement": spec.model_ref.name, "action": "replace"},
        ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": {LABEL_ISVC: name, LABEL_SCRAPE: "true"}},
            "namespaceSelector": {"matchNames": [isvc["metadata"]["namespace"]]},
            "endpoints": [endpoint],
        },
    }


def _pod_label_meta(label: str) -> str:
    """Prometheus's service-discovery label of a pod label (non-alphanumerics become ``_``)."""
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


def prometheus_rule(isvc: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    """PrometheusRule ``<name>`` from ``monitoring.alerts`` (which must be set): recording rules
    and alerts of :func:`kiln.resources.alerts.rule_groups`.

    ``alerts.labels`` go on the object so a Prometheus's ``ruleSelector`` can pick it.
    """
    alerts = spec.monitoring.alerts
    assert alerts is not None
    m = isvc["metadata"]
    meta = _meta(isvc, m["name"], "monitoring")
    meta["labels"] = meta["labels"] | dict(alerts.labels or {})
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": meta,
        "spec": {"groups": rule_groups(m["namespace"], m["name"], alerts)},
    }


def hpa(isvc: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    """autoscaling/v2 HPA of the stable Deployment on CPU utilization (needs ``autoscaling``)."""
    assert spec.autoscaling is not None
    name = isvc["metadata"]["name"]
    a = spec.autoscaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(isvc, name, "server"),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": deployment_name(name, STABLE),
            },
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": a.target_cpu_utilization_percentage,
                        },
                    },
                }
            ],
        },
    }


def http_route(isvc: dict[str, Any], spec: InferenceServiceSpec, canary_weight: int | None) -> dict[str, Any]:
    """HTTPRoute splitting traffic between the per-track Services.

    Args:
        canary_weight: canary percentage 0..100, or None when no canary runs (stable only).
    """
    gw = spec.rollout.gateway_api
    assert gw is not None
    name = isvc["metadata"]["name"]
    backends: list[dict[str, Any]] = [
        {
            "name": track_service_name(name, STABLE),
            "port": SERVICE_PORT,
            "weight": 100 - (canary_weight or 0),
        }
    ]
    if canary_weight is not None:
        backends.append(
            {"name": track_service_name(name, CANARY), "port": SERVICE_PORT, "weight": canary_weight}
        )
    route_spec: dict[str, Any] = {
        "parentRefs": [p.to_api() for p in gw.parent_refs],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": backends}],
    }
    if gw.hostnames:
        route_spec["hostnames"] = list(gw.hostnames)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _meta(isvc, name, "routing"),
        "spec": route_spec,
    }


def inference_pool(isvc: dict[str, Any], spec: InferenceServiceSpec) -> dict[str, Any]:
    """InferencePool ``<name>`` over the pods of both tracks (``runtime.llm.inferencePool``):
    a gateway routing to it lets its Endpoint Picker choose a pod per request by queue length
    and KV-cache use (:func:`kiln.resources.llm.inference_pool`). The canary's share is then
    the picker's choice among Ready pods, as with ReplicaRatio routing."""
    name = isvc["metadata"]["name"]
    return llm.inference_pool(_meta(isvc, name, "routing"), spec, {LABEL_ISVC: name})


def children(
    isvc: dict[str, Any],
    spec: InferenceServiceSpec,
    *,
    stable: tuple[int, str, str] | None,
    stable_replicas: int | None,
    canary: tuple[int, str, str] | None = None,
    canary_replicas: int = 0,
    canary_weight: int = 0,
    defaults: StorageDefaults | None = None,
    stable_features: str | None = None,
    canary_features: str | None = None,
) -> list[dict[str, Any]]:
    """Every child the InferenceService wants now.

    Args:
        stable: ``(version, artifactUri, digest)`` the stable Deployment serves; None: no stable
            Deployment is built (its artifact is unknown; the existing one is left alone).
        stable_replicas: stable pods (None: HPA-owned).
        canary: ``(version, artifactUri, digest)`` of the canary, or None (no canary children).
        canary_replicas: canary pods.
        canary_weight: HTTPRoute weight of the canary (GatewayAPI only).
        defaults: the operator's storage configuration (see :func:`deployment`).
        stable_features, canary_features: each track's ``KILN_FEATURE_GROUPS``, or None (a
            track serving a version trained on other FeatureGroup definitions keeps its own).
    """
    out: list[dict[str, Any]] = []
    gateway = spec.rollout.traffic_routing == TrafficRouting.GATEWAY_API
    if stable is not None:
        out.append(deployment(isvc, spec, STABLE, *stable, stable_replicas, defaults, stable_features))
    if canary is not None:
        out.append(deployment(isvc, spec, CANARY, *canary, canary_replicas, defaults, canary_features))
    out.append(service(isvc, spec))
    if gateway:
        out.append(track_service(isvc, spec, STABLE))
        if canary is not None:
            out.append(track_service(isvc, spec, CANARY))
        out.append(http_route(isvc, spec, canary_weight if canary is not None else None))
    if spec.runtime.llm is not None and spec.runtime.llm.inference_pool is not None:
        out.append(inference_pool(isvc, spec))
    if spec.monitoring.service_monitor.enabled:
        out.append(service_monitor(isvc, spec))
    if spec.monitoring.alerts is not None:
        out.append(prometheus_rule(isvc, spec))
    if spec.autoscaling is not None:
        out.append(hpa(isvc, spec))
    return out
