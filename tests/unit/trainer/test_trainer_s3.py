"""The trainer against a real S3 server (a private versitygw, see tests/s3.py).

An ``s3://`` output: the artifact is uploaded and verifies in the bucket with the reported digest,
the same run is reported again and another refused; checkpoints go to the bucket and a crashed
run resumes from them with a fresh (empty) staging directory, bit-identical to an uninterrupted
run, at world size 1 and 2; an ``s3://`` dataset; wrong credentials, a missing bucket, a missing
dataset object and an unreachable store end with the exit code and a termination message that
names bucket/key and cause, and never the credentials.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the train extra

from kiln import storage
from kiln.artifact import TrainingResult, parse_termination_message
from kiln.trainer.data import load_builtin
from tests.s3 import PrivateS3, private_s3  # noqa: F401  (fixture, by name)

from .conftest import Run, run_subprocess, trainer_env

pytestmark = pytest.mark.torch

SHORT = {"epochs": 6}
BUCKET = "kiln"


@pytest.fixture
def store(private_s3: PrivateS3, monkeypatch: pytest.MonkeyPatch) -> PrivateS3:  # noqa: F811
    """The private store with bucket ``kiln``; its AWS_* variables set in this process (for
    kiln.storage here and for trainer subprocesses), nothing of the caller's AWS setup."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    for k, v in private_s3.aws_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    private_s3.client().create_bucket(Bucket=BUCKET)
    return private_s3


def s3_env(tmp_path: Path, job: str, *, staging: str = "staging", root: str = f"s3://{BUCKET}/models", **kw):
    """trainer_env with an s3:// output root and a staging directory of its own."""
    env = trainer_env(tmp_path / "unused", job, termination_log=tmp_path / f"{job}-{staging}.term", **kw)
    env["KILN_OUTPUT_URI"] = root
    env["KILN_STAGING_DIR"] = str(tmp_path / staging)
    return env


def _check_s3_success(run: Run, root: str = f"s3://{BUCKET}/models") -> TrainingResult:
    assert run.returncode == 0, run.output[-4000:]
    result = parse_termination_message(run.termination)
    assert result.artifactUri == f"{root}/{run.model}/{run.job}"
    meta = storage.verify_artifact_at(result.artifactUri, result.digest)
    assert meta.metrics == result.metrics and meta.trainingJob == run.job
    assert storage.list_files(f"{root}/{run.model}/{run.job}") == [
        "config.json",
        "metadata.json",
        "model.safetensors",
        "profile.json",
    ]
    assert storage.list_files(f"{root}/{run.model}/.checkpoints/{run.job}") == []  # removed after success
    return result


def test_train_to_s3_reports_a_verifiable_artifact(tmp_path: Path, run_inprocess, store: PrivateS3):
    env = s3_env(tmp_path, "digits-1", hyperparameters=SHORT)
    run = run_inprocess(env)
    result = _check_s3_success(run)
    staging = Path(env["KILN_STAGING_DIR"])
    assert not (staging / "output" / "digits" / "digits-1").exists()  # the staged copy is gone
    # Same digest as the same training written to a directory.
    local = run_inprocess(trainer_env(tmp_path / "out", "digits-1", hyperparameters=SHORT))
    assert parse_termination_message(local.termination).digest == result.digest

    # A restart after success (new pod, empty staging) reports the bucket's artifact again.
    again = run_inprocess(s3_env(tmp_path, "digits-1", staging="staging-2", hyperparameters=SHORT))
    assert again.returncode == 0, again.output[-3000:]
    assert parse_termination_message(again.termination) == result
    assert "already exists" in again.output
    # Artifacts are immutable: the same job name with other hyperparameters is refused.
    other = run_inprocess(s3_env(tmp_path, "digits-1", staging="staging-3", hyperparameters={"epochs": 2}))
    assert other.returncode == 2 and "different dataset or hyperparameters" in other.termination
    assert f"s3://{BUCKET}/models/digits/digits-1" in other.termination
    assert storage.verify_artifact_at(result.artifactUri, result.digest)  # untouched

    # An interrupted upload (objects but no metadata.json) does not count as an artifact.
    storage.delete_file(f"{result.artifactUri}/metadata.json")
    redo = run_inprocess(s3_env(tmp_path, "digits-1", staging="staging-4", hyperparameters=SHORT))
    assert _check_s3_success(redo).digest == result.digest


def test_crash_then_resume_from_the_bucket_is_exact(tmp_path: Path, run_inprocess, store: PrivateS3):
    """Killed after epoch 3; the rerun on a fresh staging directory (a new pod) downloads the
    newest checkpoint from the bucket, resumes at epoch 4 and ends bit-identical."""
    reference = _check_s3_success(run_inprocess(s3_env(tmp_path, "ref", hyperparameters=SHORT)))
    env = s3_env(tmp_path, "r", hyperparameters=SHORT, extra={"KILN_FAIL_AFTER_EPOCH": "3"})
    crashed = run_subprocess(env)
    assert crashed.returncode == 1, crashed.output[-3000:]
    assert "FAULT INJECTION" in crashed.output and crashed.termination == ""
    ckpts = f"s3://{BUCKET}/models/digits/.checkpoints/r"
    assert storage.list_files(ckpts) == [
        f"epoch-00000{e}/{f}"
        for e in (2, 3)
        for f in ("model.safetensors", "optimizer.safetensors", "state.json")
    ]  # pruned to the newest 2, like the directory
    assert not storage.exists(f"s3://{BUCKET}/models/digits/r/metadata.json")

    resumed = run_inprocess({**env, "KILN_STAGING_DIR": str(tmp_path / "fresh")})
    assert "resumedFromEpoch=3, continuing at epoch 4/6" in resumed.output
    assert [int(m) for m in re.findall(r"epoch (\d+)/6 loss", resumed.output)] == [4, 5, 6]
    assert _check_s3_success(resumed).digest == reference.digest


