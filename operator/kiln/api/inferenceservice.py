"""InferenceService: serves a Model version, with canary rollouts guarded by Prometheus.

Rollout names follow Argo Rollouts (``steps``, ``setWeight`` -> ``weight``, ``pause``,
``analysis``, ``failureLimit``); status names follow KServe where it has them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from kiln.api.common import (
    DNS1123_LABEL,
    Conditions,
    EnvVar,
    KilnModel,
    LocalObjectReference,
    ObjectStorage,
    PrometheusProvider,
    ResourceRequirements,
    Toleration,
    cel,
    with_rules,
)
from kiln.api.model import ALIAS_PATTERN, VersionNumber
from kiln.api.names import dns1035_label

SERVER_PORT = 8080
#: kiln-serve's gRPC port (the Open Inference Protocol's inference.GRPCInferenceService).
GRPC_PORT = 8081
METRICS_PORT = 9090
#: Default artifact root, the TrainingJob's default output (``file:///var/lib/kiln/artifacts``).
ARTIFACT_ROOT = "/var/lib/kiln/artifacts"
#: Most FeatureGroups one InferenceService may read features from.
MAX_FEATURE_GROUPS = 8


class ModelSelector(KilnModel):
    """Which version of which Model to serve: exactly one of stage, version, alias."""

    model_config = with_rules(
        cel(
            "[has(self.stage), has(self.version), has(self.alias)].filter(x, x).size() == 1",
            "modelRef needs exactly one of stage, version, alias",
        )
    )

    name: str = Field(min_length=1, max_length=253, description="Model name (same namespace).")
    stage: Literal["Development", "Staging", "Production"] | None = Field(
        default=None, description="Serve whichever version holds this stage."
    )
    version: VersionNumber | None = Field(default=None, description="Serve this exact version.")
    alias: str | None = Field(
        default=None, pattern=ALIAS_PATTERN, description="Serve the version this alias names."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSelector:
        if sum(x is not None for x in (self.stage, self.version, self.alias)) != 1:
            raise ValueError("modelRef needs exactly one of stage, version, alias")
        return self


class Engine(StrEnum):
    """The serving engine of an InferenceService: which artifact formats it serves.

    ``kiln``: kiln-serve (Open Inference Protocol) for ``kiln-mlp``, ``torch-export`` and
    ``onnx`` versions. ``vllm``: vLLM's OpenAI-compatible server for ``hf-transformers``
    versions (an LLM). The names leave room for more LLM engines (e.g. ``tgi``).
    """

    KILN = "kiln"
    VLLM = "vllm"


#: The artifact formats (a version's ``format``, see :mod:`kiln.artifact`) each engine serves.
ENGINE_FORMATS: dict[Engine, tuple[str, ...]] = {
    Engine.KILN: ("kiln-mlp", "torch-export", "onnx"),
    Engine.VLLM: ("hf-transformers",),
}


class LLMDType(StrEnum):
    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class EndpointPickerRef(KilnModel):
    """The Endpoint Picker (EPP) an InferencePool hands routing decisions to (a Service)."""

    name: str = Field(
        min_length=1, max_length=253, pattern=DNS1123_LABEL, description="The EPP's Service (same namespace)."
    )
    port: int = Field(default=9002, ge=1, le=65535, description="Its ext-proc gRPC port.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        default="FailClose",
        description="What the gateway does when the EPP does not answer: FailClose (refuse) or FailOpen (any pod).",
    )


class InferencePoolSpec(KilnModel):
    """An InferencePool (Gateway API Inference Extension, inference.networking.k8s.io/v1) over
    the engine's pods, for a gateway that picks endpoints by queue length and KV-cache use."""

    endpoint_picker_ref: EndpointPickerRef = Field(
        description="The Endpoint Picker deployed for this pool (Kiln does not deploy it)."
    )


class LLMRuntime(KilnModel):
    """Settings of an LLM engine (``engine: vllm``), read from the served Hugging Face directory.

    Tensor parallelism is the number of GPUs ``resources`` asks for (one engine per pod).
    """

    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=10_485_760,
        description="Context length in tokens (prompt plus output); the model's own when unset. Longer prompts get a 400.",
    )
    dtype: LLMDType = Field(
        default=LLMDType.AUTO,
        description="Weights and activations type: auto (the model's), float16, bfloat16 or float32 (CPU).",
    )
    quantization: Literal["awq", "gptq", "fp8", "bitsandbytes", "compressed-tensors"] | None = Field(
        default=None,
        description="Quantization method of the weights, when the engine cannot read it from the model's config.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Share of each GPU's memory the engine may use (vLLM's 0.9 when unset).",
    )
    max_num_seqs: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Most sequences batched together (the engine's default when unset).",
    )
    extra_args: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        default=None,
        max_length=64,
        description="More engine flags, appended after Kiln's (e.g. --enable-prefix-caching).",
    )
    inference_pool: InferencePoolSpec | None = Field(
        default=None,
        description="Emit an InferencePool over this service's pods (needs the Gateway API Inference Extension CRDs).",
    )


