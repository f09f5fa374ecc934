"""Data and manifests of the demo's feature-store and drift steps (hack/demo.py, steps 9-11).

Pure functions: tables and dicts in, tables and dicts out; hack/demo.py uploads, applies and
checks. Nothing here talks to the cluster.

The feature store's data is scikit-learn's 8x8 digits, told as a stream of events. Each digit
``digit_id`` (0..1796) has two rows in the source, both with the *raw* pixel counts ``raw_r_c``
(0..16):

- at ``now - 3h``, the digit with its pixels inverted (``16 - x``), as a faulty scanner would
  have sent it;
- at ``now - 1h``, the digit as it is.

The labels (the entity table) are observed at ``now - 30min``. The FeatureGroup's features
``pixel_r_c`` are ``MinMaxScale(raw_r_c, 0, 16)``. A point-in-time join therefore gives each label
the ``now - 1h`` pixels, scaled; a join that ignored event times could give either row.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

#: The entity column and the event-time column of the source and of the entity table.
ENTITY = "digit_id"
TIMESTAMP = "event_timestamp"
LABEL = "label"
PIXEL_MAX = 16.0
#: When the two versions of each digit happened and when the labels were observed, before "now".
INVERTED_AGO = timedelta(hours=3)
CURRENT_AGO = timedelta(hours=1)
LABELS_AGO = timedelta(minutes=30)


def pixel_names(prefix: str) -> list[str]:
    """``[f"{prefix}_0_0", ..., f"{prefix}_7_7"]``, row-major over the 8x8 image (64 names)."""
    return [f"{prefix}_{r}_{c}" for r in range(8) for c in range(8)]


def _ts(t: datetime, n: int) -> pa.Array:
    return pa.array([t] * n, pa.timestamp("us", tz="UTC"))


def source_table(x: np.ndarray, now: datetime) -> pa.Table:
    """The FeatureGroup's source: two rows per digit (inverted at now-3h, as is at now-1h).

    Args:
        x: raw pixel counts, shape ``(n, 64)``, values in [0, 16] (integers as floats).
        now: a timezone-aware UTC datetime.
    Returns:
        ``2n`` rows: ``digit_id`` int64, ``event_timestamp`` timestamp[us, UTC], ``raw_r_c`` int64.
    """
    n = len(x)
    ids = np.arange(n, dtype=np.int64)
    raw = np.rint(x).astype(np.int64)
    cols: dict[str, Any] = {
        ENTITY: np.concatenate([ids, ids]),
        TIMESTAMP: pa.concat_arrays([_ts(now - INVERTED_AGO, n), _ts(now - CURRENT_AGO, n)]),
    }
    both = np.concatenate([int(PIXEL_MAX) - raw, raw])
    for j, name in enumerate(pixel_names("raw")):
        cols[name] = both[:, j]
    return pa.table(cols)


def entity_table(labels: np.ndarray, now: datetime, ago: timedelta = LABELS_AGO) -> pa.Table:
    """The labels, one row per digit, observed ``ago`` before ``now``: ``digit_id``,
    ``event_timestamp``, ``label`` (int64)."""
    n = len(labels)
    return pa.table(
        {
            ENTITY: np.arange(n, dtype=np.int64),
            TIMESTAMP: _ts(now - ago, n),
            LABEL: np.asarray(labels, dtype=np.int64),
        }
    )


def expected_features(x: np.ndarray, *, inverted: bool = False) -> np.ndarray:
    """What the FeatureGroup's features are for raw pixels ``x`` ``(n, 64)``: MinMaxScale to
    [0, 1], of the inverted row when ``inverted``; float32."""
    raw = np.rint(x)
    return ((PIXEL_MAX - raw if inverted else raw) / PIXEL_MAX).astype(np.float32)


def feature_group(
    name: str, *, source_uri: str, redis_address: str, start_time: datetime, scheduling: dict[str, Any]
) -> dict[str, Any]:
    """The FeatureGroup manifest: entity ``digit_id``, 64 features ``pixel_r_c`` =
    MinMaxScale(raw_r_c, 0, 16), the source at ``source_uri``, online in Redis at ``redis_address``;
    a backfill from ``start_time`` in 2-hour windows, 2 pods at once, placed by ``scheduling``
    (nodeSelector/tolerations)."""
    features = [
        {
            "name": feat,
            "dtype": "float32",
            "transformation": {"type": "MinMaxScale", "column": raw, "min": 0, "max": PIXEL_MAX},
        }
        for feat, raw in zip(pixel_names("pixel"), pixel_names("raw"), strict=True)
    ]
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "FeatureGroup",
        "metadata": {"name": name},
        "spec": {
            "entities": [{"name": ENTITY, "dtype": "int64"}],
            "features": features,
            "source": {"uri": source_uri, "format": "parquet", "timestampField": TIMESTAMP},
            "offline": {"lookbackSeconds": 86400},
            "online": {"enabled": True, "store": {"address": redis_address}, "maxAgeSeconds": 86400},
            "materialization": {
                "image": "kiln-trainer:dev",
                "imagePullPolicy": "IfNotPresent",
                "startTime": start_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "windowSeconds": 7200,
                "parallelism": 2,
                **scheduling,
            },
        },
    }


def invert(x: np.ndarray) -> np.ndarray:
    """Drifted inputs for the drift step: every raw pixel count ``x`` (0..16) as ``16 - x``."""
    return (PIXEL_MAX - x).astype(np.float32)
