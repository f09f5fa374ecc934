"""TrainingJob: PyTorch DDP across nodes, one pod per node running torchrun.

Field names follow Kubeflow Trainer where it already named the thing (``numNodes``,
``numProcPerNode``, ``suspend``, ``activeDeadlineSeconds``) and core/v1 Pod for placement.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from kiln.api.common import (
    STORAGE_URI_PATTERN,
    Conditions,
    EnvVar,
    FreeFormObject,
    KilnModel,
    LocalObjectReference,
    ObjectStorage,
    ResourceRequirements,
    Toleration,
    cel,
    immutable,
    with_rules,
)
from kiln.api.names import DNS_LABEL_MAX, NAME, no_dots, on_create, starts_with_letter

BUILTIN_DATASETS = ("sklearn-digits",)
MASTER_PORT = 29500
NUM_NODES_MAX = 256
#: Pod ``i`` of a job is named ``<job>-node-<i>``, which is also its hostname.
POD_INFIX = "-node-"


def max_name_length(num_nodes: int) -> int:
    """Longest TrainingJob name whose last pod hostname ``<name>-node-<numNodes-1>`` is a DNS label.

    56 for 1-10 nodes, 55 for 11-100, 54 for 101-256 (63 - len('-node-') - digits of the rank).
    """
    return DNS_LABEL_MAX - len(POD_INFIX) - len(str(num_nodes - 1))


_PURPOSE = "the job's headless Service and its pods' hostnames"
_LIMITS = ", ".join(f"{max_name_length(n)} with up to {n} nodes" for n in (10, 100, NUM_NODES_MAX))
#: Root rules on metadata.name (see kiln.api.names); the limit mirrors :func:`max_name_length`.
NAME_RULES = (
    starts_with_letter("TrainingJob", _PURPOSE),
    no_dots("TrainingJob", _PURPOSE),
    on_create(
        f"{NAME}.size() <= {DNS_LABEL_MAX - len(POD_INFIX)} - string(self.spec.numNodes - 1).size()",
        f"TrainingJob name too long for numNodes: pod hostnames <name>{POD_INFIX}<i> must fit in "
        f"{DNS_LABEL_MAX} characters (a DNS-1123 label), so the name may have at most {_LIMITS}",
    ),
)

NumProcPerNode = Annotated[
    Annotated[int, Field(ge=1, le=64)] | Literal["auto"],
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-validations": [
                cel(
                    "type(self) == int ? (self >= 1 && self <= 64) : self == 'auto'",
                    "numProcPerNode must be an integer from 1 to 64 or 'auto'",
                )
            ],
        }
    ),
]


class DatasetFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"


class Dataset(KilnModel):
    """Where the training data comes from: exactly one of builtin, uri, featureGroupRef."""

    model_config = with_rules(
        cel(
            "[has(self.builtin), has(self.uri), has(self.featureGroupRef)].filter(x, x).size() == 1",
            "dataset needs exactly one of builtin, uri, featureGroupRef",
        ),
        cel(
            "!has(self.uri) || has(self.labelColumn)",
            "dataset.uri needs labelColumn",
            field_path=".labelColumn",
        ),
        cel(
            "!has(self.featureGroupRef) || (has(self.entityUri) && has(self.labelColumn))",
            "dataset.featureGroupRef needs entityUri and labelColumn",
            field_path=".entityUri",
        ),
    )

    builtin: Literal["sklearn-digits"] | None = Field(
        default=None,
        description="A data set shipped inside the trainer image: 'sklearn-digits' (UCI digits, 1,797 8x8 images).",
    )
    uri: str | None = Field(
        default=None,
        max_length=2048,
        pattern=STORAGE_URI_PATTERN,
        description="CSV or Parquet file: s3://bucket/key (read with spec.storage's credentials), or a path / file:// URI inside the pod (e.g. on a mounted volume).",
    )
    format: DatasetFormat | None = Field(
        default=None, description="csv or parquet; guessed from the uri suffix when empty."
    )
    label_column: str | None = Field(
        default=None,
        max_length=256,
        description="Column holding the class label (of the uri's table, or of entityUri's).",
    )
    feature_group_ref: LocalObjectReference | None = Field(
        default=None,
        description=(
            "A FeatureGroup (same namespace) whose point-in-time training data feeds the job: each "
            "row of entityUri gets the feature values as of its timestamp (never later, at most "
            "offline.lookbackSeconds older), inside the trainer pods."
        ),
    )
    entity_uri: str | None = Field(
        default=None,
        max_length=2048,
        pattern=STORAGE_URI_PATTERN,
        description=(
            "With featureGroupRef: the entity table (Feast's entity dataframe), CSV or Parquet: the "
            "FeatureGroup's entity columns, timestampColumn and labelColumn. s3:// or a path in the pod."
        ),
    )
    timestamp_column: str = Field(
        default="event_timestamp",
        max_length=128,
        description="With featureGroupRef: entityUri's event time column (the 'as of' time of each row).",
    )
    volume: FreeFormObject | None = Field(
        default=None, description="core/v1 VolumeSource holding the uri, mounted read-only at its directory."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Dataset:
        if self.feature_group_ref is not None and not (self.entity_uri and self.label_column):
            raise ValueError("dataset.featureGroupRef needs entityUri and labelColumn")
        n = sum(x is not None for x in (self.builtin, self.uri, self.feature_group_ref))
        if n != 1:
            raise ValueError("dataset needs exactly one of builtin, uri, featureGroupRef")
        if self.uri is not None and not self.label_column:
            raise ValueError("dataset.uri needs labelColumn")
        return self


class Output(KilnModel):
    """Where the artifact (and the per-epoch checkpoints) are written."""

    uri: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        pattern=STORAGE_URI_PATTERN,
        description="Artifact root: s3://bucket/prefix (an object store, see spec.storage), or an absolute path / file:// URI inside the pod. "
        "The artifact lands in <uri>/<model>/<job>/, checkpoints in <uri>/<model>/.checkpoints/<job>/. "
        "Default: the operator's artifact root (Helm values artifacts.s3 or artifacts.volume), else file:///var/lib/kiln/artifacts.",
    )
    volume: FreeFormObject | None = Field(
        default=None,
        description="core/v1 VolumeSource mounted at the uri's path in every pod (e.g. a PVC or hostPath), for a file:// uri. Without it the path is the pod's own filesystem.",
    )


class PodFailurePolicyAction(StrEnum):
    FAIL_JOB = "FailJob"
    IGNORE = "Ignore"
    COUNT = "Count"


class PodFailurePolicyOnExitCodes(KilnModel):
    """Which exit codes of the trainer container a rule matches (as in batch/v1 Job)."""

    operator: Literal["In", "NotIn"] = Field(
        description="In: the exit code is one of values; NotIn: it is none of them."
    )
    values: list[Annotated[int, Field(ge=1, le=255)]] = Field(
        min_length=1,
        max_length=255,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Exit codes (1-255; 0 is success and never a failure).",
    )


class PodFailurePolicyRule(KilnModel):
    """What a pod failure with matching exit code does to the job."""

    action: PodFailurePolicyAction = Field(
        description="FailJob: fail the job at once (a permanent error, e.g. bad input); "
        "Ignore: restart the gang without counting against maxRestarts; Count: the default, count it."
    )
    on_exit_codes: PodFailurePolicyOnExitCodes = Field(description="Exit codes this rule matches.")


class PodFailurePolicy(KilnModel):
    """Exit-code rules for pod failures, evaluated in order; the first match decides (batch/v1 Job's
    podFailurePolicy, restricted to exit codes). No match: Count."""

    rules: list[PodFailurePolicyRule] = Field(
        min_length=1, max_length=20, description="Rules, first match wins."
    )


class RestartBackoff(KilnModel):
    """Exponential back-off between gang restarts: initialSeconds * 2^(restarts-1), capped."""

    initial_seconds: int = Field(
        default=10, ge=0, le=3600, description="Delay before the first gang restart."
    )
    max_seconds: int = Field(default=300, ge=0, le=86400, description="Upper bound of the delay.")


class TrainingJobSpec(KilnModel):
    """Desired state of a TrainingJob."""

    model_config = with_rules(
        cel(
            "!has(self.resourcesPerNode) || !has(self.resourcesPerNode.limits) || !has(self.resourcesPerNode.requests) || "
            "self.resourcesPerNode.requests.all(k, !k.endsWith('gpu') || !(k in self.resourcesPerNode.limits) || "
            "self.resourcesPerNode.limits[k] == self.resourcesPerNode.requests[k])",
            "GPU requests must equal GPU limits",
            field_path=".resourcesPerNode",
        )
    )

    model_ref: Annotated[LocalObjectReference | None, Field(json_schema_extra=immutable("modelRef"))] = Field(
        default=None, description="The Model a successful job registers a new version in. Immutable."
    )
    image: str = Field(
        min_length=1,
        max_length=1024,
        json_schema_extra=immutable("image"),
        description="Trainer container image (e.g. the kiln trainer image). Immutable.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="core/v1 imagePullPolicy of the trainer container."
    )
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=64,
        description="Entrypoint override. Default: the image's (torchrun ... kiln-train). torchrun reads PET_* from the environment.",
    )
    args: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=256, description="Arguments to the entrypoint."
    )
    env: list[EnvVar] | None = Field(
        default=None, max_length=64, description="Extra environment variables for every node."
    )
    dataset: Annotated[Dataset, Field(json_schema_extra=immutable("dataset"))] = Field(
        description="Training data. Immutable."
    )
    hyperparameters: FreeFormObject | None = Field(
        default=None,
        json_schema_extra=immutable("hyperparameters"),
        description="Passed to the trainer as JSON in KILN_HYPERPARAMETERS (e.g. epochs, learningRate, batchSize, seed). Immutable.",
    )
    num_nodes: int = Field(
        default=1,
        ge=1,
        le=NUM_NODES_MAX,
        json_schema_extra=immutable("numNodes"),
        description="Number of pods (torchrun nodes), one per Kubernetes node. Immutable.",
    )
    num_proc_per_node: NumProcPerNode = Field(
        default="auto",
        description="Processes per node: an integer, or 'auto' = the GPU count in resourcesPerNode (any resource ending in 'gpu'), else 1.",
    )
    resources_per_node: ResourceRequirements | None = Field(
        default=None, description="Requests/limits of each pod's trainer container."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, description="Node labels each pod must match."
    )
    tolerations: list[Toleration] | None = Field(
        default=None,
        max_length=32,
        description="Tolerations. When GPUs are requested, a toleration for the nvidia.com/gpu taint is added unless one exists.",
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, description="PriorityClass of the pods."
    )
    service_account_name: str | None = Field(
        default=None, max_length=253, description="ServiceAccount the pods run as."
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Whole-gang restarts after a pod failure before the job fails. Disruptions (eviction, node loss) do not count.",
    )
    restart_backoff: RestartBackoff | None = Field(
        default=None, description="Back-off between gang restarts."
    )
    pod_failure_policy: PodFailurePolicy | None = Field(
        default=None,
        description="Exit-code rules: fail at once on permanent errors (kiln-train exits 2 on bad input), "
        "or restart without counting. Without it every failure counts against maxRestarts.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job (reason DeadlineExceeded) this long after it started."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the job this long after it Succeeded or Failed."
    )
    suspend: bool = Field(
        default=False,
        description="Delete the pods but keep the job; setting it back to false recreates them. "
        "A job queued in Kueue also gives its quota back (its Workload is deleted) and queues again on resume.",
    )
    output: Output | None = Field(default=None, description="Where the artifact goes.")
    storage: ObjectStorage | None = Field(
        default=None,
        description="Credentials and endpoint for s3:// URIs (dataset.uri, output.uri). Default: the operator's.",
    )


class TrainingJobPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    #: Waiting for Kueue to admit the gang (the job names a LocalQueue); no pods.
    QUEUED = "Queued"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class LastFailure(KilnModel):
    """The most recent pod failure."""

    pod: str = Field(default="", description="Pod that failed.")
    exit_code: int | None = Field(default=None, description="Container exit code, when it ran.")
    reason: str = Field(
        default="", description="Kubernetes reason (Error, OOMKilled, Evicted, ...) or Kiln's."
    )
    message: str = Field(default="", max_length=4096, description="Termination message or status message.")
    time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When it was observed."
    )


class TrainingResultStatus(KilnModel):
    """What rank 0 reported in its termination message."""

    artifact_uri: str = Field(description="Artifact directory.")
    digest: str = Field(description="sha256 of the weights, 'sha256:<hex>'.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics.")


class NodeCounts(KilnModel):
    """How many of the job's pods are in each phase."""

    pending: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0


