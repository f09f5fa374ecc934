"""Model: a model registry kept in the resource's status.

Versions are numbered 1, 2, 3, ... and immutable. Stages follow MLflow's names (Development,
Staging, Production, Archived); aliases follow MLflow's model aliases (``champion -> 3``).
Spec holds what people declare (GitOps); status holds what the registry knows and decided.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, model_validator

from kiln.api.common import STORAGE_URI_PATTERN, Conditions, FreeForm, KilnModel, cel, with_rules

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


class HistoryCause(StrEnum):
    REGISTRATION = "Registration"
    SPEC_CHANGE = "SpecChange"
    POLICY = "Policy"
    ROLLBACK = "Rollback"
    CANARY_ROLLBACK = "CanaryRollback"


class HistoryEntry(KilnModel):
    """One change of a stage or alias, or one canary rollback of a serving (the audit trail)."""

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
    from_version: int | None = Field(default=None, description="Version that held it before (absent: none).")
    to_version: int | None = Field(default=None, description="Version that holds it now (absent: none).")
    cause: HistoryCause = Field(description="SpecChange, Policy, Rollback, Registration or CanaryRollback.")
    message: str | None = Field(default=None, max_length=1024, description="Details, e.g. the policy rule.")


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


class Model(KilnModel):
    """A registry of model versions with stages, aliases, lineage and an audit trail."""

    # No rule on metadata.name (kiln.api.names): no child object takes its name from a Model.

    api_version: str = "kiln.dev/v1alpha1"
    kind: str = "Model"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelSpec = Field(default_factory=ModelSpec)
    status: ModelStatus | None = None
