"""Golden-file comparison for builder tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def assert_golden(directory: Path, name: str, obj: Any) -> None:
    """Compare ``obj`` as sorted YAML with ``<directory>/<name>.yaml``.

    ``KILN_UPDATE_GOLDEN=1`` rewrites the file (review the diff before committing); a missing
    file fails rather than being created silently.
    """
    text = yaml.safe_dump(obj, sort_keys=True)
    f = directory / f"{name}.yaml"
    if os.environ.get("KILN_UPDATE_GOLDEN"):
        f.write_text(text)
    assert f.exists(), f"{f} missing: run with KILN_UPDATE_GOLDEN=1 and review it"
    assert text == f.read_text()
