"""The pure part of the feature store: the feature view, its schema checks, its ONE transformation
function, and the online key/value encoding. No I/O, no heavy imports (no duckdb, pyarrow, redis),
so the operator may import this module to validate and digest a FeatureGroup.

Names follow Feast: a *feature view* is a FeatureGroup's features over its *entities* (join keys),
read from an offline *source* with an *event timestamp* column.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kiln.api.featuregroup import FeatureGroup, FeatureGroupSpec
from kiln.features.errors import (
    COLUMN_MISSING,
    COLUMN_TYPE_MISMATCH,
    TIMESTAMP_COLUMN_INVALID,
    SourceError,
)

#: Internal column holding the event time as integer microseconds since the Unix epoch (UTC).
TS = "__kiln_ts"
#: Hash field of an online row holding that event time (microseconds, decimal).
TS_FIELD = "_ts"

#: Declared dtype -> DuckDB type of the value.
SQL_TYPES = {
    "float32": "FLOAT",
    "float64": "DOUBLE",
    "int32": "INTEGER",
    "int64": "BIGINT",
    "string": "VARCHAR",
    "bool": "BOOLEAN",
}
_INTEGER = {
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
}
_FLOAT = {"FLOAT", "DOUBLE"}
#: Source column types accepted for each declared dtype (DuckDB type names; DECIMAL(p,s) too).
ACCEPTED = {
    "int32": _INTEGER,
    "int64": _INTEGER,
    "float32": _INTEGER | _FLOAT | {"DECIMAL"},
    "float64": _INTEGER | _FLOAT | {"DECIMAL"},
    "string": {"VARCHAR"},
    "bool": {"BOOLEAN"},
}
TIMESTAMP_TYPES = {
    "TIMESTAMP",
    "TIMESTAMP_S",
    "TIMESTAMP_MS",
    "TIMESTAMP_NS",
    "TIMESTAMP WITH TIME ZONE",
    "DATE",
}


def quote(ident: str) -> str:
    """A DuckDB identifier, double-quoted (names are already restricted by the API's patterns)."""
    return '"' + ident.replace('"', '""') + '"'


def base_type(duckdb_type: str) -> str:
    """``DECIMAL(10,2)`` -> ``DECIMAL``; other names unchanged (upper-cased)."""
    return re.sub(r"\(.*\)$", "", duckdb_type.strip().upper())


def schema_digest(spec: FeatureGroupSpec) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``spec.features`` (names, dtypes, transformations).

    The same digest the FeatureGroup controller writes to ``status.schemaDigest``; online keys
    carry a prefix of it, so values computed under other definitions are never served.
    """
    canonical = json.dumps(spec.to_api()["features"], sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class FeatureView:
    """A FeatureGroup as the feature store uses it: its identity and its validated spec.

    Treat ``spec`` as immutable: ``digest`` and ``key_prefix`` are computed once.
    """

    namespace: str
    name: str
    spec: FeatureGroupSpec

    @classmethod
    def from_object(cls, obj: Mapping[str, Any] | FeatureGroup, namespace: str | None = None) -> FeatureView:
        """From a FeatureGroup object (dict as the API server returns it, or the model).

        ``namespace`` overrides ``metadata.namespace`` (default ``default``).

        Raises:
            pydantic.ValidationError: the spec is invalid.
            ValueError: ``metadata.name`` is missing.
        """
        fg = obj if isinstance(obj, FeatureGroup) else FeatureGroup.model_validate(obj)
        name = fg.metadata.get("name")
        if not name:
            raise ValueError("the FeatureGroup has no metadata.name")
        return cls(namespace or fg.metadata.get("namespace") or "default", name, fg.spec)

    @cached_property
    def digest(self) -> str:
        return schema_digest(self.spec)

    @cached_property
    def key_prefix(self) -> str:
        """``kiln:fg:<namespace>:<name>:<first 12 hex of the schema digest>:``."""
        return f"kiln:fg:{self.namespace}:{self.name}:{self.digest.split(':', 1)[1][:12]}:"

    @property
    def entity_names(self) -> list[str]:
        return [e.name for e in self.spec.entities]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.spec.features]

    @property
    def timestamp_field(self) -> str:
        return self.spec.source.timestamp_field


def source_column(feature: Any) -> str:
    """The source column a feature reads (its transformation's ``column``, else its name)."""
    t = feature.transformation
    return (t.column if t is not None and t.column else None) or feature.name


def value_columns(spec: FeatureGroupSpec) -> list[str]:
    """Source columns read for the features, each once, in declaration order."""
    return list(dict.fromkeys(source_column(f) for f in spec.features))


def check_source_columns(spec: FeatureGroupSpec, columns: Mapping[str, str]) -> None:
    """Check a source's columns (name -> DuckDB type name) against the declared schema.

    Raises:
        SourceError: ColumnMissing, ColumnTypeMismatch or TimestampColumnInvalid, naming the column
            (``.column``), for the first problem found: timestamp, then entities, then features.
    """
    ts = spec.source.timestamp_field
    if ts not in columns:
        raise SourceError(COLUMN_MISSING, f"source has no event-timestamp column {ts!r}", column=ts)
    if base_type(columns[ts]) not in TIMESTAMP_TYPES:
        raise SourceError(
            TIMESTAMP_COLUMN_INVALID,
            f"event-timestamp column {ts!r} is {columns[ts]}, not a timestamp",
            column=ts,
        )
    wanted = [(e.name, str(e.dtype), "entity") for e in spec.entities]
    for f in spec.features:
        needs = "float64" if f.transformation is not None and f.transformation.type != "Identity" else f.dtype
        wanted.append((source_column(f), str(needs), f"feature {f.name}"))
    for col, dtype, role in wanted:
        if col not in columns:
            raise SourceError(COLUMN_MISSING, f"source has no column {col!r} ({role})", column=col)
        if base_type(columns[col]) not in ACCEPTED[dtype]:
            raise SourceError(
                COLUMN_TYPE_MISMATCH,
                f"column {col!r} ({role}) is {columns[col]}, which does not fit dtype {dtype}",
                column=col,
            )


def _num(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"transformation parameter {x} is not finite")
    return repr(float(x))


def transform_sql(feature: Any, alias: str) -> str:
    """The SQL expression of one feature's value from the row ``alias`` (before the dtype cast).

    Formulas as documented on :class:`kiln.api.featuregroup.Transformation`.
    """
    col = f"{alias}.{quote(source_column(feature))}"
    t = feature.transformation
    kind = "Identity" if t is None else str(t.type)
    if kind == "Identity":
        return col
    x = f"CAST({col} AS DOUBLE)"
    if kind == "Log1p":
        return f"CASE WHEN {x} > -1 THEN ln(1 + {x}) END"
    if kind == "Standardize":
        return f"(({x} - {_num(t.mean)}) / {_num(t.std)})"
    if kind == "MinMaxScale":
        return f"(({x} - {_num(t.min)}) / ({_num(t.max)} - {_num(t.min)}))"
    if kind == "Clip":
        if t.min is not None:
            x = f"greatest({x}, {_num(t.min)})"
        if t.max is not None:
            x = f"least({x}, {_num(t.max)})"
        return x
    raise ValueError(f"unknown transformation {kind!r}")


def feature_select(spec: FeatureGroupSpec, alias: str, *, valid: str | None = None, prefix: str = "") -> str:
    """THE transformation function: the SELECT list computing every feature from raw row ``alias``.

    Used by materialization (online values) and by point-in-time retrieval (training values), so
    both apply the same formulas and the same cast to the declared dtype. ``valid`` is a SQL
    condition under which the row is used (else every feature is NULL: e.g. the lookback);
    ``prefix`` is put before each output name (``<group>__`` for Feast's full feature names).
    """
    out = []
    for f in spec.features:
        expr = transform_sql(f, alias)
        if valid is not None:
            expr = f"CASE WHEN {valid} THEN {expr} END"
        out.append(f"CAST({expr} AS {SQL_TYPES[str(f.dtype)]}) AS {quote(prefix + f.name)}")
    return ", ".join(out)


def range_start(spec: FeatureGroupSpec, watermark: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    """Start of the next materialization range ``[start, now)``: the watermark
    (``status.lastMaterializationTime``); without one (the first run, or new definitions: a
    backfill) ``spec.materialization.startTime``; without that ``now - online.maxAgeSeconds``
    (older values would never be served)."""
    if watermark is not None:
        return watermark
    if spec.materialization.start_time:
        t = dt.datetime.fromisoformat(spec.materialization.start_time.replace("Z", "+00:00"))
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return now - dt.timedelta(seconds=spec.online.max_age_seconds)


def to_micros(t: dt.datetime) -> int:
    """Microseconds since the Unix epoch of ``t`` (a naive datetime is UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> dt.datetime:
    """Inverse of :func:`to_micros` (an aware UTC datetime)."""
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


# --- online encoding ------------------------------------------------------------------------


def coerce(dtype: str, value: Any) -> Any:
    """``value`` as the Python type of ``dtype`` (``"42"`` -> 42 for int64; ``"true"`` -> True).

    Raises:
        ValueError: it cannot be read as that dtype.
    """
    if value is None:
        return None
    if dtype in ("int32", "int64"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(value)
    if dtype in ("float32", "float64"):
        return float(value)
    if dtype == "bool":
        if isinstance(value, str):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError(f"{value!r} is not a bool")
            return low in ("true", "1")
        return bool(value)
    return str(value)


def entity_key(view: FeatureView, row: Mapping[str, Any]) -> str:
    """The Redis key of one entity: ``view.key_prefix`` + the JSON array of its entity values, in
    the declared entity order, coerced to their dtypes (``kiln:fg:ns:grp:1a2b3c4d5e6f:[42]``).

    Raises:
        KeyError: an entity column is absent from ``row``.
        ValueError: an entity value does not fit its dtype, or is null.
    """
    parts = []
    for e in view.spec.entities:
        v = coerce(str(e.dtype), row[e.name])
        if v is None:
            raise ValueError(f"entity {e.name} is null")
        # what json.dumps(values, separators=(",", ":"), ensure_ascii=False) writes, faster
        parts.append(str(v) if type(v) is int else json.dumps(v, ensure_ascii=False))
    return f"{view.key_prefix}[{','.join(parts)}]"


def encode_value(value: Any) -> str | None:
    """An online hash field's text for a feature value (None: the field is not written).

    Floats are written with ``repr`` (shortest round-trip text), so a float32 value read back is
    bit-identical to the one retrieved offline.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def decode_value(dtype: str, raw: bytes | str | None) -> Any:
    """Inverse of :func:`encode_value` for a feature of ``dtype``."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    if dtype in ("int32", "int64"):
        return int(text)
    if dtype in ("float32", "float64"):
        return float(text)
    if dtype == "bool":
        return text == "1"
    return text


def rows_of(columns: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Column lists -> row dicts (``{"a": [1, 2]}`` -> ``[{"a": 1}, {"a": 2}]``)."""
    names = list(columns)
    return [dict(zip(names, vals, strict=True)) for vals in zip(*(columns[n] for n in names), strict=True)]