class Runtime(KilnModel):
    """The model server container: kiln-serve, or an LLM engine (``engine``)."""

    model_config = with_rules(
        cel(
            "!has(self.llm) || self.engine != 'kiln'",
            "runtime.llm applies to LLM engines (engine: vllm)",
            field_path=".llm",
        )
    )

    engine: Engine = Field(
        default=Engine.KILN,
        description="kiln: kiln-serve (kiln-mlp, torch-export, onnx versions); vllm: vLLM's OpenAI-compatible server (hf-transformers versions).",
    )
    image: str = Field(
        min_length=1,
        max_length=1024,
        description="Server image (kiln server image, or the LLM image with engine vllm).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Pull policy of the server image (Kubernetes default when unset)."
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=4096, description="Rows per forward pass (dynamic batching)."
    )
    max_batch_delay_milliseconds: int = Field(
        default=2, ge=0, le=1000, description="Longest wait to fill a batch."
    )
    cache_size: int = Field(
        default=0, ge=0, le=1_000_000, description="Entries in the response cache; 0 turns it off."
    )
    env: list[EnvVar] | None = Field(default=None, max_length=64, description="Extra environment variables.")
    artifact_volume: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        description="core/v1 VolumeSource holding the artifacts, mounted read-only at artifactMountPath.",
    )
    artifact_mount_path: str = Field(
        default=ARTIFACT_ROOT,
        min_length=2,
        max_length=1024,
        pattern=r"^/",
        description="Where artifactVolume is mounted; the served version's artifactUri must point below it.",
    )
    storage_initializer_image: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Image with kiln-serve that fetches and verifies the artifact before an LLM engine starts "
        "(default: the runtime image, which must then have kiln-serve, as Kiln's LLM image does).",
    )
    llm: LLMRuntime | None = Field(default=None, description="LLM engine settings (engine vllm).")

    @model_validator(mode="after")
    def _llm_engine(self) -> Runtime:
        if self.llm is not None and self.engine == Engine.KILN:
            raise ValueError("runtime.llm applies to LLM engines (engine: vllm)")
        return self

    @property
    def is_llm(self) -> bool:
        """Whether the engine is an LLM engine (OpenAI API, Hugging Face directories)."""
        return self.engine != Engine.KILN


class Autoscaling(KilnModel):
    """A HorizontalPodAutoscaler (autoscaling/v2) for the stable Deployment."""

    model_config = with_rules(
        cel("self.maxReplicas >= self.minReplicas", "maxReplicas must be >= minReplicas")
    )

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest stable replicas.")
    max_replicas: int = Field(ge=1, le=1000, description="Most stable replicas.")
    target_cpu_utilization_percentage: int = Field(
        default=80,
        ge=1,
        le=100,
        alias="targetCPUUtilizationPercentage",
        description="Average CPU utilization (percent of requests) the HPA aims for.",
    )


class RolloutStep(KilnModel):
    """Shift ``weight`` percent of traffic to the canary, then wait ``pauseSeconds``."""

    weight: int = Field(ge=0, le=100, description="Canary traffic percentage.")
    pause_seconds: int = Field(
        default=0, ge=0, le=86400, description="Time to hold this weight, analysing, before the next step."
    )


class NoDataPolicy(StrEnum):
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"
    PASS = "Pass"


class MetricTemplate(StrEnum):
    """Canned analysis queries (:mod:`kiln.rollout.templates`), over the canary version's series."""

    TIME_TO_FIRST_TOKEN_P95 = "TimeToFirstTokenP95"
    INTER_TOKEN_LATENCY_P95 = "InterTokenLatencyP95"
    LLM_ERROR_RATIO = "LLMErrorRatio"