@pytest.mark.timeout(400)
def test_torchrun_gang_restart_resumes_from_the_bucket(tmp_path: Path, store: PrivateS3):
    """World size 2: rank 1 crashes after epoch 3, the whole gang reruns on a fresh staging
    directory and ends with the weights of an uninterrupted 2-process run."""
    reference = _check_s3_success(run_subprocess(s3_env(tmp_path, "ddp-ref", hyperparameters=SHORT), nproc=2))
    env = s3_env(
        tmp_path, "ddp", hyperparameters=SHORT, extra={"KILN_FAIL_AFTER_EPOCH": "3", "KILN_FAIL_RANK": "1"}
    )
    crashed = run_subprocess(env, nproc=2)
    assert crashed.returncode != 0 and "FAULT INJECTION (KILN_FAIL_AFTER_EPOCH=3): rank 1" in crashed.output
    assert storage.exists(f"s3://{BUCKET}/models/digits/.checkpoints/ddp/epoch-000003/state.json")

    resumed = run_subprocess({**env, "KILN_STAGING_DIR": str(tmp_path / "fresh")}, nproc=2)
    assert "resumedFromEpoch=3, continuing at epoch 4/6" in resumed.output
    assert _check_s3_success(resumed).digest == reference.digest


def test_dataset_from_s3(tmp_path: Path, run_inprocess, store: PrivateS3):
    iris = load_builtin("sklearn-iris")
    table = tmp_path / "iris.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*iris.feature_names, "species"])
        for x, y in zip(iris.features.tolist(), iris.labels.tolist(), strict=True):
            w.writerow([*x, iris.class_names[y]])
    uri = f"s3://{BUCKET}/data/iris.csv"
    storage.upload_file(table, uri)
    dataset = {"uri": uri, "labelColumn": "species"}
    run = run_inprocess(
        s3_env(tmp_path, "iris", model="iris", dataset=dataset, hyperparameters={"epochs": 3})
    )
    result = _check_s3_success(run)
    meta = storage.read_artifact_metadata(result.artifactUri)
    assert meta.dataset is not None and meta.dataset.name == uri  # lineage: the s3 URI
    assert meta.dataset.numSamples == 150
    # the same numbers as the local file
    local = run_inprocess(
        trainer_env(tmp_path / "out", "iris", dataset={"uri": str(table), "labelColumn": "species"})
    )
    assert local.returncode == 0, local.output[-3000:]
    from kiln.artifact import read_metadata

    local_meta = read_metadata(local.artifact)
    assert local_meta.dataset is not None and local_meta.dataset.digest == meta.dataset.digest


def _assert_failure(run: Run, code: int, *needles: str, store: PrivateS3) -> None:
    assert run.returncode == code, run.output[-3000:]
    assert run.termination.startswith("kiln-train: "), run.termination
    for n in needles:
        assert n in run.termination, (n, run.termination)
    for secret in (store.settings.secret_access_key, store.settings.access_key_id):
        assert secret not in run.output and secret not in run.termination


def test_wrong_credentials_exit_2_naming_the_bucket(tmp_path: Path, run_inprocess, store: PrivateS3):
    env = s3_env(tmp_path, "creds", extra={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    run = run_inprocess(env)
    _assert_failure(run, 2, "AccessDenied", f"s3://{BUCKET}/models/digits/creds", store=store)
    assert "not-the-secret" not in run.output + run.termination


def test_missing_bucket_exit_2(tmp_path: Path, run_inprocess, store: PrivateS3):
    run = run_inprocess(s3_env(tmp_path, "nob", root="s3://no-such-bucket/models"))
    _assert_failure(run, 2, "BucketNotFound", "'no-such-bucket'", store=store)


def test_missing_dataset_object_exit_2(tmp_path: Path, run_inprocess, store: PrivateS3):
    dataset = {"uri": f"s3://{BUCKET}/data/missing.csv", "labelColumn": "y"}
    run = run_inprocess(s3_env(tmp_path, "nods", dataset=dataset))
    _assert_failure(run, 2, "ObjectNotFound", f"s3://{BUCKET}/data/missing.csv", store=store)


def test_store_unavailable_exits_1_so_the_gang_restart_retries(
    tmp_path: Path, run_inprocess, store: PrivateS3
):
    store.stop()
    run = run_inprocess(s3_env(tmp_path, "down", extra={"KILN_S3_MAX_ATTEMPTS": "2"}))
    _assert_failure(
        run,
        1,
        "object store unavailable",
        "StoreUnavailable",
        f"s3://{BUCKET}/models/digits/down",
        store=store,
    )
