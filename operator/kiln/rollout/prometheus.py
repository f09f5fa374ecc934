"""A small client of the Prometheus HTTP API (instant queries), on the standard library.

Reference: https://prometheus.io/docs/prometheus/latest/querying/api/#instant-queries
``GET <address>/api/v1/query?query=<promql>`` answers
``{"status": "success", "data": {"resultType": "vector"|"scalar"|..., "result": ...}}``; errors
answer 400/422/503 with ``{"status": "error", "errorType": ..., "error": ...}``.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class PrometheusError(Exception):
    """The query could not run: Prometheus unreachable, bad PromQL, unexpected answer."""


class PrometheusClient:
    """Instant queries against one Prometheus.

    Args:
        address: base URL, e.g. ``http://prometheus.monitoring:9090`` (a trailing ``/`` is fine;
            a path prefix such as ``http://host/prometheus`` is kept).
        timeout: seconds for the whole HTTP exchange; also sent as the query ``timeout``.
    """

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str) -> list[float]:
        """Run an instant query; return one float per series (a scalar gives one value).

        ``NaN``, ``+Inf`` and ``-Inf`` come back as floats. A matrix or string result is an error
        (an analysis query must return a number).

        Raises:
            PrometheusError: with a message saying what went wrong.
        """
        params = urllib.parse.urlencode({"query": promql, "timeout": f"{self.timeout:g}s"})
        url = f"{self.address}/api/v1/query?{params}"
        req = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            raise PrometheusError(_error_message(e.code, e.read())) from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PrometheusError(f"Prometheus at {self.address} unreachable: {reason}") from e
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise PrometheusError(f"Prometheus answered non-JSON: {body[:200]!r}") from e
        if doc.get("status") != "success":
            raise PrometheusError(f"{doc.get('errorType', 'error')}: {doc.get('error', 'unknown error')}")
        return parse_result(doc.get("data") or {})


def _error_message(code: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
        return f"HTTP {code}: {doc.get('errorType', 'error')}: {doc.get('error', '')}"
    except ValueError:
        return f"HTTP {code}: {body[:200]!r}"


def _number(v: Any) -> float:
    s = str(v)
    if s in ("NaN", "nan"):
        return math.nan
    return float(s)  # Prometheus writes +Inf / -Inf, which float() reads


def parse_result(data: dict[str, Any]) -> list[float]:
    """Values of a query's ``data`` object (``resultType`` + ``result``).

    Raises:
        PrometheusError: for result types other than vector and scalar, or malformed samples.
    """
    rtype = data.get("resultType")
    result = data.get("result")
    try:
        if rtype == "vector":
            return [_number(sample["value"][1]) for sample in result or []]
        if rtype == "scalar":
            return [_number(result[1])]  # type: ignore[index]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise PrometheusError(f"malformed {rtype} result: {str(result)[:200]}") from e
    raise PrometheusError(f"query returned a {rtype}, want an instant vector or a scalar")
