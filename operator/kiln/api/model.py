"""Model: a model registry kept in the resource's status.

Versions are numbered 1, 2, 3, ... and immutable. Stages follow MLflow's names (Development,
Staging, Production, Archived); aliases follow MLflow's model aliases (``champion -> 3``).
Spec holds what people declare (GitOps); status holds what the registry knows and decided.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from croniter import croniter
from pydantic import Field, model_validator

from kiln.api.common import (
    STORAGE_URI_PATTERN,
    Conditions,
    FreeForm,
    KilnModel,
    LocalObjectReference,
    PrometheusProvider,
    cel,
    with_rules,
)
from kiln.api.names import DNS_LABEL_MAX, NAME
from kiln.api.trainingjob import TrainingJobSpec

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
VersionNumber = Annotated[int, Field(ge=1, le=1_000_000)]
#: Most metrics / hyperparameters kept per version in status (the artifact's metadata.json has all).
MAX_VERSION_MAP_KEYS = 64
#: Most audit entries kept in status.history (oldest dropped first).
HISTORY_LIMIT = 100
#: Most versions status.versions can hold: versionHistoryLimit (<= 200) plus every pinned version
#: (3 stages + 100 archived + 64 aliases + 3 policy picks = 170).
MAX_KEPT_VERSIONS = 400
#: Annotation asking for a retraining run: every new value is one request (e.g. a timestamp).
RETRAIN_REQUEST_ANNOTATION = "kiln.dev/retrain-requested-at"
#: Schema marker (see :mod:`kiln.api.crd`): the object embeds another kind's spec as a template,
#: whose transition rules (``oldSelf``: immutable fields) must not apply inside this kind.
TEMPLATE_MARK = "x-kiln-template"
#: Five cron fields (minute hour day-of-month month day-of-week), or a @-macro such as @daily.
CRON_PATTERN = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"


class Stage(StrEnum):
    NONE = "None"
    DEVELOPMENT = "Development"
    STAGING = "Staging"
    PRODUCTION = "Production"
    ARCHIVED = "Archived"


class StageAssignments(KilnModel):
    """At most one version per stage (the map shape enforces it); a version holds one stage."""

    model_config = with_rules(
        cel(
            "!(has(self.development) && has(self.staging) && self.development == self.staging) && "
            "!(has(self.staging) && has(self.production) && self.staging == self.production) && "
            "!(has(self.development) && has(self.production) && self.development == self.production)",
            "a version can hold only one stage",
        ),
        cel(
            "!has(self.archived) || self.archived.all(a, (!has(self.development) || a != self.development) && "
            "(!has(self.staging) || a != self.staging) && (!has(self.production) || a != self.production))",
            "an archived version cannot also hold a stage",
            field_path=".archived",
        ),
    )

    development: VersionNumber | None = Field(default=None, description="Version in Development.")
    staging: VersionNumber | None = Field(default=None, description="Version in Staging.")
    production: VersionNumber | None = Field(default=None, description="Version in Production (at most one).")
    archived: list[VersionNumber] | None = Field(
        default=None,
        max_length=100,
        json_schema_extra={"x-kubernetes-list-type": "set"},
        description="Versions retired from service.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> StageAssignments:
        held = [v for v in (self.development, self.staging, self.production) if v is not None]
        if len(held) != len(set(held)):
            raise ValueError("a version can hold only one stage")
        if self.archived and set(self.archived) & set(held):
            raise ValueError("an archived version cannot also hold a stage")
        return self

    def stage_of(self, version: int) -> Stage:
        """The stage ``version`` holds here (``Stage.NONE`` when it holds none)."""
        for stage, v in (
            (Stage.PRODUCTION, self.production),
            (Stage.STAGING, self.staging),
            (Stage.DEVELOPMENT, self.development),
        ):
            if v == version:
                return stage
        if self.archived and version in self.archived:
            return Stage.ARCHIVED
        return Stage.NONE


class PromotionRule(KilnModel):
    """Promote a newly registered version to ``stage`` when ``metric`` is within bounds."""

    model_config = with_rules(cel("has(self.min) || has(self.max)", "a promotion rule needs min or max"))

    stage: Annotated[str, Field(json_schema_extra={"enum": ["Development", "Staging", "Production"]})] = (
        Field(description="Stage to promote to: Development, Staging or Production.")
    )
    metric: str = Field(
        min_length=1, max_length=128, description="Metric name in the version's metrics, e.g. accuracy."
    )
    min: float | None = Field(default=None, description="Promote when metric >= min.")
    max: float | None = Field(default=None, description="Promote when metric <= max.")

    @model_validator(mode="after")
    def _bound(self) -> PromotionRule:
        if self.min is None and self.max is None:
            raise ValueError("a promotion rule needs min or max")
        if self.stage not in ("Development", "Staging", "Production"):
            raise ValueError("stage must be Development, Staging or Production")
        return self


class ImportedVersion(KilnModel):
    """A version trained elsewhere: its artifact and the digest it must have."""

    artifact_uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=STORAGE_URI_PATTERN,
        description="Artifact directory: s3://bucket/prefix, file:// URI or absolute path.",
    )
    digest: str = Field(pattern=DIGEST_PATTERN, description="Expected sha256 of the weights, 'sha256:<hex>'.")
    metrics: dict[str, float] | None = Field(default=None, description="Metrics known for it.")
    hyperparameters: dict[str, FreeForm] | None = Field(default=None, description="Hyperparameters used.")


_ALIAS_RULES: dict[str, Any] = {
    "x-kubernetes-validations": [
        cel(f"self.all(k, k.matches('{ALIAS_PATTERN}'))", "alias names must match " + ALIAS_PATTERN)
    ]
}


class TemplateMetadata(KilnModel):
    """Labels and annotations of the objects made from a template."""

    labels: dict[str, str] | None = Field(default=None, description="Labels added to each TrainingJob.")
    annotations: dict[str, str] | None = Field(
        default=None, description="Annotations added to each TrainingJob."
    )


class TrainingJobTemplate(KilnModel):
    """The TrainingJob a retraining run creates, as a CronJob's jobTemplate describes its Jobs."""

    model_config = with_rules(
        cel(
            "!has(self.spec.modelRef)",
            "retraining.template.spec.modelRef is set by the operator to this Model; leave it out",
            field_path=".spec.modelRef",
        )
    )

    metadata: TemplateMetadata | None = Field(default=None, description="Labels and annotations.")
    spec: Annotated[TrainingJobSpec, Field(json_schema_extra={TEMPLATE_MARK: True})] = Field(
        description="TrainingJob spec without modelRef (every run registers its version in this Model)."
    )

    @model_validator(mode="after")
    def _no_model_ref(self) -> TrainingJobTemplate:
        if self.spec.model_ref is not None:
            raise ValueError("modelRef is set by the operator to this Model; leave it out")
        return self


