"""End-to-end trainer runs on sklearn-digits: in-process, as a subprocess and under real torchrun.

Covers the artifact contract (verify_artifact, config + safetensors reload give the reported
accuracy), the termination message, bad-input exit codes, determinism, crash-and-resume at world
size 1 and 2 (a gang restart reruns the same command), and NCCL on a GPU when there is one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the train extra

import torch
from safetensors.torch import load_file

from kiln.artifact import (
    FAULT_INJECTION_FAIL_RATE_KEY,
    TerminationMessageError,
    fault_injection_fail_rate,
    parse_termination_message,
    read_config,
    read_metadata,
    read_weights_metadata,
    uri_to_path,
    verify_artifact,
)
from kiln.monitoring.profile import PROFILE_FILE, load_profile
from kiln.nn import build_model
from kiln.trainer.data import load_builtin, stratified_split

from .conftest import Run, run_subprocess, trainer_env

pytestmark = pytest.mark.torch

SHORT = {"epochs": 6}


def _accuracy_of_artifact(artifact: Path, seed: int = 0) -> float:
    """Rebuild the net from config.json + model.safetensors (as the server does) and score the
    held-out test split independently of the trainer."""
    model = build_model(read_config(artifact))
    model.load_state_dict(load_file(str(artifact / "model.safetensors")))
    model.eval()
    ds = load_builtin("sklearn-digits")
    test = stratified_split(ds.labels, seed=seed, validation_fraction=0.15, test_fraction=0.15).test
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.features[test])).argmax(1).numpy()
    return float((pred == ds.labels[test]).mean())


def _check_success(run: Run, world_size: int) -> dict:
    assert run.returncode == 0, run.output[-4000:]
    result = parse_termination_message(run.termination)
    assert uri_to_path(result.artifactUri) == run.artifact.absolute()
    meta = verify_artifact(run.artifact, expected_digest=result.digest)
    assert meta.metrics == result.metrics
    assert meta.hyperparameters["worldSize"] == world_size
    assert meta.trainingJob == run.job and meta.modelName == run.model
    assert meta.image == "example.test/kiln-trainer:test"
    assert meta.framework["torch"] == torch.__version__
    assert not run.checkpoints.exists()  # removed after success
    return {"digest": result.digest, **result.metrics}


def _check_reference_profile(artifact: Path) -> None:
    """profile.json: the training split's 64 pixels and the model's predicted classes on it,
    listed (and so verified) in metadata.json's files."""
    assert PROFILE_FILE in read_metadata(artifact).files
    profile = load_profile(artifact)
    assert profile is not None
    ds = load_builtin("sklearn-digits")
    train = stratified_split(ds.labels, seed=0, validation_fraction=0.15, test_fraction=0.15).train
    assert profile.rows == len(train) and [i.model_dump() for i in profile.inputs] == [
        {"name": "input-0", "shape": [64]}
    ]
    assert [f.name for f in profile.features] == ds.feature_names and ds.feature_names[9] == "pixel_1_1"
    pixel = profile.features[9]  # the whole column, exactly (17 distinct values)
    values, counts = torch.from_numpy(ds.features[train][:, 9]).unique(return_counts=True)
    assert not pixel.sampled and pixel.values == values.tolist() and pixel.counts == counts.tolist()
    p = profile.prediction
    assert p is not None and (p.output, p.transform, p.type) == ("output-0", "argmax", "categorical")
    assert p.values == [float(c) for c in range(10)] and sum(p.counts) == len(train)
    # about as many of each predicted class as of each label (the model is ~97% accurate)
    labels = torch.from_numpy(ds.labels[train]).bincount().tolist()
    assert all(abs(c - n) <= 0.1 * n for c, n in zip(p.counts, labels, strict=True))


def _epoch_lines(output: str) -> list[str]:
    return re.findall(r"epoch \d+/\d+ loss=\S+ val_loss=\S+ val_accuracy=\S+ samples/s=\d+", output)


def test_single_process_run_writes_a_verifiable_artifact(tmp_path: Path, run_inprocess):
    env = trainer_env(tmp_path / "out", "digits-1")
    run = run_inprocess(env)
    r = _check_success(run, world_size=1)
    assert r["accuracy"] >= 0.95, r
    assert set(r) >= {"accuracy", "loss", "valAccuracy", "valLoss", "trainLoss"}
    assert len(_epoch_lines(run.output)) == 30
    meta = read_metadata(run.artifact)
    assert (
        meta.dataset is not None and meta.dataset.name == "sklearn-digits" and meta.dataset.numSamples == 1797
    )
    assert meta.hyperparameters["epochs"] == 30 and meta.hyperparameters["precision"] == "fp32"
    config = read_config(run.artifact)
    assert config.inputSize == 64 and config.numClasses == 10 and config.labels == [str(i) for i in range(10)]
    assert min(config.inputStd) > 0 and config.inputStd[0] == 1.0  # blank pixel: floor, not 0
    # What the server would compute from the files equals what the trainer reported.
    assert _accuracy_of_artifact(run.artifact) == pytest.approx(r["accuracy"])
    _check_reference_profile(run.artifact)
    assert not list(run.artifact.parent.glob(".tmp-*"))

    # A restart after success (e.g. the pod died after writing) re-reports the same result.
    again = run_inprocess(env)
    assert again.returncode == 0 and again.termination == run.termination
    assert "already exists" in again.output
    # Artifacts are immutable: the same job name with other hyperparameters is refused.
    other = run_inprocess({**env, "KILN_HYPERPARAMETERS": '{"epochs": 2}'})
    assert other.returncode == 2 and "different dataset or hyperparameters" in other.output


