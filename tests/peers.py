"""Peer projects' virtualenvs for tests that compare Kiln with them (``hack/peer-venv NAME``).

A peer (Evidently, KServe, ...) lives in its own virtualenv, never in Kiln's; tests call its
python in a subprocess. :func:`peer_python` finds it at ``$KILN_<NAME>_PYTHON`` or where
``hack/peer-venv`` puts it by default (``$KILN_PEER_VENVS/NAME``, ``~/.cache/kiln/peer-venvs/NAME``).
Locally a test skips when there is none; in CI (``CI`` set) or when the variable names a python
that is not there, it fails instead, so a cross-check can never be skipped silently there
(``.ci/run`` creates the venvs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def peer_python(name: str) -> Path:
    """The python of peer ``name``'s virtualenv; skips (fails in CI) the test when there is none."""
    var = f"KILN_{name.upper()}_PYTHON"
    explicit = os.environ.get(var, "").strip()
    venvs = os.environ.get("KILN_PEER_VENVS", "").strip()
    root = Path(venvs) if venvs else Path.home() / ".cache" / "kiln" / "peer-venvs"
    python = Path(explicit) if explicit else root / name / "bin" / "python"
    if python.exists():
        return python
    message = f"no {name} virtualenv at {python}: run hack/peer-venv {name} ({var})"
    if explicit or os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