class DriftTrigger(KilnModel):
    """Retrain when a PromQL query stays above ``threshold`` for ``forSeconds`` (alert semantics)."""

    prometheus: PrometheusProvider = Field(description="The Prometheus the query runs against.")
    query: str = Field(
        min_length=1,
        max_length=4096,
        description="PromQL returning one or more samples (the largest counts), e.g. "
        'max(kiln_feature_drift{namespace="{{namespace}}",model="{{model}}",method="psi"}); '
        "{{namespace}} and {{model}} are substituted.",
    )
    threshold: float = Field(description="Above this value the trigger is pending.")
    for_seconds: int = Field(
        default=300, ge=0, le=604800, description="How long the value must stay above before a run starts."
    )
    interval_seconds: int = Field(
        default=60, ge=5, le=3600, description="Time between two evaluations of the query."
    )


class ScheduleTrigger(KilnModel):
    """Retrain on a cron schedule (UTC)."""

    cron: str = Field(
        max_length=256,
        pattern=CRON_PATTERN,
        description="Cron expression in UTC, e.g. '0 3 * * 0' (Sundays 03:00) or @daily.",
    )

    @model_validator(mode="after")
    def _valid(self) -> ScheduleTrigger:
        if not croniter.is_valid(self.cron):
            raise ValueError(f"invalid cron expression {self.cron!r}")
        return self