class AnalysisMetric(KilnModel):
    """A PromQL query (or a canned ``template``) returning one number, and its bound."""

    model_config = with_rules(
        cel("has(self.min) || has(self.max)", "a metric needs min or max"),
        cel("has(self.query) != has(self.template)", "a metric needs exactly one of query, template"),
    )

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=DNS1123_LABEL,
        description="Metric name, shown in status.analysis.",
    )
    query: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="PromQL; {{version}}, {{namespace}} and {{service}} are substituted. Must return one sample.",
    )
    template: MetricTemplate | None = Field(
        default=None,
        description="A canned query instead of query: TimeToFirstTokenP95 and InterTokenLatencyP95 (seconds), "
        "LLMErrorRatio (0..1), over the canary's LLM engine metrics.",
    )
    max: float | None = Field(default=None, description="Fails when the value is above.")
    min: float | None = Field(default=None, description="Fails when the value is below.")

    @model_validator(mode="after")
    def _query_or_template(self) -> AnalysisMetric:
        if (self.query is None) == (self.template is None):
            raise ValueError("a metric needs exactly one of query, template")
        return self


class Analysis(KilnModel):
    """Metric analysis run during the canary."""

    prometheus: PrometheusProvider = Field(description="The Prometheus the queries run against.")
    interval_seconds: int = Field(default=30, ge=1, le=3600, description="Time between two measurements.")
    failure_limit: int = Field(
        default=0, ge=0, le=100, description="Failed measurements tolerated; one more rolls back."
    )
    inconclusive_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Inconclusive measurements tolerated in a row before the rollout pauses.",
    )
    no_data_policy: NoDataPolicy = Field(
        default=NoDataPolicy.INCONCLUSIVE,
        description="What an empty query result counts as: Fail, Inconclusive (retried, never aborts) or Pass.",
    )
    metrics: list[AnalysisMetric] = Field(
        min_length=1, max_length=16, description="Queries checked at every measurement; all must pass."
    )


class TrafficRouting(StrEnum):
    REPLICA_RATIO = "ReplicaRatio"
    GATEWAY_API = "GatewayAPI"


class ParentReference(KilnModel):
    """Gateway API ParentReference (a Gateway)."""

    name: str = Field(min_length=1, max_length=253, description="Gateway name.")
    namespace: str | None = Field(
        default=None, max_length=63, description="Gateway namespace (default: this one)."
    )
    section_name: str | None = Field(
        default=None, max_length=253, description="Listener of the Gateway to attach to."
    )


class GatewayAPIRouting(KilnModel):
    parent_refs: list[ParentReference] = Field(
        min_length=1, max_length=32, description="Gateways the HTTPRoute attaches to."
    )
    hostnames: list[str] | None = Field(
        default=None, max_length=16, description="Host names the HTTPRoute matches (all when unset)."
    )


class Rollout(KilnModel):
    """How a new version replaces the old one."""

    model_config = with_rules(
        cel(
            "self.trafficRouting != 'GatewayAPI' || has(self.gatewayAPI)",
            "trafficRouting GatewayAPI needs gatewayAPI.parentRefs",
            field_path=".gatewayAPI",
        )
    )

    steps: list[RolloutStep] = Field(
        default_factory=lambda: [
            RolloutStep(weight=20, pause_seconds=60),
            RolloutStep(weight=50, pause_seconds=60),
        ],
        max_length=20,
        description="Canary steps; after the last the canary is promoted.",
    )
    analysis: Analysis | None = Field(default=None, description="Without analysis, steps only wait.")
    traffic_routing: TrafficRouting = Field(
        default=TrafficRouting.REPLICA_RATIO,
        description="ReplicaRatio: one Service over both Deployments, weight by replica counts. GatewayAPI: HTTPRoute weights.",
    )
    gateway_api: GatewayAPIRouting | None = Field(
        default=None, alias="gatewayAPI", description="HTTPRoute settings for trafficRouting GatewayAPI."
    )
    paused: bool = Field(default=False, description="Hold the rollout at its current step.")
    abort: bool = Field(
        default=False,
        description="Roll the canary back now; while true, every new canary is rolled back as soon as it starts.",
    )
    progress_deadline_seconds: int = Field(
        default=600,
        ge=30,
        le=86400,
        description="A canary whose pods are not Ready this long (the Deployment's progressDeadlineSeconds) rolls back.",
    )


class ServiceMonitorSpec(KilnModel):
    enabled: bool = Field(default=True, description="Create a ServiceMonitor (monitoring.coreos.com/v1).")
    labels: dict[str, str] | None = Field(
        default=None, description="Labels a Prometheus selects ServiceMonitors by."
    )
    interval_seconds: int = Field(default=15, ge=1, le=3600, description="Scrape interval.")


