"""examples/cnn/train.py without a cluster: two processes with exactly a TrainingJob pod's
environment for ranks 0 and 1 (PyTorchJob style, no launcher; node 0's name replaced by
127.0.0.1), one epoch. Both join the group, rank 0 alone exports and publishes; the artifact has
the signature the example documents and the result the operator would register."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from kiln.artifact import parse_termination_message, read_metadata, uri_to_path

from .test_pytorchjob_env import free_port, pod_env, spec

pytestmark = pytest.mark.torch

SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "cnn" / "train.py"


def test_cnn_example_trains_on_two_ranks_and_rank_0_publishes(tmp_path: Path) -> None:
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = pod_env(spec(2, 1), rank, port) | {
            "KILN_OUTPUT_URI": f"file://{tmp_path}/artifacts",
            "KILN_MODEL_NAME": "digits-cnn",
            "KILN_TRAININGJOB": "digits-cnn-v1",
            "KILN_TERMINATION_LOG": str(tmp_path / f"termination-{rank}"),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "--epochs", "1"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    for rank in (0, 1):
        assert f"rank {rank} of 2 on cpu" in logs[rank]
    assert not (tmp_path / "termination-1").exists()  # only rank 0 reports
    result = parse_termination_message((tmp_path / "termination-0").read_text())
    artifact = uri_to_path(result.artifactUri)
    assert artifact == tmp_path / "artifacts" / "digits-cnn" / "digits-cnn-v1"
    meta = read_metadata(artifact)
    assert meta.format == "torch-export" and meta.weightsDigest == result.digest
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("image", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 10]),
        ("predicted_class", "INT64", [-1]),
    ]
    assert meta.hyperparameters["worldSize"] == 2
    assert meta.dataset is not None and meta.dataset.numSamples == 1797
    # every rank scored its half of the 360 held-out images: one accuracy, in the result too
    assert 0.1 < result.metrics["accuracy"] == meta.metrics["accuracy"] <= 1
    assert "on 360 images" in logs[0]
