"""FeatureGroup: feature definitions shared by training and serving.

Names follow Feast (entities, features, materialization, ``ttl`` -> ``maxAgeSeconds``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from kiln.api.common import Conditions, KilnModel, cel

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

    name: str = Field(min_length=1, max_length=63, pattern=IDENT)
    dtype: DType = DType.INT64
    description: str | None = Field(default=None, max_length=1024)


class TransformationType(StrEnum):
    IDENTITY = "Identity"
    LOG1P = "Log1p"
    STANDARDIZE = "Standardize"
    MIN_MAX_SCALE = "MinMaxScale"


class Transformation(KilnModel):
    """A named, stateless-or-fitted transformation of one source column."""

    type: TransformationType = TransformationType.IDENTITY
    column: str | None = Field(default=None, max_length=128, pattern=IDENT, description="Source column (default: the feature name).")


class Feature(KilnModel):
    name: str = Field(min_length=1, max_length=63, pattern=IDENT)
    dtype: DType
    description: str | None = Field(default=None, max_length=1024)
    transformation: Transformation | None = None


class SourceFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"


class Source(KilnModel):
    uri: str = Field(min_length=1, max_length=2048, description="Path or file:// URI of the event table.")
    format: SourceFormat = SourceFormat.PARQUET
    timestamp_field: str = Field(default="event_timestamp", max_length=128, pattern=IDENT,
                                 description="Event time column used for point-in-time joins.")


class Offline(KilnModel):
    lookback_seconds: int = Field(
        default=86400, ge=1, description="A training row sees feature values at most this old (point-in-time join window)."
    )


class OnlineStoreType(StrEnum):
    REDIS = "Redis"


class OnlineStore(KilnModel):
    type: OnlineStoreType = OnlineStoreType.REDIS
    address: str = Field(min_length=1, max_length=1024, description="host:port of the store.")


class Online(KilnModel):
    model_config = KilnModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [cel("!self.enabled || has(self.store)", "online.enabled needs online.store",
                                             field_path=".store")]
        }
    }

    enabled: bool = False
    store: OnlineStore | None = None
    max_age_seconds: int = Field(
        default=86400, ge=1, description="Values older than this are not served (enforced at read time)."
    )


class FeatureGroupSpec(KilnModel):
    model_config = KilnModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("self.features.all(f, self.features.filter(g, g.name == f.name).size() == 1)",
                    "feature names must be unique", field_path=".features"),
                cel("self.features.all(f, !self.entities.exists(e, e.name == f.name))",
                    "a feature cannot be named like an entity", field_path=".features"),
            ]
        }
    }

    entities: list[Entity] = Field(min_length=1, max_length=8)
    features: list[Feature] = Field(min_length=1, max_length=256)
    source: Source
    offline: Offline = Field(default_factory=Offline)
    online: Online = Field(default_factory=Online)
    schedule: str | None = Field(
        default=None, max_length=128, pattern=r"^(@(hourly|daily|weekly|monthly|yearly)|(\S+\s+){4}\S+)$",
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

    api_version: str = "kiln.dev/v1alpha1"
    kind: str = "FeatureGroup"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FeatureGroupSpec
    status: FeatureGroupStatus | None = None
