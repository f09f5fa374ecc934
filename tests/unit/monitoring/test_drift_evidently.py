"""Kiln's drift numbers equal Evidently's for the same reference and current columns (1e-6).

Evidently runs in its own virtualenv (``hack/peer-venv evidently``; pandas 3 and plotly never
enter Kiln's), found at ``$KILN_EVIDENTLY_PYTHON`` or the script's default place. Locally the
test skips when there is none; in CI (``CI`` set) a missing peer fails the test instead, so the
cross-check can never be skipped silently there (``.ci/run`` creates it).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kiln.monitoring import drift
from kiln.monitoring.drift import Sample
from tests.peers import peer_python

from .conftest import Case, cases, methods_for

PEER = Path(__file__).with_name("evidently_peer.py")
TOLERANCE = 1e-6


def _json_column(x: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else v for v in x.tolist()]  # JSON has no NaN; inf is kept


@pytest.fixture(scope="module")
def evidently() -> dict[str, dict[str, dict]]:
    """Evidently's results for every case, from one subprocess."""
    python = peer_python("evidently")
    payload = {
        "cases": [
            {
                "id": c.id,
                "reference": _json_column(c.reference),
                "current": _json_column(c.current),
                "numerical": c.numerical,
                "methods": methods_for(c),
            }
            for c in cases()
        ]
    }
    done = subprocess.run(
        [str(python), str(PEER)], input=json.dumps(payload), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _kiln(case: Case, method: str) -> tuple[str, float]:
    ref, cur = Sample.of(case.reference), Sample.of(case.current)
    s = drift.score(ref, cur, case.numerical, None if method == "default" else method)
    return s.method, s.score


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_kiln_equals_evidently(case: Case, evidently: dict[str, dict[str, dict]]) -> None:
    theirs = evidently[case.id]
    assert theirs["default"]["method"] == case.expected_method  # the documented rule, per Evidently
    for method in methods_for(case):
        name, value = _kiln(case, method)
        assert name == theirs[method]["method"], (case.id, method)
        expected = theirs[method]["value"]
        # within 1e-6, and within 1e-6 relatively too (a tiny p-value must be right, not just tiny)
        assert abs(value - expected) <= TOLERANCE * min(1.0, abs(expected)) or value == expected, (
            case.id,
            method,
            value,
            expected,
        )


def test_the_cases_cover_both_sides_of_the_1000_row_rule_and_every_default_method() -> None:
    sizes = {int(np.isfinite(c.reference).sum()) for c in cases()}
    assert {1000, 1001} <= sizes and min(sizes) < 1000 < max(sizes)
    assert {c.expected_method for c in cases()} == {"ks", "chisquare", "z", "wasserstein", "jensenshannon"}