def test_bad_input_exits_2_with_a_failure_termination_message(tmp_path: Path, run_inprocess):
    env = trainer_env(tmp_path / "out", "bad", dataset={"builtin": "imagenet"})
    run = run_inprocess(env)
    assert run.returncode == 2
    assert "unknown built-in dataset 'imagenet'" in run.output
    assert run.termination.startswith("kiln-train: error (rank 0): unknown built-in dataset 'imagenet'")
    with pytest.raises(TerminationMessageError):
        parse_termination_message(run.termination)

    csv = tmp_path / "d.csv"
    csv.write_text("a,b,label\n1,x,0\n2,y,1\n")
    env = trainer_env(tmp_path / "out", "bad-csv", dataset={"uri": str(csv), "labelColumn": "label"})
    run = run_inprocess(env)
    assert run.returncode == 2 and "non-numeric: b (string)" in run.termination


def test_serving_fault_injection_rate_lands_in_the_artifact(tmp_path: Path, run_inprocess):
    """A deliberately broken version for rollback drills: the rate is in the weights file's
    header (covered by the digest) and in metadata.json; the training itself is unchanged."""
    hp = {**SHORT, "epochs": 2, FAULT_INJECTION_FAIL_RATE_KEY: 0.25}
    run = run_inprocess(trainer_env(tmp_path / "out", "drill", hyperparameters=hp))
    _check_success(run, world_size=1)
    assert "FAULT INJECTION" in run.output and "ON PURPOSE" in run.output
    digest = parse_termination_message(run.termination).digest
    assert read_weights_metadata(run.artifact / "model.safetensors") == {
        FAULT_INJECTION_FAIL_RATE_KEY: "0.25"
    }
    assert fault_injection_fail_rate(run.artifact) == 0.25
    assert read_metadata(run.artifact).hyperparameters[FAULT_INJECTION_FAIL_RATE_KEY] == 0.25
    from kiln.server.model import load_model

    assert load_model(run.artifact, digest, name="digits", version="1").fault_injection_fail_rate == 0.25

    normal = run_inprocess(trainer_env(tmp_path / "out", "normal", hyperparameters={**SHORT, "epochs": 2}))
    _check_success(normal, world_size=1)
    assert "FAULT INJECTION" not in normal.output
    assert read_weights_metadata(normal.artifact / "model.safetensors") == {}
    assert FAULT_INJECTION_FAIL_RATE_KEY not in read_metadata(normal.artifact).hyperparameters
    assert fault_injection_fail_rate(normal.artifact) == 0.0
    # same weights, different digest: the header is part of the digested bytes
    drill_w, normal_w = (load_file(str(r.artifact / "model.safetensors")) for r in (run, normal))
    assert drill_w.keys() == normal_w.keys() and all(torch.equal(drill_w[k], normal_w[k]) for k in drill_w)
    assert digest != parse_termination_message(normal.termination).digest


def test_bad_serving_fault_injection_rate_exits_2(tmp_path: Path, run_inprocess):
    hp = {FAULT_INJECTION_FAIL_RATE_KEY: 1.5}
    run = run_inprocess(trainer_env(tmp_path / "out", "bad-rate", hyperparameters=hp))
    assert run.returncode == 2
    assert run.termination.startswith(
        "kiln-train: error (rank 0): hyperparameters.servingFaultInjectionFailRate"
    )
    assert not run.artifact.exists()


def test_same_seed_same_weights_and_resume_is_exact(tmp_path: Path, run_inprocess):
    """World size 1: two runs with one seed give bit-identical weights; a run killed after
    epoch 3 and rerun with the same command resumes at epoch 4 and ends bit-identical too."""
    out = tmp_path / "out"
    a = run_inprocess(trainer_env(out, "a", hyperparameters=SHORT))
    b = run_inprocess(trainer_env(out, "b", hyperparameters=SHORT))
    c = run_inprocess(trainer_env(out, "c", hyperparameters={**SHORT, "seed": 1}))
    da, db, dc = (_check_success(x, 1)["digest"] for x in (a, b, c))
    assert da == db
    assert dc != da

    env = trainer_env(out, "r", hyperparameters=SHORT, extra={"KILN_FAIL_AFTER_EPOCH": "3"})
    crashed = run_subprocess(env)
    assert crashed.returncode == 1, crashed.output[-3000:]
    assert "FAULT INJECTION" in crashed.output and len(_epoch_lines(crashed.output)) == 3
    assert (crashed.checkpoints / "epoch-000003" / "model.safetensors").is_file()
    assert not crashed.artifact.exists() and crashed.termination == ""

    resumed = run_inprocess(env)  # the same command and environment again
    assert "resumedFromEpoch=3, continuing at epoch 4/6" in resumed.output
    assert [int(m) for m in re.findall(r"epoch (\d+)/6 loss", resumed.output)] == [4, 5, 6]
    assert _check_success(resumed, 1)["digest"] == da


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict]:
    """An uninterrupted 2-process gloo run with the default hyperparameters."""
    out = tmp_path_factory.mktemp("torchrun") / "out"
    run = run_subprocess(trainer_env(out, "ddp-ref"), nproc=2)
    return run, _check_success(run, world_size=2)


