"""Materialization: the latest value of every entity, from the offline source into the online store.

A run covers event times in ``[start, end)``. It walks that range in windows of ``chunk_seconds``
(one DuckDB query per window: the latest deduplicated row of each entity in the window, through
:func:`kiln.features.schema.feature_select`), streams each window's result in Arrow batches of
``batch_rows`` and writes every batch in one Redis pipeline (:func:`kiln.features.online.write_rows`).
Memory is bounded by DuckDB's ``memory_limit`` (beyond it, it spills to disk) and one batch, not by
the source's size.

Incremental: the caller keeps the watermark (``status.lastMaterializationTime``) and passes it as
the next run's ``start`` (:func:`incremental_range`). The watermark returned is ``end``, and only a
run that wrote every window returns: on any failure an exception is raised and the caller keeps
the old watermark. Re-running a range is idempotent (same rows, same values; an older row never
replaces a newer one). As in Feast, rows that arrive late with an event time before the watermark
are not picked up by incremental runs; re-run the range to include them.

A large backfill is split over an Indexed Job: completion ``i`` of ``n`` runs
:func:`window_for_index` ``(start, end, n, i)``; windows may run in any order or in parallel.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb

import redis
from kiln.features import online
from kiln.features.errors import SOURCE_UNREADABLE, SourceError
from kiln.features.offline import DEFAULT_MEMORY_LIMIT, open_source
from kiln.features.schema import (
    TS,
    FeatureView,
    encode_value,
    feature_select,
    from_micros,
    quote,
    range_start,
    to_micros,
)

DEFAULT_CHUNK_SECONDS = 86400
DEFAULT_BATCH_ROWS = 5000


@dataclass(frozen=True)
class MaterializationResult:
    """What a run did. ``watermark`` is the new ``status.lastMaterializationTime`` (= ``end``)."""

    start: dt.datetime
    end: dt.datetime
    rows_written: int
    rows_sent: int
    windows: int
    duration_seconds: float

    @property
    def watermark(self) -> dt.datetime:
        return self.end

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (times RFC 3339, UTC), what the CLI prints."""
        return {
            "start": rfc3339(self.start),
            "end": rfc3339(self.end),
            "watermark": rfc3339(self.watermark),
            "rowsWritten": self.rows_written,
            "rowsSent": self.rows_sent,
            "windows": self.windows,
            "durationSeconds": round(self.duration_seconds, 3),
        }


def rfc3339(t: dt.datetime) -> str:
    """``2024-01-02T03:04:05.000006Z`` (UTC; a naive datetime is UTC)."""
    return from_micros(to_micros(t)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def split_windows(start: dt.datetime, end: dt.datetime, n: int) -> list[tuple[dt.datetime, dt.datetime]]:
    """``[start, end)`` cut into ``n`` contiguous windows of equal length (to the microsecond).

    Raises:
        ValueError: ``n < 1`` or ``end <= start``.
    """
    s, e = to_micros(start), to_micros(end)
    if n < 1 or e <= s:
        raise ValueError(f"cannot split [{rfc3339(start)}, {rfc3339(end)}) into {n} windows")
    bounds = [s + (e - s) * i // n for i in range(n + 1)]
    return [(from_micros(a), from_micros(b)) for a, b in itertools.pairwise(bounds)]


def window_for_index(
    start: dt.datetime, end: dt.datetime, windows: int, index: int
) -> tuple[dt.datetime, dt.datetime]:
    """The window of Indexed Job completion ``index`` (``$JOB_COMPLETION_INDEX``) of ``windows``.

    Raises:
        ValueError: ``index`` outside ``[0, windows)``, or as :func:`split_windows`.
    """
    if not 0 <= index < windows:
        raise ValueError(f"index {index} is outside [0, {windows})")
    return split_windows(start, end, windows)[index]


def incremental_range(
    view: FeatureView, watermark: dt.datetime | None, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """The next run's ``[start, end)``: ``(range_start(...), now)``, see
    :func:`kiln.features.schema.range_start` (the rule the operator's runs follow too)."""
    return range_start(view.spec, watermark, now), now


def _windows(start_us: int, end_us: int, chunk_us: int) -> Iterator[tuple[int, int]]:
    a = start_us
    while a < end_us:
        b = min(end_us, a + chunk_us)
        yield a, b
        a = b


def materialize(
    view: FeatureView,
    client: redis.Redis,
    start: dt.datetime,
    end: dt.datetime,
    *,
    chunk_seconds: int = DEFAULT_CHUNK_SECONDS,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    key_ttl_seconds: int | None = None,
    superseded_before: dt.datetime | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    threads: int | None = None,
) -> MaterializationResult:
    """Write each entity's latest (transformed) values with event time in ``[start, end)``.

    Each window writes only the entities with no newer row before ``superseded_before``
    (default ``end``): a later window writes those, so each entity is written once per run.
    An Indexed Job completion passes the whole backfill's end (its window's successors write
    the newer rows). ``key_ttl_seconds``: Redis expiry of each written key, from the write
    (Feast's option of the same name); None keeps keys until replaced.

    Returns:
        The run's :class:`MaterializationResult` (``watermark`` = ``end``).
    Raises:
        SourceError: the source is missing, does not match the schema, or a value cannot be cast.
        OnlineStoreError: Redis failed; some windows may be written (with their true event times).
        ValueError: ``end <= start``.
    """
    t0 = time.monotonic()
    s_us, e_us = to_micros(start), to_micros(end)
    if e_us <= s_us:
        raise ValueError(f"empty range [{rfc3339(start)}, {rfc3339(end)})")
    spec = view.spec
    ents = view.entity_names
    online.ping(client)  # down -> fail even when the range has nothing to write
    horizon = to_micros(superseded_before) if superseded_before is not None else e_us
    sent = written = n = 0
    with open_source(view, memory_limit=memory_limit, threads=threads) as src:
        for a, b in _windows(s_us, e_us, max(1, chunk_seconds) * 1_000_000):
            n += 1
            sql = (
                f"SELECT {', '.join('r.' + quote(e) for e in ents)}, r.{TS}, {feature_select(spec, 'r')} "
                f"FROM ({src.rows_sql(a, b, latest=True, superseded_before_us=horizon)}) r"
            )
            try:
                reader: Any = src.con.sql(sql).to_arrow_reader(batch_rows)
                for batch in reader:
                    cols = {name: batch.column(name).to_pylist() for name in batch.schema.names}
                    rows = (
                        (
                            {e: cols[e][i] for e in ents},
                            cols[TS][i],
                            {f: encode_value(cols[f][i]) for f in view.feature_names},
                        )
                        for i in range(batch.num_rows)
                    )
                    stats = online.write_rows(client, view, rows, key_ttl_seconds=key_ttl_seconds)
                    sent += stats.sent
                    written += stats.written
            except duckdb.Error as e:
                raise SourceError(
                    SOURCE_UNREADABLE, f"source {spec.source.uri}: {str(e).splitlines()[0]}"
                ) from e
    return MaterializationResult(
        from_micros(s_us), from_micros(e_us), written, sent, n, time.monotonic() - t0
    )