#: A Prometheus label value we accept for ``severity`` (Alertmanager routes on it).
SEVERITY_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
#: Drift methods whose score rises with drift (distances), the ones a "score above a threshold"
#: alert makes sense for; ks, chisquare and z export p-values, which fall (docs/monitoring.md).
DRIFT_DISTANCE_METHODS = ("psi", "wasserstein", "jensenshannon")

_FOR = Field(
    default=300,
    ge=0,
    le=86400,
    description="How long the condition must hold before the alert fires (the rule's `for`).",
)
_SEVERITY = Field(
    default="warning",
    pattern=SEVERITY_PATTERN,
    description="The alert's severity label (e.g. critical, warning, info), for Alertmanager routing.",
)


class LatencyAlert(KilnModel):
    """Fires when a latency percentile of a served version stays over ``thresholdSeconds``."""

    percentile: Literal[95, 99] = Field(description="95 or 99: the p95 or p99 recording rule.")
    threshold_seconds: float = Field(gt=0, le=3600, description="Fires while the percentile is above.")
    for_seconds: int = _FOR
    severity: str = _SEVERITY


class ErrorRatioAlert(KilnModel):
    """Fires when the share of 5xx answers of a served version stays over ``threshold``."""

    threshold: float = Field(gt=0, lt=1, description="Error ratio (0..1) above which it fires, e.g. 0.05.")
    for_seconds: int = _FOR
    severity: str = _SEVERITY


class DriftAlert(KilnModel):
    """Fires when a drift score of this method (feature or prediction drift) stays over threshold.

    Methods have different scales, so each method gets its own threshold. Only distances
    (psi, wasserstein, jensenshannon) rise with drift; for the p-value methods alert on the
    share of drifted features (driftShare), which uses each method's own decision.
    """

    method: Literal["psi", "wasserstein", "jensenshannon"] = Field(
        description="The gauges' method label: psi, wasserstein or jensenshannon (distances: they rise with drift)."
    )
    threshold: float = Field(
        ge=0, description="Fires while the score is above, e.g. 0.2 for PSI, 0.1 for the others."
    )
    for_seconds: int = _FOR
    severity: str = _SEVERITY


class DriftShareAlert(KilnModel):
    """Fires when the share of drifted features (kiln_drift_share: each feature judged by its
    default method, Evidently's dataset drift) stays at or above ``threshold``."""

    threshold: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of drifted features (0..1]; Evidently's dataset drift is 0.5.",
    )
    for_seconds: int = _FOR
    severity: str = _SEVERITY


def _unique(items: list[Any] | None, key: str, what: str) -> None:
    keys = [getattr(i, key) for i in items or []]
    if len(keys) != len(set(keys)):
        raise ValueError(f"{what} must be unique")


class Alerts(KilnModel):
    """A PrometheusRule (monitoring.coreos.com/v1) with recording rules and alerts for this service.

    Recording rules (always): p95 and p99 latency and the 5xx error ratio per model version, over
    ``windowSeconds``; alerts: the ones configured here.
    """

    labels: dict[str, str] | None = Field(
        default=None, description="Labels of the PrometheusRule, for a Prometheus's ruleSelector."
    )
    window_seconds: int = Field(
        default=300, ge=10, le=86400, description="Rate window of the recording rules, e.g. 300 (5m)."
    )
    latency: list[LatencyAlert] | None = Field(
        default=None,
        max_length=2,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["percentile"]},
        description="Latency alerts, at most one per percentile.",
    )
    error_ratio: ErrorRatioAlert | None = Field(default=None, description="Error ratio alert.")
    drift: list[DriftAlert] | None = Field(
        default=None,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["method"]},
        description="Feature and prediction drift alerts, at most one per method.",
    )
    drift_share: DriftShareAlert | None = Field(
        default=None, description="Dataset drift alert: the share of drifted features."
    )

    @model_validator(mode="after")
    def _keys(self) -> Alerts:
        _unique(self.latency, "percentile", "latency percentiles")
        _unique(self.drift, "method", "drift methods")
        return self


class Monitoring(KilnModel):
    service_monitor: ServiceMonitorSpec = Field(
        default_factory=ServiceMonitorSpec,
        description="Prometheus Operator ServiceMonitor for the server metrics.",
    )
    alerts: Alerts | None = Field(
        default=None,
        description="Prometheus Operator PrometheusRule: latency, error ratio and drift alerts (none when unset).",
    )


