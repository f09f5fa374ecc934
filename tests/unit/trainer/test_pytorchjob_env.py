"""The distributed environment a TrainingJob pod gets, exercised by real processes.

A PyTorchJob-style script (``init_process_group(init_method="env://")``, no torchrun) runs as
two "pods" with exactly the environment ``kiln.resources.trainingjob`` builds for ranks 0 and 1,
except that node 0's DNS name (the headless Service) is replaced by 127.0.0.1 and the port by a
free one; and under torchrun, the same environment is overridden per worker by torchrun's own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from kiln.api.trainingjob import TrainingJobSpec
from kiln.resources.trainingjob import distributed_env

pytestmark = pytest.mark.torch

SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="env://")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
seen = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
with open(os.path.join(sys.argv[1], f"rank-{dist.get_rank()}.json"), "w") as f:
    json.dump({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(), "env": seen}, f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pod_env(spec: TrainingJobSpec, rank: int, port: int) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in distributed_env("job", "ns", spec, rank)}
    for k in ("MASTER_ADDR", "PET_MASTER_ADDR"):
        env[k] = "127.0.0.1"
    for k in ("MASTER_PORT", "PET_MASTER_PORT"):
        env[k] = str(port)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "MASTER_")) and k not in env}
    return {**base, **env, "OMP_NUM_THREADS": "1"}


def results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def spec(nodes: int, nproc: int) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(
        {
            "image": "user/train:1",
            "command": ["python", "train.py"],
            "dataset": {"builtin": "sklearn-digits"},
            "numNodes": nodes,
            "numProcPerNode": nproc,
        }
    )


def test_pytorchjob_script_runs_unchanged_on_two_pods(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=pod_env(spec(2, 1), rank, port))
        for rank in (0, 1)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got = results(tmp_path)
    assert [(r["rank"], r["world"], r["sum"]) for r in got] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert [r["env"]["LOCAL_RANK"] for r in got] == ["0", "0"]


def test_torchrun_replaces_the_pytorchjob_env_per_worker(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = pod_env(spec(1, 2), 0, free_port())
    assert (env["WORLD_SIZE"], env["RANK"]) == ("2", "0") and "LOCAL_RANK" not in env
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run(
        [str(torchrun), str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = results(tmp_path)
    assert [(r["rank"], r["world"], r["sum"]) for r in got] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert [(r["env"]["RANK"], r["env"]["LOCAL_RANK"], r["env"]["LOCAL_WORLD_SIZE"]) for r in got] == [
        ("0", "0", "2"),
        ("1", "1", "2"),
    ]