class NewDataTrigger(KilnModel):
    """Retrain when a FeatureGroup has materialized new data (its status.lastMaterializationTime advanced)."""

    feature_group_ref: LocalObjectReference = Field(description="A FeatureGroup in this namespace.")


class RetrainingTriggers(KilnModel):
    """What starts a retraining run; the annotation kiln.dev/retrain-requested-at always does."""

    drift: DriftTrigger | None = Field(default=None, description="A Prometheus query over a threshold.")
    schedule: ScheduleTrigger | None = Field(default=None, description="A cron schedule.")
    new_data: NewDataTrigger | None = Field(default=None, description="New data in a FeatureGroup.")


class RetrainingBackoff(KilnModel):
    """Wait after a failed run: initialSeconds * 2^(failures-1), capped at maxSeconds."""

    model_config = with_rules(
        cel("self.maxSeconds >= self.initialSeconds", "maxSeconds must be >= initialSeconds")
    )

    initial_seconds: int = Field(default=60, ge=0, le=86400, description="Wait after the first failure.")
    max_seconds: int = Field(default=3600, ge=0, le=604800, description="Longest wait.")


class Retraining(KilnModel):
    """Turn triggers into TrainingJobs of this Model, one at a time, with a cooldown (docs/monitoring.md)."""

    template: TrainingJobTemplate = Field(description="The TrainingJob each run creates.")
    triggers: RetrainingTriggers = Field(
        default_factory=RetrainingTriggers, description="Automatic triggers."
    )
    cooldown_seconds: int = Field(
        default=3600,
        ge=0,
        le=2592000,
        description="After a successful run, automatic triggers wait this long (from its end).",
    )
    backoff: RetrainingBackoff = Field(
        default_factory=RetrainingBackoff, description="Wait after failed runs."
    )
    max_consecutive_failures: int = Field(
        default=3,
        ge=1,
        le=100,
        description="After this many failed runs in a row, retraining is suspended "
        "(RetrainingSuspended=True) until a run succeeds: a manual request (the annotation) or a "
        "change of the template tries again.",
    )
    suspend: bool = Field(default=False, description="Start no run (triggers still observed).")


class ModelSpec(KilnModel):
    """Desired state of a Model (what people declare)."""

    description: str | None = Field(default=None, max_length=4096, description="What the model is for.")
    version_history_limit: int = Field(
        default=20,
        ge=1,
        le=200,
        description="Newest versions kept in status; versions holding a stage or alias are always kept.",
    )
    stages: StageAssignments | None = Field(
        default=None,
        description="Declared stage of each version, e.g. production: 3. A promotion is a reviewed change of this field.",
    )
    aliases: dict[str, VersionNumber] | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=_ALIAS_RULES,
        description="Named pointers to versions (MLflow aliases), e.g. champion: 3.",
    )
    promotion_policy: list[PromotionRule] | None = Field(
        default=None,
        max_length=8,
        description="Automatic promotion of new versions; results go to status, and spec.stages wins for a stage it declares.",
    )
    import_: list[ImportedVersion] | None = Field(
        default=None,
        alias="import",
        max_length=100,
        description="Versions trained elsewhere, registered in list order.",
    )
    retraining: Retraining | None = Field(
        default=None,
        description="Retrain on drift, a schedule, new data or request: creates TrainingJobs from a template.",
    )


class VersionSource(StrEnum):
    TRAINING_JOB = "TrainingJob"
    IMPORT = "Import"
    REBUILD = "Rebuild"