class TrainingJobStatus(KilnModel):
    """Observed state of a TrainingJob."""

    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    conditions: Conditions | None = Field(
        default=None,
        description="Created, Running, Restarting, Succeeded, Failed, Suspended, Ready; Admitted for a job "
        "queued in Kueue (False while it waits, with Kueue's reason and message).",
    )
    phase: TrainingJobPhase | None = Field(default=None, description="Summary of the conditions, for people.")
    restart_count: int = Field(default=0, description="Gang restarts counted against maxRestarts.")
    disruption_count: int = Field(default=0, description="Gang restarts caused by disruptions (not counted).")
    gang: int = Field(
        default=0, description="Generation of the current set of pods; bumped at every gang restart."
    )
    created_gang: int | None = Field(
        default=None,
        description=(
            "The last gang all of whose numNodes pods were seen at once. Pods of that gang missing "
            "later were lost (a disruption: the gang restarts); pods of a gang never complete "
            "(creation interrupted or refused, e.g. by a ResourceQuota) are created again instead."
        ),
    )
    next_restart_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the gang will be recreated (back-off).",
    )
    last_failure: LastFailure | None = None
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    nodes: NodeCounts | None = Field(default=None, description="Pods per phase.")
    result: TrainingResultStatus | None = None
    registered_version: int | None = Field(default=None, description="Version registered in the Model.")
    workload: str | None = Field(
        default=None,
        description="The Kueue Workload (kueue.x-k8s.io/v1beta2, same namespace) that queues this job, "
        "when it names a LocalQueue with the kueue.x-k8s.io/queue-name label.",
    )


class TrainingJob(KilnModel):
    """A PyTorch DDP training run: one pod per node, torchrun in each, whole-gang restarts."""

    model_config = with_rules(*NAME_RULES)

    api_version: str = "kiln.dev/v1alpha1"
    kind: str = "TrainingJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None
