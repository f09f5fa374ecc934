"""FeatureGroup: feature definitions shared by training and serving.

Names follow Feast (entities, features, materialization, ``ttl`` -> ``maxAgeSeconds``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from kiln.api.common import (
    RFC3339,
    Conditions,
    FreeFormObject,
    KilnModel,
    LocalObjectReference,
    ObjectStorage,
    ResourceRequirements,
    Toleration,
    cel,
    with_rules,
)
from kiln.api.names import CRONJOB_NAME_MAX, max_length

IDENT = r"^[A-Za-z_][A-Za-z0-9_]*$"


class DType(StrEnum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    INT32 = "int32"
    INT64 = "int64"
    STRING = "string"
    BOOL = "bool"


class Entity(KilnModel):
    """A join key (e.g. customer_id)."""

    name: str = Field(min_length=1, max_length=63, pattern=IDENT, description="Column name of the join key.")
    dtype: DType = Field(
        default=DType.INT64, description="Type of the key: float32, float64, int32, int64, string, bool."
    )
    description: str | None = Field(default=None, max_length=1024, description="What the entity is.")


class TransformationType(StrEnum):
    IDENTITY = "Identity"
    LOG1P = "Log1p"
    STANDARDIZE = "Standardize"
    MIN_MAX_SCALE = "MinMaxScale"
    CLIP = "Clip"


#: Types that need a float feature (their result is a real number).
NUMERIC_TRANSFORMATIONS = ("Log1p", "Standardize", "MinMaxScale", "Clip")


class Transformation(KilnModel):
    """A declarative, stateless transformation of one source column (no code is evaluated).

    Parameters are given, not fitted from the data: a parameter fitted over the whole source would
    leak future values into training rows, and one fitted per run would make training and serving
    disagree. ``kiln.features`` applies it identically in materialization and in point-in-time
    retrieval. Formulas (x the source value, as a float64):

    - ``Identity``: x (cast to the feature's dtype).
    - ``Log1p``: ln(1 + x); null when x <= -1.
    - ``Standardize``: (x - mean) / std.
    - ``MinMaxScale``: (x - min) / (max - min).
    - ``Clip``: x limited to [min, max] (either bound may be omitted).
    """

    model_config = with_rules(
        cel(
            "self.type != 'Standardize' || (has(self.mean) && has(self.std))",
            "Standardize needs mean and std",
        ),
        cel(
            "self.type != 'MinMaxScale' || (has(self.min) && has(self.max) && self.min < self.max)",
            "MinMaxScale needs min < max",
        ),
        cel("self.type != 'Clip' || has(self.min) || has(self.max)", "Clip needs min or max"),
        cel(
            "!has(self.min) || !has(self.max) || self.min <= self.max",
            "min must not exceed max",
        ),
    )

    type: TransformationType = Field(
        default=TransformationType.IDENTITY,
        description="Identity, Log1p, Standardize ((x-mean)/std), MinMaxScale ((x-min)/(max-min)) or Clip (to [min, max]).",
    )
    column: str | None = Field(
        default=None, max_length=128, pattern=IDENT, description="Source column (default: the feature name)."
    )
    mean: float | None = Field(
        default=None, description="Standardize: the mean subtracted (given, not fitted)."
    )
    std: float | None = Field(
        default=None, gt=0, description="Standardize: the standard deviation divided by (> 0)."
    )
    min: float | None = Field(default=None, description="MinMaxScale: value mapped to 0; Clip: lower bound.")
    max: float | None = Field(default=None, description="MinMaxScale: value mapped to 1; Clip: upper bound.")

    @model_validator(mode="after")
    def _params(self) -> Transformation:
        t = self.type
        if t == TransformationType.STANDARDIZE and (self.mean is None or self.std is None):
            raise ValueError("Standardize needs mean and std")
        if t == TransformationType.MIN_MAX_SCALE and (
            self.min is None or self.max is None or self.min >= self.max
        ):
            raise ValueError("MinMaxScale needs min < max")
        if t == TransformationType.CLIP and self.min is None and self.max is None:
            raise ValueError("Clip needs min or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class Feature(KilnModel):
    """One feature: a typed value per entity and event time."""

    model_config = with_rules(
        cel(
            "!has(self.transformation) || self.transformation.type == 'Identity'"
            " || self.dtype in ['float32', 'float64']",
            "a transformed feature must be float32 or float64",
            field_path=".dtype",
        )
    )

    name: str = Field(
        min_length=1, max_length=63, pattern=IDENT, description="Feature name, unique in the group."
    )
    dtype: DType = Field(description="Value type: float32, float64, int32, int64, string, bool.")
    description: str | None = Field(default=None, max_length=1024, description="What the feature means.")
    transformation: Transformation | None = Field(
        default=None, description="How the value is derived from the source."
    )

    @model_validator(mode="after")
    def _float_if_transformed(self) -> Feature:
        t = self.transformation
        if t is not None and t.type in NUMERIC_TRANSFORMATIONS and self.dtype not in ("float32", "float64"):
            raise ValueError(f"feature {self.name}: a transformed feature must be float32 or float64")
        return self


class SourceFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"


class Source(KilnModel):
    """The event table features are read from."""

    uri: str = Field(min_length=1, max_length=2048, description="Path or file:// URI of the event table.")
    format: SourceFormat = Field(default=SourceFormat.PARQUET, description="csv or parquet.")
    timestamp_field: str = Field(
        default="event_timestamp",
        max_length=128,
        pattern=IDENT,
        description="Event time column used for point-in-time joins.",
    )
    storage: ObjectStorage | None = Field(
        default=None,
        description="Credentials and endpoint for an s3:// uri, given to the materialization Jobs. Default: the operator's (Helm values artifacts.s3).",
    )
    volume: FreeFormObject | None = Field(
        default=None,
        description="core/v1 VolumeSource holding a file:// uri, mounted read-only at the uri's parent directory in the materialization Jobs. Without it the path is the pod's own filesystem.",
    )


class Offline(KilnModel):
    """Offline (training) retrieval."""

    lookback_seconds: int = Field(
        default=86400,
        ge=1,
        description="A training row sees feature values at most this old (point-in-time join window).",
    )


class OnlineStoreType(StrEnum):
    REDIS = "Redis"


class OnlineStore(KilnModel):
    """The key-value store serving online lookups."""

    type: OnlineStoreType = Field(default=OnlineStoreType.REDIS, description="Store type; Redis today.")
    address: str = Field(
        min_length=1,
        max_length=1024,
        description="host:port of the store, or a redis:// / rediss:// URL.",
    )
    secret_ref: LocalObjectReference | None = Field(
        default=None,
        description="Secret in this namespace whose key KILN_REDIS_PASSWORD is the store's password, "
        "given to the materialization pods (envFrom).",
    )


class Online(KilnModel):
    """Online (serving) lookup."""

    model_config = with_rules(
        cel(
            "!self.enabled || has(self.store)",
            "online.enabled needs online.store",
            field_path=".store",
        )
    )

    enabled: bool = Field(default=False, description="Materialize into the online store.")
    store: OnlineStore | None = Field(default=None, description="Where online values live.")
    max_age_seconds: int = Field(
        default=86400, ge=1, description="Values older than this are not served (enforced at read time)."
    )


#: Most completions of one backfill (Indexed Job); a longer range gets longer windows.
MAX_WINDOWS = 1000


class Materialization(KilnModel):
    """How materialization runs: Jobs running ``python -m kiln.features materialize``."""

    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Image with the kiln package and its 'features' extra (the kiln trainer image). "
        "Default: the operator's (Helm values features.image, environment KILN_FEATURES_IMAGE).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="core/v1 imagePullPolicy of the materialization container."
    )
    start_time: str | None = Field(
        default=None,
        json_schema_extra={"format": RFC3339},
        description="Start of the first run's range (the backfill), RFC 3339. Default: online.maxAgeSeconds "
        "before the run (older values would never be served).",
    )
    window_seconds: int = Field(
        default=86400,
        ge=60,
        description="A backfill is an Indexed Job with one completion per time window of this length "
        f"(at most {MAX_WINDOWS} windows: a longer range gets longer windows).",
    )
    parallelism: int = Field(
        default=4, ge=1, le=100, description="Pods of one backfill running at once (the Job's parallelism)."
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Pod retries of a run after transient failures (exit 3: the online or object store was "
        "unavailable). A source or schema error (exit 1) fails the run at once.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail a run (reason DeadlineExceeded) this long after it started."
    )
    ttl_seconds_after_finished: int = Field(
        default=86400,
        ge=0,
        description="Delete a finished run's Job this long after it ended (its result is in status by then).",
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="Requests/limits of each materialization pod. DuckDB may use half the memory limit "
        "(it spills to /tmp beyond it). Default: requests cpu 250m, memory 512Mi; limit memory 2Gi.",
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        description="ServiceAccount the pods run as (e.g. for a workload identity).",
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Tolerations of the pods."
    )


class FeatureGroupSpec(KilnModel):
    """Desired state of a FeatureGroup."""

    model_config = with_rules(
        cel(
            "self.features.all(f, self.features.filter(g, g.name == f.name).size() == 1)",
            "feature names must be unique",
            field_path=".features",
        ),
        cel(
            "self.features.all(f, !self.entities.exists(e, e.name == f.name))",
            "a feature cannot be named like an entity",
            field_path=".features",
        ),
    )

    entities: list[Entity] = Field(min_length=1, max_length=8, description="Join keys of every row.")
    features: list[Feature] = Field(min_length=1, max_length=256, description="Feature definitions.")
    source: Source = Field(description="Where raw values come from.")
    offline: Offline = Field(default_factory=Offline, description="Training-time retrieval.")
    online: Online = Field(default_factory=Online, description="Serving-time retrieval.")
    schedule: str | None = Field(
        default=None,
        max_length=128,
        pattern=r"^(@(hourly|daily|weekly|monthly|yearly)|(\S+\s+){4}\S+)$",
        description="Cron schedule of incremental materialization (a CronJob named like the group): each run "
        "writes the values from status.lastMaterializationTime to its start.",
    )
    materialization: Materialization = Field(
        default_factory=Materialization, description="How materialization Jobs run."
    )

    @model_validator(mode="after")
    def _unique(self) -> FeatureGroupSpec:
        names = [f.name for f in self.features]
        if len(names) != len(set(names)):
            raise ValueError("feature names must be unique")
        if set(names) & {e.name for e in self.entities}:
            raise ValueError("a feature cannot be named like an entity")
        return self


class RunTrigger(StrEnum):
    BACKFILL = "Backfill"
    REQUESTED = "Requested"
    SCHEDULE = "Schedule"
    VALIDATION = "Validation"


class RunPhase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class MaterializationRun(KilnModel):
    """One run (a Job) as the operator last observed it."""

    job_name: str = Field(description="The Job.")
    trigger: RunTrigger = Field(
        description="Backfill (first run, or new definitions), Requested (kiln features materialize), "
        "Schedule (the CronJob), Validation (online store disabled: source check only)."
    )
    phase: RunPhase = Field(description="Running, Succeeded or Failed.")
    generation: int | None = Field(
        default=None, description="The FeatureGroup's metadata.generation the run was started for."
    )
    schema_digest: str | None = Field(default=None, description="The definitions the run wrote.")
    start: str | None = Field(
        default=None, json_schema_extra={"format": RFC3339}, description="Start of the event-time range."
    )
    end: str | None = Field(
        default=None, json_schema_extra={"format": RFC3339}, description="End (excluded) of the range."
    )
    windows: int | None = Field(default=None, description="Time windows (Indexed Job completions).")
    rows_written: int | None = Field(default=None, description="Online rows written (Succeeded).")
    duration_seconds: float | None = Field(
        default=None, description="From the Job's start to its completion (Succeeded)."
    )
    failed_pods: int | None = Field(
        default=None, description="Pods that failed (each transient failure is retried up to backoffLimit)."
    )
    reason: str | None = Field(
        default=None,
        description="Why it failed: ColumnMissing, ColumnTypeMismatch, TimestampColumnInvalid, SourceNotFound, "
        "SourceUnreadable, OnlineStoreUnavailable, or the Job's (BackoffLimitExceeded, DeadlineExceeded).",
    )
    message: str | None = Field(default=None, max_length=4096, description="Details (names the column).")
    column: str | None = Field(default=None, description="The source column at fault, when one is.")
    transient: bool | None = Field(
        default=None,
        description="The failure was transient (exit 3: a store unavailable): a backfill or validation "
        "is retried after 5 minutes, a scheduled run at the next schedule.",
    )
    start_time: str | None = Field(
        default=None, json_schema_extra={"format": RFC3339}, description="When the Job started."
    )
    completion_time: str | None = Field(
        default=None, json_schema_extra={"format": RFC3339}, description="When it ended."
    )


class FeatureGroupStatus(KilnModel):
    observed_generation: int | None = None
    conditions: Conditions | None = None
    schema_digest: str | None = Field(default=None, description="sha256 of the feature definitions.")
    last_materialization_time: str | None = Field(
        default=None,
        json_schema_extra={"format": RFC3339},
        description="The watermark: every event time before it is in the online store. Advanced only by a "
        "successful run of the current definitions; the next incremental run starts here.",
    )
    materialized_rows: int | None = Field(
        default=None, description="Rows written by the run that set lastMaterializationTime."
    )
    materialized_duration_seconds: float | None = Field(
        default=None, description="Duration of the run that set lastMaterializationTime."
    )
    materialized_schema_digest: str | None = Field(
        default=None,
        description="The schemaDigest lastMaterializationTime refers to; new definitions start over.",
    )
    last_run: MaterializationRun | None = Field(
        default=None, description="The latest finished run (Succeeded or Failed), whatever started it."
    )
    active_run: MaterializationRun | None = Field(default=None, description="The run in progress, if any.")
    last_handled_materialize_at: str | None = Field(
        default=None,
        description="The value of annotation kiln.dev/materialize-requested-at last acted on (a run was started).",
    )


class FeatureGroup(KilnModel):
    """Feature definitions with point-in-time training data and online lookup."""

    model_config = with_rules(
        max_length("FeatureGroup", CRONJOB_NAME_MAX, "the group's materialization CronJob")
    )

    api_version: str = "kiln.dev/v1alpha1"
    kind: str = "FeatureGroup"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FeatureGroupSpec
    status: FeatureGroupStatus | None = None