class Lineage(KilnModel):
    """Where a version came from."""

    source: VersionSource = Field(description="TrainingJob, Import or Rebuild.")
    training_job: str | None = Field(default=None, description="Name of the TrainingJob that produced it.")
    dataset: str | None = Field(default=None, description="Dataset name or URI.")
    dataset_digest: str | None = Field(default=None, description="sha256 of the dataset.")
    feature_group: str | None = Field(
        default=None, description="FeatureGroup the features came from (a name in the Model's namespace)."
    )
    feature_group_schema_digest: str | None = Field(
        default=None,
        description="That FeatureGroup's schema digest when trained: serving refuses a version trained on other definitions.",
    )
    image: str | None = Field(default=None, description="Trainer image.")
    retraining_trigger: str | None = Field(
        default=None,
        max_length=256,
        description="What started the retraining run that produced it (Drift, Schedule, NewData, Manual).",
    )


class ModelVersion(KilnModel):
    """One registered version; immutable (the API server refuses changes to a kept one)."""

    # status.versions is a list-map keyed by version, so each item is correlated with its old
    # self and this transition rule applies: versions may be added or pruned, never changed.

    model_config = with_rules(
        cel(
            "self.artifactUri == oldSelf.artifactUri && self.digest == oldSelf.digest && "
            "self.createdAt == oldSelf.createdAt",
            "a registered version is immutable",
        )
    )

    version: VersionNumber = Field(description="Version number: 1, 2, 3, ... never reused.")
    artifact_uri: str = Field(
        max_length=2048, description="Artifact directory: s3://bucket/prefix or file:// URI."
    )
    digest: str = Field(pattern=DIGEST_PATTERN, max_length=71, description="sha256 of the weights file.")
    metrics: dict[str, float] | None = Field(
        default=None, max_length=MAX_VERSION_MAP_KEYS, description="Evaluation metrics."
    )
    hyperparameters: dict[str, FreeForm] | None = Field(
        default=None, max_length=MAX_VERSION_MAP_KEYS, description="Hyperparameters of the run."
    )
    lineage: Lineage | None = Field(default=None, description="Where the version came from.")
    created_at: str = Field(
        max_length=64, json_schema_extra={"format": "date-time"}, description="When the artifact was written."
    )
    format: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9.-]*$",
        description="Artifact format from its metadata.json (kiln-mlp, torch-export, onnx, hf-transformers): "
        "it decides which InferenceService runtime engine serves the version. Unset when it could not be read.",
    )


class HistoryCause(StrEnum):
    REGISTRATION = "Registration"
    SPEC_CHANGE = "SpecChange"
    POLICY = "Policy"
    ROLLBACK = "Rollback"
    CANARY_ROLLBACK = "CanaryRollback"
    RETRAINING = "Retraining"


class HistoryEntry(KilnModel):
    """One change of a stage or alias, a canary rollback of a serving, or a retraining run (the audit trail)."""

    time: str = Field(json_schema_extra={"format": "date-time"}, description="When the change took effect.")
    stage: Annotated[
        str | None, Field(json_schema_extra={"enum": ["Development", "Staging", "Production", "Archived"]})
    ] = Field(default=None, description="Stage changed (absent for alias changes).")
    alias: str | None = Field(
        default=None, max_length=63, description="Alias changed (absent for stage changes)."
    )
    inference_service: str | None = Field(
        default=None,
        max_length=253,
        description="InferenceService that rolled a canary of fromVersion back to toVersion (cause CanaryRollback).",
    )
    training_job: str | None = Field(
        default=None,
        max_length=253,
        description="TrainingJob a retraining run created (cause Retraining); message says what triggered it.",
    )
    from_version: int | None = Field(default=None, description="Version that held it before (absent: none).")
    to_version: int | None = Field(default=None, description="Version that holds it now (absent: none).")
    cause: HistoryCause = Field(
        description="SpecChange, Policy, Rollback, Registration, CanaryRollback or Retraining."
    )
    message: str | None = Field(default=None, max_length=1024, description="Details, e.g. the policy rule.")


class RetrainingTriggerKind(StrEnum):
    DRIFT = "Drift"
    SCHEDULE = "Schedule"
    NEW_DATA = "NewData"
    MANUAL = "Manual"


