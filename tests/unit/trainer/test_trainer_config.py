"""Configuration (env + flags), checkpoints and the termination log, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the train extra

import torch

from kiln import storage
from kiln.artifact import TerminationMessageError, parse_termination_message
from kiln.trainer.checkpoint import (
    CheckpointMirror,
    find_resumable,
    join_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    split_optimizer_state,
)
from kiln.trainer.config import UsageError, default_staging_dir, resolve_config
from kiln.trainer.output import FAILURE_PREFIX, write_failure_message, write_termination_message

pytestmark = pytest.mark.torch

BASE = {
    "KILN_DATASET": '{"builtin": "sklearn-digits"}',
    "KILN_OUTPUT_URI": "file:///tmp/kiln-out",
}


def test_env_is_read_and_flags_override_it():
    env = {
        **BASE,
        "KILN_HYPERPARAMETERS": json.dumps({"epochs": "7", "learningRate": 0.01, "batchSize": 32, "seed": 3}),
        "KILN_MODEL_NAME": "digits",
        "KILN_TRAININGJOB": "digits-train-1",
        "KILN_IMAGE": "reg/kiln-trainer:1",
        "KILN_TERMINATION_LOG": "/tmp/term",
    }
    c = resolve_config([], env)
    hp = c.hyperparameters
    assert (hp.epochs, hp.learningRate, hp.batchSize, hp.seed) == (7, 0.01, 32, 3)
    assert c.output_root == Path("/tmp/kiln-out") and c.model_name == "digits"
    assert c.training_job == "digits-train-1" and c.image == "reg/kiln-trainer:1"
    assert c.termination_log == Path("/tmp/term") and c.termination_log_explicit
    c = resolve_config(
        ["--epochs", "2", "--hidden-sizes", "32,16", "--hyperparameters", '{"seed": 9}', "--output", "/o"],
        env,
    )
    assert (c.hyperparameters.epochs, c.hyperparameters.hiddenSizes, c.hyperparameters.seed) == (
        2,
        [32, 16],
        9,
    )
    assert c.hyperparameters.learningRate == 0.01  # untouched keys keep the env value
    assert c.output_root == Path("/o")


def test_dataset_flag_forms():
    assert resolve_config(["--dataset", "sklearn-digits"], BASE).dataset.builtin == "sklearn-digits"
    c = resolve_config(["--dataset", "/data/x.parquet", "--label-column", "y"], BASE)
    assert (c.dataset.uri, c.dataset.labelColumn) == ("/data/x.parquet", "y")
    c = resolve_config(["--dataset", '{"uri": "file:///d.csv", "format": "csv", "labelColumn": "t"}'], BASE)
    assert (c.dataset.uri, c.dataset.format) == ("file:///d.csv", "csv")


def test_s3_output_is_staged_locally():
    env = {**BASE, "KILN_OUTPUT_URI": "s3://bucket/models/", "KILN_STAGING_DIR": "/tmp/stage"}
    c = resolve_config([], env)
    assert c.output_remote == storage.Location("s3", "bucket", "models")
    assert c.staging_dir == Path("/tmp/stage") and c.output_root == Path("/tmp/stage/output")
    c = resolve_config(["--staging-dir", "/s2"], env)
    assert c.staging_dir == Path("/s2") and c.output_root == Path("/s2/output")
    c = resolve_config([], {**BASE, "KILN_OUTPUT_URI": "s3://bucket"})
    assert c.output_remote == storage.Location("s3", "bucket", "") and c.staging_dir == default_staging_dir()
    assert resolve_config([], BASE).output_remote is None


def test_defaults_without_optional_env():
    c = resolve_config([], BASE)
    assert c.model_name == "model" and c.training_job == ""
    assert c.termination_log == Path("/dev/termination-log") and not c.termination_log_explicit
    assert c.hyperparameters.epochs == 30 and c.hyperparameters.effective_split_seed == 0


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({"KILN_HYPERPARAMETERS": '{"learningrate": 1}'}, [], "hyperparameters.learningrate: unknown key"),
        ({"KILN_HYPERPARAMETERS": '{"epochs": 0}'}, [], "hyperparameters.epochs: Input should be greater"),
        ({"KILN_HYPERPARAMETERS": "[1]"}, [], "must be a JSON object"),
        ({"KILN_HYPERPARAMETERS": "{bad"}, [], "KILN_HYPERPARAMETERS is not valid JSON"),
        ({"KILN_DATASET": ""}, [], "no dataset"),
        ({"KILN_DATASET": "{}"}, [], "one of 'builtin', 'uri' or 'featureGroup'"),
        (
            {"KILN_DATASET": '{"featureGroupRef": {"name": "fg"}}'},
            [],
            "one of 'builtin', 'uri' or 'featureGroup'",
        ),
        ({"KILN_DATASET": '{"featureGroup": "fg"}'}, [], "featureGroup"),
        (
            {
                "KILN_DATASET": '{"featureGroup": {"name": "a", "namespace": "b", "spec": {}, "schemaDigest": "x"}}'
            },
            [],
            "needs 'entityUri' and 'labelColumn'",
        ),
        ({"KILN_DATASET": '{"uri": "/x", "format": "json"}'}, [], "dataset.format"),
        ({"KILN_OUTPUT_URI": ""}, [], "no output"),
        ({"KILN_OUTPUT_URI": "gs://b/p"}, [], "unsupported artifact URI scheme"),
        ({"KILN_OUTPUT_URI": "s3:///p"}, [], "needs a bucket"),
        ({"KILN_MODEL_NAME": "../etc"}, [], "not a valid directory name"),
        ({}, ["--backend", "mpi"], "invalid choice"),
        ({}, ["--epochs", "x"], "invalid int value"),
        # FAULT INJECTION rate of the served artifact: a number in [0, 1]
        (
            {"KILN_HYPERPARAMETERS": '{"servingFaultInjectionFailRate": 1.5}'},
            [],
            "hyperparameters.servingFaultInjectionFailRate: Input should be less than or equal to 1",
        ),
        (
            {"KILN_HYPERPARAMETERS": '{"servingFaultInjectionFailRate": -0.1}'},
            [],
            "hyperparameters.servingFaultInjectionFailRate: Input should be greater than or equal to 0",
        ),
        (
            {"KILN_HYPERPARAMETERS": '{"servingFaultInjectionFailRate": "NaN"}'},
            [],
            "hyperparameters.servingFaultInjectionFailRate: Input should be a finite number",
        ),
        (
            {"KILN_HYPERPARAMETERS": '{"servingFaultInjectionFailRate": "often"}'},
            [],
            "hyperparameters.servingFaultInjectionFailRate: Input should be a valid number",
        ),
        (
            {"KILN_HYPERPARAMETERS": '{"servingFaultInjectionFailRate": true}'},
            [],
            "hyperparameters.servingFaultInjectionFailRate: .*not a boolean",
        ),
    ],
)
def test_bad_configuration_is_a_usage_error(env: dict, argv: list, message: str):
    with pytest.raises(UsageError, match=message):
        resolve_config(argv, {**BASE, **env})


def test_serving_fault_injection_rate_defaults_to_zero_and_accepts_strings():
    assert resolve_config([], BASE).hyperparameters.servingFaultInjectionFailRate == 0.0
    env = {**BASE, "KILN_HYPERPARAMETERS": '{"servingFaultInjectionFailRate": "0.25"}'}
    assert resolve_config([], env).hyperparameters.servingFaultInjectionFailRate == 0.25


def test_unused_dataset_keys_only_warn():
    c = resolve_config([], {**BASE, "KILN_DATASET": '{"builtin": "sklearn-digits", "volume": {}}'})
    assert c.warnings == ["dataset key 'volume' is not used by the trainer; ignored"]


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    return model, opt


def test_optimizer_state_roundtrips_without_pickle():
    _, opt = _model_and_optimizer()
    tensors, rest = split_optimizer_state(opt.state_dict())
    json.dumps(rest)  # the non-tensor part is plain JSON
    back = join_optimizer_state(tensors, json.loads(json.dumps(rest)))
    orig = opt.state_dict()
    assert back["param_groups"][0]["params"] == orig["param_groups"][0]["params"]
    for i, st in orig["state"].items():
        for k, v in st.items():
            assert torch.equal(back["state"][i][k], v)


def test_checkpoints_are_atomic_pruned_and_resume_matching_config(tmp_path: Path):
    model, opt = _model_and_optimizer()
    root = tmp_path / "ckpt"
    for epoch in (1, 2, 3):
        save_checkpoint(
            root,
            epoch=epoch,
            model_state=model.state_dict(),
            optimizer_state=opt.state_dict(),
            scaler_state=None,
            history=[{"epoch": epoch}],
            fingerprint="A",
            keep=2,
        )
    (root / ".tmp-epoch-000004-dead").mkdir()  # a crash mid-write leaves this behind
    assert [e for e, _ in list_checkpoints(root)] == [3, 2]
    assert find_resumable(root, "A") == (3, root / "epoch-000003")
    ck = load_checkpoint(root / "epoch-000003")
    assert ck.epoch == 3 and ck.fingerprint == "A" and ck.history == [{"epoch": 3}]
    fresh, fresh_opt = _model_and_optimizer()
    fresh.load_state_dict(ck.model_state)
    fresh_opt.load_state_dict(ck.optimizer_state)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )
    # A damaged newest checkpoint (truncated tensors) falls back to the previous one.
    weights = root / "epoch-000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert find_resumable(root, "A") == (2, root / "epoch-000002")
    # A different configuration under the same job name never resumes; its checkpoints go.
    assert find_resumable(root, "B") is None
    assert list_checkpoints(root) == []


def _save(root: Path, epoch: int, fingerprint: str = "A", mirror: CheckpointMirror | None = None) -> Path:
    model, opt = _model_and_optimizer()
    return save_checkpoint(
        root,
        epoch=epoch,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        scaler_state=None,
        history=[{"epoch": epoch}],
        fingerprint=fingerprint,
        keep=2,
        mirror=mirror,
    )


def test_checkpoint_mirror_uploads_prunes_and_resumes_from_the_copy(tmp_path: Path):
    """CheckpointMirror on a file:// location (the same code path as s3://, see test_trainer_s3):
    state.json is the completeness marker, pruning follows the local keep, a new machine (empty
    local root) resumes from the newest complete remote copy, falling back past damaged ones."""
    remote = storage.parse(str(tmp_path / "bucket" / "ckpt"))
    mirror = CheckpointMirror(remote)
    (tmp_path / "bucket" / "ckpt" / "epoch-000009").mkdir(parents=True)  # torn upload: no state.json
    (tmp_path / "bucket" / "ckpt" / "epoch-000009" / "model.safetensors").write_bytes(b"x")
    for epoch in (1, 2, 3):
        _save(tmp_path / "a", epoch, mirror=mirror)
    assert [e for e, _ in mirror.list_complete()] == [3, 2]
    assert storage.list_files(remote) == [
        f"epoch-00000{e}/{f}"
        for e in (2, 3)
        for f in ("model.safetensors", "optimizer.safetensors", "state.json")
    ]  # epoch 1 pruned, the torn epoch 9 removed

    fresh = tmp_path / "b"
    assert find_resumable(fresh, "A", mirror) == (3, fresh / "epoch-000003")
    assert load_checkpoint(fresh / "epoch-000003").history == [{"epoch": 3}]
    # A damaged newest remote copy falls back to the previous one.
    (tmp_path / "bucket" / "ckpt" / "epoch-000003" / "model.safetensors").write_bytes(b"torn")
    other = tmp_path / "c"
    assert find_resumable(other, "A", mirror) == (2, other / "epoch-000002")
    assert not (other / "epoch-000003").exists()
    # A local copy at least as new as the bucket's is used without downloading.
    assert find_resumable(fresh, "A", mirror) == (3, fresh / "epoch-000003")
    # Another configuration never resumes; its remote checkpoints go too.
    assert find_resumable(tmp_path / "d", "B", mirror) is None
    assert mirror.list_complete() == []
    _save(tmp_path / "e", 1, mirror=mirror)
    assert mirror.delete_all() == 3 and storage.list_files(remote) == []


def test_termination_log_success_and_failure(tmp_path: Path):
    log = tmp_path / "termination-log"
    assert write_failure_message(log, "error (rank 0): bad   input\nsecond line", explicit=True)
    text = log.read_text()
    assert text == FAILURE_PREFIX + "error (rank 0): bad input second line"
    with pytest.raises(TerminationMessageError) as e:
        parse_termination_message(text)
    assert e.value.reason == "ResultMalformed"
    assert not write_failure_message(log, "a follow-on error", explicit=True)  # first failure wins
    assert log.read_text() == text
    long = write_failure_message(tmp_path / "long", "x" * 10_000, explicit=True)
    assert long and len((tmp_path / "long").read_bytes()) <= 4096
    # The default /dev/termination-log is only written when it exists (the kubelet creates it).
    assert not write_termination_message(tmp_path / "absent", "{}", explicit=False)
    assert not (tmp_path / "absent").exists()
    assert not write_failure_message(tmp_path / "no-such-dir" / "log", "x", explicit=True)
