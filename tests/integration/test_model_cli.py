"""The registry commands of ``kiln`` against the real API server and the in-process operator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client

from kiln.cli import main as kiln_main
from kiln.registry import CHANGE_CAUSE_ANNOTATION

from .conftest import Cluster
from .test_model import create_model, get_model, history, patch_spec, ready, register, stages, wait_reconciled

KILN = str(Path(sys.executable).parent / "kiln")  # the console script of this environment


def kiln(cluster: Cluster, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``kiln ARGS`` in-process against the test cluster; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = kiln_main([*args, "--kubeconfig", cluster.kubeconfig])
    out, err = capsys.readouterr()
    return rc, out, err


def test_promote_rollback_and_tables(
    kube: client.ApiClient,
    namespace: str,
    operator: object,
    tmp_path: Path,
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    create_model(kube, namespace, description="8x8 digits classifier")
    for i, acc in ((1, 0.91), (2, 0.93), (3, 0.95)):
        assert register(kube, namespace, tmp_path, f"job-{i}", accuracy=acc) == i
    ns = ["-n", namespace]

    rc, out, err = kiln(cluster, capsys, "promote", "digits", "1", "--stage", "Production", *ns)
    assert rc == 0, err
    assert "version 1 is now in Production" in out and "Production=1" in out
    rc, out, err = kiln(cluster, capsys, "promote", "digits", "2", "--stage", "Production", *ns)
    assert rc == 0, err
    rc, out, err = kiln(
        cluster, capsys, "promote", "digits", "3", "--stage", "Production", "--archive-previous", *ns
    )
    assert rc == 0, err
    assert "Production=3" in out and "Archived=2" in out
    rc, out, err = kiln(cluster, capsys, "promote", "digits", "3", "--alias", "champion", *ns)
    assert rc == 0 and "alias champion now points at version 3" in out, err

    # Rollback walks the audit trail back: 3 -> 2 (un-archiving it) -> 1, then there is nothing left.
    rc, out, err = kiln(cluster, capsys, "rollback", "digits", *ns)
    assert rc == 0, err
    assert "Production rolled back from version 3 to 2" in out
    obj = get_model(kube, namespace)
    assert obj["spec"]["stages"] == {"production": 2}
    assert (
        obj["metadata"]["annotations"][CHANGE_CAUSE_ANNOTATION] == f"Rollback:{obj['metadata']['generation']}"
    )
    rc, out, err = kiln(cluster, capsys, "rollback", "digits", *ns)
    assert rc == 0 and "from version 2 to 1" in out, err
    rc, out, err = kiln(cluster, capsys, "rollback", "digits", *ns)
    assert rc == 1 and "names no Production version before 1" in err

    # A later plain edit of spec is a SpecChange again, although the annotation is still there.
    patch_spec(kube, namespace, {"stages": {"production": 3}})
    obj = wait_reconciled(kube, namespace, lambda o: stages(o).get("production") == 3)
    trail = [
        (h.get("stage") or h.get("alias"), h.get("fromVersion"), h.get("toVersion"), h["cause"])
        for h in history(obj)
    ]
    assert trail == [
        ("Production", None, 1, "SpecChange"),
        ("Production", 1, 2, "SpecChange"),
        ("Production", 2, 3, "SpecChange"),
        ("Archived", None, 2, "SpecChange"),
        ("champion", None, 3, "SpecChange"),
        ("Production", 3, 2, "Rollback"),
        ("Archived", 2, None, "Rollback"),
        ("Production", 2, 1, "Rollback"),
        ("Production", 1, 3, "SpecChange"),
    ]

    # A refused promotion is reported with the reason, and nothing in force changes.
    rc, out, err = kiln(cluster, capsys, "promote", "digits", "9", "--stage", "Staging", *ns)
    assert rc == 1
    assert "refused" in err and "VersionNotFound" in err and "Production=3" in err

    rc, out, err = kiln(cluster, capsys, "models", *ns)
    print(out)
    header, row = out.strip().splitlines()
    assert header.split() == [
        "NAME",
        "LATEST",
        "PRODUCTION",
        "STAGING",
        "DEVELOPMENT",
        "ALIASES",
        "READY",
        "AGE",
    ]
    assert row.split()[:6] == ["digits", "3", "3", "-", "-", "champion=3"]
    assert "False (VersionNotFound)" in row

    rc, out, err = kiln(cluster, capsys, "versions", "digits", *ns)
    print(out)
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["VERSION", "STAGE", "ALIASES"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["3", "Production", "champion"],
        ["2", "None", "-"],
        ["1", "None", "-"],
    ]
    assert "accuracy=0.95" in lines[1] and "TrainingJob/job-3" in lines[1]
    assert "Ready=False (VersionNotFound)" in out

    rc, out, err = kiln(cluster, capsys, "history", "digits", *ns)
    assert rc == 0 and out.count("Rollback") == 3

    rc, out, err = kiln(cluster, capsys, "versions", "nope", *ns)
    assert rc == 1 and "Model " + namespace + "/nope not found" in err


def test_cli_as_a_process_reads_kubeconfig_and_namespace(
    kube: client.ApiClient, namespace: str, operator: object, tmp_path: Path, cluster: Cluster
) -> None:
    """The installed command, with KUBECONFIG and the context's namespace, as a user runs it."""
    create_model(kube, namespace, stages={"staging": 1})
    register(kube, namespace, tmp_path, "job-1", accuracy=0.9)
    wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(cluster.kubectl_run("config", "view", "--raw", "--minify").stdout)
    subprocess.run(
        [
            cluster.kubectl,
            f"--kubeconfig={kubeconfig}",
            "config",
            "set-context",
            "--current",
            f"--namespace={namespace}",
        ],
        check=True,
        capture_output=True,
    )
    env = {"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([KILN, "versions", "digits"], env=env, text=True, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    assert done.stdout.splitlines()[1].split()[:2] == ["1", "Staging"]
    done = subprocess.run(
        [KILN, "promote", "digits", "1", "--stage", "Production"],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Production=1 Staging=-" in done.stdout
