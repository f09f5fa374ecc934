"""What GitOps tools say about a live object: kstatus (Flux, kpt, Config Sync) and Argo CD.

- :func:`kstatus` runs the real ``sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute`` through the
  tiny Go command in tests/kstatus (built once per session with the Go toolchain hack/cluster
  needs anyway; modules from the Go module proxy).
- :func:`argocd_health` evaluates the Lua health check Kiln ships
  (charts/kiln/argocd/health.yaml, the key Argo CD would pick for the object's group and kind)
  with lupa's Lua 5.1, the Lua version of Argo CD's interpreter (gopher-lua).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KSTATUS_SRC = REPO / "tests" / "kstatus"
ARGOCD_HEALTH = REPO / "charts" / "kiln" / "argocd" / "health.yaml"
IN_CI = os.environ.get("CI", "").lower() == "true"


@functools.cache
def _kstatus_binary() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        if IN_CI:
            pytest.fail("CI=true but no Go toolchain to build tests/kstatus", pytrace=False)
        pytest.skip("no Go toolchain to build tests/kstatus")
    out = Path(tempfile.gettempdir()) / f"kiln-kstatus-{os.getuid()}"
    r = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=KSTATUS_SRC, capture_output=True, text=True, timeout=900
    )
    if r.returncode != 0:
        pytest.fail(f"building tests/kstatus failed:\n{r.stderr[-4000:]}", pytrace=False)
    return str(out)


def kstatus(obj: dict[str, Any]) -> dict[str, str]:
    """kstatus' verdict for ``obj``: ``{"status": "Current|InProgress|Failed|...", "message": ...}``."""
    r = subprocess.run(
        [_kstatus_binary()],
        input=json.dumps(obj) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(r.stdout))


@functools.cache
def _health_scripts() -> dict[str, str]:
    return dict(yaml.safe_load(ARGOCD_HEALTH.read_text())["data"])


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Argo CD's health of ``obj`` by Kiln's Lua: ``{"status": "Healthy|...", "message": ...}``.

    As Argo CD runs it: the script for ``resource.customizations.health.<group>_<kind>``, with the
    object as the global ``obj``, returning a table with ``status`` and ``message``.
    """
    from lupa import lua51

    group = obj["apiVersion"].rpartition("/")[0]
    script = _health_scripts()[f"resource.customizations.health.{group}_{obj['kind']}"]
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(script)
    return {"status": str(hs["status"]), "message": str(hs["message"] or "")}