class InferenceServiceSpec(KilnModel):
    """Desired state of an InferenceService."""

    model_config = with_rules(
        cel(
            "!has(self.featureGroups) || !has(self.runtime.engine) || self.runtime.engine == 'kiln'",
            "featureGroups apply to runtime.engine kiln (an LLM engine takes prompts, not entity keys)",
            field_path=".featureGroups",
        )
    )

    model_ref: ModelSelector
    runtime: Runtime
    replicas: int = Field(default=2, ge=0, le=1000, description="Stable replicas (ignored with autoscaling).")
    autoscaling: Autoscaling | None = None
    resources: ResourceRequirements | None = None
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, description="Node labels each server pod (stable and canary) must match."
    )
    tolerations: list[Toleration] | None = Field(
        default=None,
        max_length=32,
        description="Tolerations of the server pods. When resources request GPUs, a toleration for the nvidia.com/gpu taint is added unless one exists.",
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the server pods."
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        description="ServiceAccount the server pods run as (its token is not mounted).",
    )
    storage: ObjectStorage | None = Field(
        default=None,
        description="Credentials and endpoint for s3:// artifacts: a storage-initializer init container downloads and verifies the served version into an emptyDir before the server starts. Default: the operator's.",
    )
    rollout: Rollout = Field(default_factory=Rollout)
    monitoring: Monitoring = Field(
        default_factory=Monitoring, description="How the server metrics are scraped."
    )
    feature_groups: list[LocalObjectReference] | None = Field(
        default=None,
        max_length=MAX_FEATURE_GROUPS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="FeatureGroups (same namespace, online store enabled) a request may name entity keys of "
        "instead of sending the model's input: the server reads their features from the online store, "
        "concatenated in this order, as the model's one input. The served version, when trained on a "
        "FeatureGroup, must name one of these with the same schema digest.",
    )

    @model_validator(mode="after")
    def _unique_feature_groups(self) -> InferenceServiceSpec:
        names = [r.name for r in self.feature_groups or []]
        if len(names) != len(set(names)):
            raise ValueError("featureGroups must name each FeatureGroup once")
        if names and self.runtime.is_llm:
            raise ValueError(
                "featureGroups apply to runtime.engine kiln (an LLM engine takes prompts, not entity keys)"
            )
        return self


class RolloutPhase(StrEnum):
    HEALTHY = "Healthy"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    DEGRADED = "Degraded"


class MetricResult(KilnModel):
    name: str
    value: float | None = None
    phase: Literal["Successful", "Failed", "Inconclusive", "Error"]
    message: str | None = None


class AnalysisStatus(KilnModel):
    """Measurements of the current (or last) rollout."""

    last_run_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    phase: Literal["Successful", "Failed", "Inconclusive"] | None = Field(
        default=None,
        description="Outcome of the last measurement (all its metrics together).",
    )
    successes: int = Field(default=0, description="Successful measurements in this rollout.")
    failures: int = Field(
        default=0, description="Failed measurements in this rollout (rollback when > failureLimit)."
    )
    inconclusive: int = Field(
        default=0,
        description="Inconclusive measurements in a row (pause when > inconclusiveLimit).",
    )
    results: list[MetricResult] | None = Field(
        default=None, description="Per-metric results of the last measurement."
    )


class RolloutHistoryEntry(KilnModel):
    time: str = Field(json_schema_extra={"format": "date-time"})
    from_version: int | None = None
    to_version: int | None = None
    phase: RolloutPhase
    message: str | None = Field(default=None, max_length=1024)


class InferenceServiceStatus(KilnModel):
    observed_generation: int | None = None
    conditions: Conditions | None = Field(
        default=None, description="Ready, ModelLoaded, CanaryReady, RolloutHealthy."
    )
    url: str | None = None
    stable_version: int | None = None
    canary_version: int | None = None
    canary_weight: int = 0
    rollout_phase: RolloutPhase | None = None
    current_step: int | None = None
    step_start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    analysis: AnalysisStatus | None = None
    rolled_back_version: int | None = Field(
        default=None,
        description="Version whose canary was rolled back; not retried until the resolved version changes.",
    )
    history: list[RolloutHistoryEntry] | None = Field(
        default=None, description="Rollout outcomes, newest last, bounded."
    )


class InferenceService(KilnModel):
    """Serves a Model version; rolls new versions out as Prometheus-guarded canaries."""

    # The name is the Service callers use and the kiln.dev/inferenceservice label of every child.
    model_config = with_rules(*dns1035_label("InferenceService", "its Service"))

    api_version: str = "kiln.dev/v1alpha1"
    kind: str = "InferenceService"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: InferenceServiceSpec
    status: InferenceServiceStatus | None = None