class RetrainingResult(StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class RetrainingRun(KilnModel):
    """One retraining TrainingJob."""

    name: str = Field(description="TrainingJob name.")
    number: int = Field(ge=1, description="Run number (1, 2, ...), also in the name.")
    triggers: list[RetrainingTriggerKind] = Field(description="What started it.")
    message: str = Field(default="", max_length=1024, description="Trigger details.")
    start_time: str = Field(json_schema_extra={"format": "date-time"}, description="When it was created.")
    completion_time: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="When it ended."
    )
    result: RetrainingResult | None = Field(
        default=None, description="Succeeded or Failed; absent while it runs."
    )
    reason: str | None = Field(
        default=None,
        max_length=64,
        description="Why it failed: TrainingJobFailed, TemplateRejected (the API server refused the TrainingJob) or TrainingJobMissing.",
    )
    template_hash: str | None = Field(
        default=None, max_length=64, description="Digest of the template it was made from."
    )


class DriftObservation(KilnModel):
    """The drift trigger's last evaluation."""

    value: float | None = Field(default=None, description="Largest sample (absent: no data or NaN).")
    above_since: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="Above threshold since."
    )
    last_evaluation_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    error: str | None = Field(default=None, max_length=1024, description="Why the query failed.")


class RetrainingStatus(KilnModel):
    """State of the retraining loop (everything :mod:`kiln.registry.retraining` decides from)."""

    runs: int = Field(default=0, description="Retraining runs created so far.")
    last_run: RetrainingRun | None = Field(default=None, description="The newest run.")
    consecutive_failures: int = Field(default=0, description="Failed runs in a row (reset by a success).")
    next_run_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="Earliest start of an automatic run (end of cooldown or back-off).",
    )
    pending: list[RetrainingTriggerKind] | None = Field(
        default=None, description="Triggers that fired and wait for a run."
    )
    drift: DriftObservation | None = None
    observed_request: str | None = Field(
        default=None,
        max_length=1024,
        description="The last kiln.dev/retrain-requested-at value acted on (or seen when retraining was enabled).",
    )
    observed_feature_group: str | None = Field(
        default=None, description="FeatureGroup the materialization time below belongs to."
    )
    observed_materialization_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="The FeatureGroup's lastMaterializationTime last acted on (or seen when the trigger was set).",
    )
    last_schedule_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="The last cron time acted on (or when the schedule was set).",
    )


class ModelStatus(KilnModel):
    """Observed state of a Model: the registry itself."""

    observed_generation: int | None = None
    conditions: Conditions | None = None
    latest_version: int = Field(default=0, description="Highest version number ever issued (never reused).")
    versions: list[ModelVersion] | None = Field(
        default=None,
        max_length=MAX_KEPT_VERSIONS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["version"]},
        description="Kept versions, oldest first.",
    )
    stages: StageAssignments | None = Field(
        default=None, description="Stages in force (spec, policy, rollbacks)."
    )
    policy_stages: StageAssignments | None = Field(
        default=None,
        description="Latest version promotionPolicy picked per stage; in force for each stage spec.stages does not declare.",
    )
    aliases: dict[str, int] | None = Field(default=None, description="Aliases in force.")
    history: list[HistoryEntry] | None = Field(
        default=None, max_length=HISTORY_LIMIT, description="Stage and alias changes, newest last, bounded."
    )
    imported: int = Field(default=0, description="How many spec.import entries are registered.")
    retraining: RetrainingStatus | None = Field(default=None, description="The retraining loop.")


class Model(KilnModel):
    """A registry of model versions with stages, aliases, lineage and an audit trail."""

    # Retraining TrainingJobs carry the label kiln.dev/model: <name> (at most 63 characters); their
    # names are derived from the Model's and cut to fit (kiln.resources.retraining).
    model_config = with_rules(
        cel(
            f"!has(self.spec.retraining) || {NAME}.size() <= {DNS_LABEL_MAX}",
            f"a Model with spec.retraining needs a name of at most {DNS_LABEL_MAX} characters: it is "
            "the kiln.dev/model label value of its TrainingJobs",
            field_path=".metadata.name",
        )
    )

    api_version: str = "kiln.dev/v1alpha1"
    kind: str = "Model"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelSpec = Field(default_factory=ModelSpec)
    status: ModelStatus | None = None
