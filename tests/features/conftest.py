"""Feature-store tests: real DuckDB and a real Redis (tests/redis.py), no cluster."""

from __future__ import annotations

import pytest

from tests.redis import redis_server  # noqa: F401  (fixture)

pytest.importorskip("duckdb", reason="the 'features' extra is not installed (pip install -e '.[features]')")
