"""Errors of :mod:`kiln.features`, each with a ``reason`` a status condition can carry.

==========================  =============================================================  =========
reason                      cause                                                          transient
==========================  =============================================================  =========
SourceNotFound              the source file/object/prefix does not exist                   no
SourceUnreadable            the store refused or failed, or the file is not valid          store: yes
                            Parquet/CSV, or a value cannot be cast to its declared dtype
ColumnMissing               a declared entity/feature/timestamp column is absent           no
ColumnTypeMismatch          a column's type does not fit its declared dtype                no
TimestampColumnInvalid      the event-timestamp column is not a timestamp                  no
EntityTableInvalid          the entity table of a retrieval lacks a column or is mistyped  no
OnlineStoreUnavailable      Redis refused, timed out or failed a command                   yes
==========================  =============================================================  =========

:class:`SourceError` and :class:`EntityTableError` carry ``column`` (the column at fault, when
one is).
"""

from __future__ import annotations

#: Exit codes of ``python -m kiln.features`` (the materialization Jobs' podFailurePolicy keys on
#: them): a source/schema error or an invalid FeatureGroup, which no retry fixes; a transient
#: failure (online or object store unavailable), which the Job's backoff retries.
EXIT_PERMANENT = 1
EXIT_TRANSIENT = 3

SOURCE_NOT_FOUND = "SourceNotFound"
SOURCE_UNREADABLE = "SourceUnreadable"
COLUMN_MISSING = "ColumnMissing"
COLUMN_TYPE_MISMATCH = "ColumnTypeMismatch"
TIMESTAMP_COLUMN_INVALID = "TimestampColumnInvalid"
ENTITY_TABLE_INVALID = "EntityTableInvalid"
ONLINE_STORE_UNAVAILABLE = "OnlineStoreUnavailable"


class FeatureError(Exception):
    """Base of the package's errors: ``reason`` (see the module table) and a one-line message."""

    def __init__(self, reason: str, message: str, *, column: str | None = None, transient: bool = False):
        super().__init__(message)
        self.reason = reason
        self.column = column
        self.transient = transient


class SourceError(FeatureError):
    """The offline source is missing, unreadable, or does not match the declared schema."""


class EntityTableError(FeatureError):
    """The entity table given to a point-in-time retrieval is unusable."""

    def __init__(self, message: str, *, column: str | None = None):
        super().__init__(ENTITY_TABLE_INVALID, message, column=column)


class OnlineStoreError(FeatureError):
    """The online store (Redis) failed; always transient (a retry may succeed)."""

    def __init__(self, message: str):
        super().__init__(ONLINE_STORE_UNAVAILABLE, message, transient=True)
