"""Status conditions, shaped like ``metav1.Condition`` (pure functions, no I/O).

``lastTransitionTime`` changes only when ``status`` changes, as the Kubernetes API conventions
ask (https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md#typical-status-properties).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
#: kstatus' condition for a failure the controller cannot get past without a person
#: (https://github.com/kubernetes-sigs/cli-utils/blob/master/pkg/kstatus/README.md).
STALLED = "Stalled"


def rfc3339(t: datetime | None = None) -> str:
    """``t`` (default: now) as RFC 3339 UTC with seconds precision, e.g. ``2026-11-22T10:00:00Z``."""
    t = t or datetime.now(UTC)
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(s: str | None) -> datetime | None:
    """Parse an RFC 3339 timestamp written by :func:`rfc3339` or the API server; None stays None."""
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Return a new condition list with condition ``type_`` set.

    The list's order is kept; a new type is appended. ``lastTransitionTime`` is kept when the
    status did not change.
    """
    out: list[dict[str, Any]] = []
    found = False
    for c in conditions or []:
        if c.get("type") != type_:
            out.append(dict(c))
            continue
        found = True
        ltt = c.get("lastTransitionTime") if c.get("status") == status else rfc3339(now)
        out.append(_cond(type_, status, reason, message, generation, ltt or rfc3339(now)))
    if not found:
        out.append(_cond(type_, status, reason, message, generation, rfc3339(now)))
    return out


def _cond(
    type_: str, status: str, reason: str, message: str, generation: int | None, ltt: str
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": ltt,
    }
    if generation is not None:
        c["observedGeneration"] = generation
    return c


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    """The condition of type ``type_``, or None."""
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    """Whether condition ``type_`` exists with status True."""
    c = get_condition(conditions, type_)
    return bool(c and c.get("status") == TRUE)


def remove_condition(conditions: list[dict[str, Any]] | None, type_: str) -> list[dict[str, Any]]:
    """Return a new condition list without condition ``type_``."""
    return [dict(c) for c in conditions or [] if c.get("type") != type_]


def set_stalled(
    conditions: list[dict[str, Any]] | None,
    stalled: bool,
    reason: str = "",
    message: str = "",
    *,
    generation: int | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Set kstatus' ``Stalled`` condition: True with ``reason``/``message`` when ``stalled``,
    else removed.

    kstatus conditions are "abnormal-true": present only while True. With ``Ready=False`` and
    ``observedGeneration`` current, ``Stalled=True`` makes kstatus-based tools (Flux, kpt,
    Config Sync, ``kubectl wait``-like pollers) report Failed instead of InProgress forever.
    """
    if stalled:
        return set_condition(conditions, STALLED, TRUE, reason, message, generation=generation, now=now)
    return remove_condition(conditions, STALLED)
