"""Kiln's feature store: a FeatureGroup's offline source, point-in-time retrieval, materialization
into a Redis online store, and online lookup (Feast's concepts and names, not Feast).

Modules (the heavy ones need the ``features`` extra: duckdb, pyarrow, redis):

- :mod:`kiln.features.schema`: pure (no heavy imports): :class:`FeatureView`, schema checks, the
  one transformation function (:func:`feature_select`), online key/value encoding, digest.
- :mod:`kiln.features.offline`: the source (DuckDB), :func:`validate_source`,
  :func:`get_historical_features` (point-in-time join).
- :mod:`kiln.features.online`: Redis :func:`connect`, :func:`write_rows`,
  :func:`get_online_features` (``maxAgeSeconds`` enforced at read time).
- :mod:`kiln.features.materialization`: :func:`materialize`, windows for Indexed Jobs, watermarks.
- ``python -m kiln.features``: the Job entry point (see :mod:`kiln.features.__main__`).

The names below are importable from ``kiln.features`` itself; the heavy ones load on first use,
so ``import kiln.features`` (or ``kiln.features.schema``) costs the operator nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from kiln.features.errors import (
    EntityTableError,
    FeatureError,
    OnlineStoreError,
    SourceError,
)
from kiln.features.schema import FeatureView, schema_digest

_LAZY = {
    "validate_source": "offline",
    "get_historical_features": "offline",
    "read_table": "offline",
    "open_source": "offline",
    "connect": "online",
    "write_rows": "online",
    "get_online_features": "online",
    "OnlineRow": "online",
    "materialize": "materialization",
    "MaterializationResult": "materialization",
    "split_windows": "materialization",
    "window_for_index": "materialization",
    "incremental_range": "materialization",
}

__all__ = [
    "EntityTableError",
    "FeatureError",
    "FeatureView",
    "OnlineStoreError",
    "SourceError",
    "schema_digest",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln.features' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kiln.features.{module}"), name)