@pytest.mark.timeout(300)
def test_torchrun_two_processes_reach_accuracy(torchrun_reference):
    run, result = torchrun_reference
    assert result["accuracy"] >= 0.95, result
    assert "world_size=2 backend=gloo device=cpu precision=fp32" in run.output
    assert len(_epoch_lines(run.output)) == 30  # rank 0 logs, rank 1 does not
    assert _accuracy_of_artifact(run.artifact) == pytest.approx(result["accuracy"])


@pytest.mark.timeout(400)
def test_torchrun_gang_restart_resumes_from_last_checkpoint(tmp_path: Path, torchrun_reference):
    """Rank 1 crashes after epoch 10; torchrun fails the whole gang. Rerunning the same command
    (what the operator's gang restart does) resumes at epoch 11 on both ranks and ends with the
    same weights as the uninterrupted run."""
    env = trainer_env(
        tmp_path / "out", "ddp-ref", extra={"KILN_FAIL_AFTER_EPOCH": "10", "KILN_FAIL_RANK": "1"}
    )
    crashed = run_subprocess(env, nproc=2)
    assert crashed.returncode != 0
    assert "FAULT INJECTION (KILN_FAIL_AFTER_EPOCH=10): rank 1" in crashed.output
    assert [e.name for e in sorted(crashed.checkpoints.iterdir())] == ["epoch-000009", "epoch-000010"]
    assert not crashed.artifact.exists()

    resumed = run_subprocess(env, nproc=2)
    assert "resumedFromEpoch=10, continuing at epoch 11/30" in resumed.output
    assert [int(m) for m in re.findall(r"epoch (\d+)/30 loss", resumed.output)] == list(range(11, 31))
    result = _check_success(resumed, world_size=2)
    assert result["accuracy"] >= 0.95, result
    assert result["digest"] == torchrun_reference[1]["digest"]  # bit-exact resume


@pytest.mark.gpu
@pytest.mark.timeout(400)
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_nccl_on_gpus(tmp_path: Path, precision: str):
    """DDP with NCCL and mixed precision (bf16 autocast, or fp16 with GradScaler)."""
    n = torch.cuda.device_count()
    if n < 1:
        pytest.skip("needs a CUDA GPU")
    env = trainer_env(tmp_path / "out", f"gpu-{precision}", hyperparameters={"precision": precision})
    run = run_subprocess(env, nproc=min(n, 2))
    result = _check_success(run, world_size=min(n, 2))
    assert "backend=nccl device=cuda:0" in run.output
    assert result["accuracy"] >= 0.95, result
    used = json.loads((run.artifact / "metadata.json").read_text())["hyperparameters"]["precision"]
    assert used in ("bf16", "fp16") if precision == "auto" else used == "fp16"


def _share_worker(rank: int, init_file: str, ckpt: str, results: str) -> None:
    """One rank of test_checkpoint_reaches_ranks_without_a_shared_volume (spawned process)."""
    import contextlib

    import torch.distributed as dist

    from kiln.trainer.__main__ import _share_checkpoint
    from kiln.trainer.checkpoint import load_checkpoint
    from kiln.trainer.distributed import DistContext

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ctx = DistContext(rank, rank, 2, torch.device("cpu"), "gloo")
    # Rank 1 is on "another node": rank 0's checkpoint path does not exist there.
    path = Path(ckpt) if rank == 0 else Path(results) / "elsewhere" / Path(ckpt).name
    with contextlib.ExitStack() as stack:
        got = _share_checkpoint(ctx, path, stack)
        ck = load_checkpoint(got)
        (Path(results) / f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "path": str(got),
                    "epoch": ck.epoch,
                    "sum": float(sum(t.sum() for t in ck.model_state.values())),
                }
            )
        )
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_checkpoint_reaches_ranks_without_a_shared_volume(tmp_path: Path):
    import torch.multiprocessing as mp

    from kiln.trainer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        epoch=4,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        scaler_state=None,
        history=[],
        fingerprint="f",
    )
    mp.spawn(_share_worker, args=(str(tmp_path / "init"), str(ckpt), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["path"] == str(ckpt) and r1["path"] != str(ckpt)  # rank 1 got a private copy
    assert r0["epoch"] == r1["epoch"] == 4 and r0["sum"] == r1["sum"]
