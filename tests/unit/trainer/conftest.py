"""Helpers for the trainer tests: run ``kiln-train`` in-process, as a subprocess, or under torchrun.

Nothing here imports torch at module level, so collecting this directory without the train
extra only skips the tests (each test module calls ``pytest.importorskip("torch")``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
#: torchrun's environment must not leak into single-process runs.
_DIST_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass
class Run:
    """The outcome of one trainer invocation."""

    returncode: int
    output: str
    termination: str
    out_root: Path
    model: str
    job: str

    @property
    def artifact(self) -> Path:
        return self.out_root / self.model / self.job

    @property
    def checkpoints(self) -> Path:
        return self.out_root / self.model / ".checkpoints" / self.job


def trainer_env(
    out_root: Path,
    job: str,
    *,
    model: str = "digits",
    hyperparameters: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    termination_log: Path | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The KILN_* environment the operator would set."""
    env = {
        "KILN_DATASET": json.dumps(dataset or {"builtin": "sklearn-digits"}),
        "KILN_HYPERPARAMETERS": json.dumps(hyperparameters or {}),
        "KILN_OUTPUT_URI": out_root.absolute().as_uri(),
        "KILN_MODEL_NAME": model,
        "KILN_TRAININGJOB": job,
        "KILN_IMAGE": "example.test/kiln-trainer:test",
        "KILN_TERMINATION_LOG": str(termination_log or out_root.parent / f"{job}.termination-log"),
    }
    env.update(extra or {})
    return env


def _read(path: str) -> str:
    p = Path(path)
    return p.read_text() if p.exists() else ""


@pytest.fixture
def run_inprocess(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Call ``kiln.trainer.__main__.main`` in this process (world size 1, no process group).

    Restores torch's determinism flag and the trainer logger afterwards.
    """
    import torch

    from kiln.trainer.__main__ import main

    was_det = torch.are_deterministic_algorithms_enabled()
    for k in _DIST_ENV:
        monkeypatch.delenv(k, raising=False)

    def run(env: dict[str, str], argv: list[str] | None = None) -> Run:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            code = main(argv or [])
        captured = capsys.readouterr()
        out_root = Path(env["KILN_OUTPUT_URI"].removeprefix("file://"))
        return Run(
            code,
            captured.out + captured.err,
            _read(env["KILN_TERMINATION_LOG"]),
            out_root,
            env["KILN_MODEL_NAME"],
            env["KILN_TRAININGJOB"],
        )

    yield run
    torch.use_deterministic_algorithms(was_det)
    logging.getLogger("kiln.trainer").handlers.clear()


def run_subprocess(
    env: dict[str, str], *, nproc: int | None = None, argv: list[str] | None = None, timeout: float = 240
) -> Run:
    """Run the trainer in a child process: ``torchrun --standalone --nproc_per_node N --no-python
    kiln-train`` when ``nproc`` is given (exactly what the trainer image runs), else ``kiln-train``
    alone. The child uses this process's torch thread count, so its floating point matches
    in-process runs.
    """
    import torch

    full = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    full.update(env)
    full["PYTHONUNBUFFERED"] = "1"
    full.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    kiln_train = BIN / "kiln-train"
    script = [str(kiln_train)] if kiln_train.exists() else [sys.executable, "-m", "kiln.trainer"]
    if nproc is None:
        cmd = script
    else:
        torchrun = BIN / "torchrun"
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        if kiln_train.exists():
            cmd = [*launcher, "--standalone", "--nproc_per_node", str(nproc), "--no-python", str(kiln_train)]
        else:
            cmd = [*launcher, "--standalone", "--nproc_per_node", str(nproc), "-m", "kiln.trainer"]
    r = subprocess.run(
        [*cmd, *(argv or [])], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )
    out_root = Path(env["KILN_OUTPUT_URI"].removeprefix("file://"))
    return Run(
        r.returncode,
        r.stdout + r.stderr,
        _read(env["KILN_TERMINATION_LOG"]),
        out_root,
        env["KILN_MODEL_NAME"],
        env["KILN_TRAININGJOB"],
    )
