"""The operator's log lines: JSON (one object per line) or text, with the reconciled object in each.

JSON lines have ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``message``, the
record's extra fields, ``exc_info`` for tracebacks, and, for every line logged while an object is
being reconciled, its ``kind``, ``namespace``, ``name`` and ``uid``. The work queue sets the
object in a context variable around each reconcile (:func:`bind`); :class:`ObjectContextFilter`
copies it onto every record, whatever logger wrote it. kopf's own per-object lines carry the
same fields (from kopf's ``k8s_ref``). Formatting is python-json-logger's (a dependency of kopf).

Health probes are not logged at INFO: aiohttp writes one access-log line per request, and the
kubelet probes ``/healthz`` every few seconds; :class:`ProbeAccessFilter` demotes those lines to
DEBUG (prometheus-client's ``/metrics`` server logs nothing).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("json", "text")

#: Paths of health and metrics endpoints (operator and kiln-serve) whose access lines are DEBUG.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/livez", "/metrics", "/v2/health/live", "/v2/health/ready"})


@dataclass(frozen=True)
class ObjectRef:
    """The object a piece of work is about."""

    kind: str
    namespace: str
    name: str
    uid: str | None = None


_CURRENT: contextvars.ContextVar[ObjectRef | None] = contextvars.ContextVar("kiln_object", default=None)


@contextlib.contextmanager
def bind(ref: ObjectRef) -> Iterator[None]:
    """Attach ``ref`` to every log line written in this context (thread or task) until exit."""
    token = _CURRENT.set(ref)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> ObjectRef | None:
    """The object bound in this context, if any."""
    return _CURRENT.get()


#: LogRecord attributes holding the object (``name`` is the logger's own), and their JSON keys.
OBJECT_FIELDS = {"kiln_kind": "kind", "kiln_namespace": "namespace", "kiln_name": "name", "kiln_uid": "uid"}


class ObjectContextFilter(logging.Filter):
    """Sets ``kiln_kind``, ``kiln_namespace``, ``kiln_name``, ``kiln_uid`` on every record.

    From the object bound with :func:`bind`, else from kopf's ``k8s_ref`` on its per-object
    records; nothing when neither. Always lets the record through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ref = _CURRENT.get()
        values: tuple[Any, ...] = ()
        if ref is not None:
            values = (ref.kind, ref.namespace, ref.name, ref.uid)
        else:
            k8s_ref = getattr(record, "k8s_ref", None)  # kopf's per-object loggers
            if isinstance(k8s_ref, dict):
                values = tuple(k8s_ref.get(k) for k in ("kind", "namespace", "name", "uid"))
        for attr, value in zip(OBJECT_FIELDS, values, strict=False):
            if value is not None:
                setattr(record, attr, value)
        return True


def _request_path(record: logging.LogRecord) -> str | None:
    line = getattr(record, "first_request_line", None)  # aiohttp's "%r": 'GET /healthz HTTP/1.1'
    if not isinstance(line, str):
        return None
    parts = line.split()
    return parts[1].split("?", 1)[0] if len(parts) >= 2 else None


class ProbeAccessFilter(logging.Filter):
    """On aiohttp's access logger: lines for :data:`PROBE_PATHS` become DEBUG lines.

    A logger filter runs after the logger's own level check, so the record is re-levelled here
    and dropped unless that logger is enabled for DEBUG (e.g. ``--verbose``).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and _request_path(record) in PROBE_PATHS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _utc(formatter: logging.Formatter) -> None:
    """Make ``asctime`` RFC 3339 in UTC with milliseconds: ``2026-01-02T03:04:05.678Z``."""
    formatter.converter = time.gmtime
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: time, level, logger, message, then the extra fields."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger", **OBJECT_FIELDS},
            # kopf's internals on its records; k8s_ref is mapped to kind/namespace/name/uid.
            reserved_attrs=[*JsonFormatter().reserved_attrs, "k8s_ref", "k8s_skip", "settings"],
        )
        _utc(self)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [Kind namespace/name]`` (the object part when one is bound)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        _utc(self)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        name = getattr(record, "kiln_name", None)
        if name is None:
            return text
        kind = getattr(record, "kiln_kind", None)
        return f"{text} [{kind + ' ' if kind else ''}{getattr(record, 'kiln_namespace', '')}/{name}]"


def configure(fmt: str = "json", level: int = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as ``fmt`` ("json" or "text") at ``level``.

    Replaces the root logger's handlers; installs :class:`ObjectContextFilter` on the handler and
    :class:`ProbeAccessFilter` on aiohttp's access logger. Returns the handler.

    Raises:
        ValueError: for an unknown ``fmt``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ObjectContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    access = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, ProbeAccessFilter) for f in access.filters):
        access.addFilter(ProbeAccessFilter())
    return handler
