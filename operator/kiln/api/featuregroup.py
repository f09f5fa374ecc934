"""FeatureGroup: feature definitions shared by training and serving.

Names follow Feast (entities, features, materialization, ``ttl`` -> ``maxAgeSeconds``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from kiln.api.common import Conditions, KilnModel, cel, with_rules
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


class Transformation(KilnModel):
    """A named, stateless-or-fitted transformation of one source column."""

    type: TransformationType = Field(
        default=TransformationType.IDENTITY,
        description="Identity, Log1p, Standardize (fitted mean/std) or MinMaxScale (fitted min/max).",
    )
    column: str | None = Field(
        default=None, max_length=128, pattern=IDENT, description="Source column (default: the feature name)."
    )


class Feature(KilnModel):
    name: str = Field(
        min_length=1, max_length=63, pattern=IDENT, description="Feature name, unique in the group."
    )
    dtype: DType = Field(description="Value type: float32, float64, int32, int64, string, bool.")
    description: str | None = Field(default=None, max_length=1024, description="What the feature means.")
    transformation: Transformation | None = Field(
        default=None, description="How the value is derived from the source."
    )


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
    address: str = Field(min_length=1, max_length=1024, description="host:port of the store.")


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
        description="Cron schedule of materialization (a CronJob).",
    )

    @model_validator(mode="after")
    def _unique(self) -> FeatureGroupSpec:
        names = [f.name for f in self.features]
        if len(names) != len(set(names)):
            raise ValueError("feature names must be unique")
        if set(names) & {e.name for e in self.entities}:
            raise ValueError("a feature cannot be named like an entity")
        return self


class FeatureGroupStatus(KilnModel):
    observed_generation: int | None = None
    conditions: Conditions | None = None
    last_materialization_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    materialized_rows: int | None = None
    schema_digest: str | None = None


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
