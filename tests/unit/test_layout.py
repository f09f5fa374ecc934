"""Import-direction rules of the package (see README "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "operator" / "kiln"


def test_operator_never_imports_torch():
    """The operator and its image must work without torch (only trainer/server extras have it), nor
    the feature store's engines (the features extra: its Jobs run them)."""
    code = (
        "import sys, kiln.controllers, kiln.cli, kiln.cli.crds, kiln.cli.operator, kiln.api.crd, kiln.gang;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'safetensors', 'numpy', 'duckdb', 'pyarrow', 'redis'));"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"operator imported: {r.stdout} {r.stderr[-2000:]}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_pure_layers_do_no_io():
    """api, resources, registry and rollout never talk to the API server or import controllers."""
    for layer in ("api", "resources", "registry", "rollout"):
        for f in (PKG / layer).rglob("*.py"):
            if layer == "rollout" and f.name.startswith("prometheus"):
                continue  # the Prometheus HTTP client lives beside the pure analysis
            bad = {
                m
                for m in _imports(f)
                if m.startswith(("kubernetes", "kopf", "kiln.controllers", "kiln.kube"))
            }
            assert not bad, f"{f.relative_to(PKG)} imports {bad}"


def test_api_depends_on_nothing_above_it():
    for f in (PKG / "api").rglob("*.py"):
        bad = {
            m
            for m in _imports(f)
            if m.startswith("kiln.") and not m.startswith(("kiln.api", "kiln.artifact")) and m != "kiln"
        }
        assert not bad, f"{f.name} imports {bad}"


def test_one_status_write_path():
    """Status is written only by kiln.status.write_status (diff with nulls, resourceVersion
    precondition, skip when unchanged); kube.patch_status is its transport, nobody else's."""
    for f in PKG.rglob("*.py"):
        if f in (PKG / "status.py", PKG / "kube.py"):
            continue
        text = f.read_text()
        assert "patch_status(" not in text, f"{f.relative_to(PKG)} writes status around kiln.status"


def test_only_the_registry_artifact_module_touches_the_store():
    """Artifact-store I/O (kiln.storage, boto3) stays out of the pure layers; in registry/ only
    artifacts.py (the registry's store client, as rollout/prometheus.py is its Prometheus client)."""
    for layer in ("api", "resources", "registry", "rollout"):
        for f in (PKG / layer).rglob("*.py"):
            if f.relative_to(PKG).as_posix() == "registry/artifacts.py":
                continue
            bad = {m for m in _imports(f) if m.startswith(("kiln.storage", "boto3", "botocore"))}
            assert not bad, f"{f.relative_to(PKG)} imports {bad}"


def test_cli_does_not_import_controllers():
    """The CLI calls the registry's modules, never a controller (and with it kopf)."""
    for f in (PKG / "cli").rglob("*.py"):
        if f.name == "operator.py":
            continue  # `kiln operator` runs the controllers
        bad = {m for m in _imports(f) if m.startswith(("kiln.controllers", "kopf"))}
        assert not bad, f"cli/{f.name} imports {bad}"


def test_no_controller_imports_another():
    """Controllers share code through modules outside controllers/ (kiln.registration,
    kiln.status, kiln.kube...) and the package's helpers (events, runtime, client...), never
    through another kind's controller."""
    kinds = {"trainingjob", "model", "inferenceservice", "featuregroup"}
    for kind in kinds:
        others = {f"kiln.controllers.{k}" for k in kinds - {kind}}
        bad = {m for m in _imports(PKG / "controllers" / f"{kind}.py") if m in others}
        assert not bad, f"controllers/{kind}.py imports {bad}"
