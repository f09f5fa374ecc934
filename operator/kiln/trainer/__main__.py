"""``kiln-train``: the trainer entrypoint (``python -m kiln.trainer`` works too).

Sequence on every rank: resolve configuration -> load and split the data set -> join the process
group -> rank 0 decides the plan (already done? resume from which checkpoint?) and broadcasts it
-> train -> evaluate on the test split -> leave the group -> rank 0 writes the artifact and the
termination message, then removes the checkpoints.

With an ``s3://`` output (``KILN_OUTPUT_URI``) the pod has no output volume: rank 0 assembles the
artifact and each checkpoint under ``KILN_STAGING_DIR`` and uploads them (``kiln.storage``), and
after a gang restart it resumes from the newest checkpoint in the bucket; an ``s3://`` dataset is
downloaded there first (every rank).

Exit codes: 0 success (also when the artifact of this run already exists: the result is reported
again, so a restart after a late crash is harmless), 1 crash or internal error, or an object store
still unavailable after botocore's retries (``StoreUnavailable``: the gang restart retries it),
2 bad input, including an object store that answers no such bucket, no such object or access
denied (``kiln.storage.StorageError``; the termination message names bucket, key and cause).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kiln
from kiln import storage
from kiln.artifact import (
    FAULT_INJECTION_FAIL_RATE_KEY,
    METADATA_FILE,
    ArtifactError,
    ArtifactMetadata,
    DatasetInfo,
    ModelConfig,
    TrainingResult,
    fault_injection_weights_metadata,
    format_termination_message,
    path_to_uri,
    utc_now_rfc3339,
    verify_artifact,
)
from kiln.monitoring.profile import PROFILE_FILE
from kiln.storage import StorageError
from kiln.trainer.config import TrainConfig, UsageError, resolve_config, termination_log_from_env
from kiln.trainer.output import write_failure_message

if TYPE_CHECKING:  # torch-importing modules are loaded lazily, after configuration
    import torch

    from kiln.trainer.checkpoint import CheckpointMirror
    from kiln.trainer.loop import FitResult

log = logging.getLogger("kiln.trainer")

#: Hyperparameter keys of the lineage record that do not make two runs different.
_NOT_IDENTITY = ("worldSize", "precision")


def setup_logging(rank: int) -> None:
    """Log to stdout (``kubectl logs``): INFO on rank 0, warnings and errors elsewhere."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s kiln-train rank={rank} %(message)s"))
    logger = logging.getLogger("kiln.trainer")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def lineage_hyperparameters(config: TrainConfig, precision: str, world_size: int) -> dict[str, Any]:
    """Hyperparameters as recorded in the artifact: resolved values plus world size.

    ``servingFaultInjectionFailRate`` appears only when set (> 0): normal artifacts do not
    mention fault injection at all.
    """
    hp = config.hyperparameters
    d = hp.model_dump(mode="json")
    if not hp.servingFaultInjectionFailRate:
        d.pop(FAULT_INJECTION_FAIL_RATE_KEY)
    d["splitSeed"] = hp.effective_split_seed
    d["precision"] = precision
    d["worldSize"] = world_size
    return d


def _identity(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _NOT_IDENTITY}


def _remove_checkpoints(root: Path, default_location: bool) -> None:
    from kiln.trainer.checkpoint import list_checkpoints

    for _, p in list_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
    if default_location:
        for d in (root, root.parent):  # <model>/.checkpoints/<run>, then <model>/.checkpoints
            try:
                d.rmdir()
            except OSError:
                break


def run(config: TrainConfig) -> int:
    """Train according to ``config``; returns the exit code.

    Raises:
        UsageError: bad data set or configuration (exit code 2 in ``main``).
        CheckpointError, OSError, RuntimeError: crashes (exit code 1 in ``main``).
    """
    import torch

    from kiln.trainer.checkpoint import CheckpointMirror
    from kiln.trainer.data import load_dataset, normalisation, stratified_split
    from kiln.trainer.distributed import setup_distributed
    from kiln.trainer.loop import SplitTensors, config_fingerprint, evaluate, fit, resolve_precision
    from kiln.trainer.output import (
        run_timestamp,
        write_termination_message,
    )

    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    hp = config.hyperparameters
    rank_hint = int(os.environ.get("RANK", "0") or 0)
    if rank_hint == 0:
        for w in config.warnings:
            log.warning("%s", w)

    dataset = load_dataset(config.dataset, config.staging_dir)
    split = stratified_split(
        dataset.labels,
        seed=hp.effective_split_seed,
        validation_fraction=hp.validationFraction,
        test_fraction=hp.testFraction,
    )
    fingerprint = config_fingerprint(hp, dataset.digest)

    ctx = setup_distributed(config.backend, config.device)
    stack = contextlib.ExitStack()
    try:
        precision = resolve_precision(hp.precision, ctx.device)
        lineage = lineage_hyperparameters(config, precision, ctx.world_size)
        plan: dict[str, Any] = {}
        if ctx.is_main:
            plan = _plan(config, dataset.digest, lineage, fingerprint, run_timestamp())
        plan = ctx.broadcast_object(plan)
        if plan.get("usage_error"):
            raise UsageError(plan["usage_error"])
        if plan.get("storage_error"):
            raise StorageError(*plan["storage_error"])
        if plan.get("error"):
            raise RuntimeError(plan["error"])
        if plan.get("done"):
            if ctx.is_main:
                log.info("artifact %s of this run already exists; reporting it again", plan["artifact_uri"])
                write_termination_message(
                    config.termination_log, plan["result"], config.termination_log_explicit
                )
                print(plan["result"], flush=True)
            return 0
        ckpt_root = Path(plan["checkpoint_root"])
        mirror = (
            CheckpointMirror(storage.parse(plan["checkpoint_remote"])) if plan["checkpoint_remote"] else None
        )

        if ctx.is_main:
            log.info(
                "dataset=%s samples=%d features=%d classes=%d digest=%s split train/val/test=%d/%d/%d",
                dataset.name,
                dataset.num_samples,
                dataset.num_features,
                dataset.num_classes,
                dataset.digest,
                len(split.train),
                len(split.validation),
                len(split.test),
            )
            log.info(
                "world_size=%d backend=%s device=%s precision=%s hyperparameters=%s",
                ctx.world_size,
                ctx.backend or "none",
                ctx.device,
                precision,
                hp.model_dump(mode="json"),
            )
        mean, std = normalisation(dataset.features[split.train])
        model_config = ModelConfig(
            inputSize=dataset.num_features,
            hiddenSizes=list(hp.hiddenSizes),
            numClasses=dataset.num_classes,
            dropout=hp.dropout,
            inputMean=mean,
            inputStd=std,
            labels=dataset.class_names,
        )

        def tensors(idx: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.from_numpy(dataset.features[idx]).to(ctx.device),
                torch.from_numpy(dataset.labels[idx]).to(ctx.device),
            )

        data = SplitTensors(*tensors(split.train), *tensors(split.validation), *tensors(split.test))
        resume = plan.get("resume")
        if resume is not None:
            resume = _share_checkpoint(ctx, Path(resume), stack)
        result = fit(
            ctx,
            hp,
            data,
            model_config,
            checkpoint_root=ckpt_root,
            keep_checkpoints=config.keep_checkpoints,
            checkpoint_mirror=mirror,
            fingerprint=fingerprint,
            resume_from=Path(resume) if resume is not None else None,
            fail_after_epoch=config.fail_after_epoch,
            fail_rank=config.fail_rank,
        )
        test_loss, test_acc = evaluate(result.model, data.x_test, data.y_test, ctx, result.precision)
        ctx.barrier()
    finally:
        stack.close()
        ctx.close()

    if not ctx.is_main:
        return 0
    profile = _reference_profile(result.model, data.x_train, model_config, dataset.feature_names)
    last = result.history[-1]
    metrics = {
        "accuracy": test_acc,
        "loss": test_loss,
        "valAccuracy": last.val_accuracy,
        "valLoss": last.val_loss,
        "trainLoss": last.train_loss,
    }
    fg = config.dataset.featureGroup
    metadata = ArtifactMetadata(
        modelName=config.model_name,
        weightsDigest="sha256:" + "0" * 64,  # replaced by the digest of the file written
        metrics=metrics,
        hyperparameters=lineage,
        dataset=DatasetInfo(
            name=config.dataset.display_name,
            digest=dataset.digest,
            numSamples=dataset.num_samples,
            featureGroup=fg and f"{fg.namespace}/{fg.name}",
            schemaDigest=fg and fg.schemaDigest,
        ),
        image=config.image,
        trainingJob=config.training_job,
        createdAt=utc_now_rfc3339(),
        framework={"torch": torch.__version__, "kiln": kiln.__version__, "python": platform.python_version()},
    )
    fail_rate = hp.servingFaultInjectionFailRate
    if fail_rate > 0:
        log.warning(
            "FAULT INJECTION: %s=%s: kiln-serve will answer %.1f%% of inference requests to this "
            "artifact with 500 ON PURPOSE (a deliberately broken version for canary-rollback drills); "
            "never promote it to serve real traffic",
            FAULT_INJECTION_FAIL_RATE_KEY,
            fail_rate,
            100 * fail_rate,
        )
    _publish(config, plan, result, model_config, metadata, mirror, profile)
    return 0


def _reference_profile(
    model: torch.nn.Module, x_train: torch.Tensor, config: ModelConfig, feature_names: list[str]
) -> bytes | None:
    """``profile.json`` (kiln.monitoring.profile) of the training split and the model's outputs
    on it, for drift monitoring in kiln-serve; None (logged) when the data cannot be profiled
    (e.g. more features than a profile tracks): the artifact then has no reference."""
    import torch

    from kiln.monitoring.profile import ProfileError, build_profile
    from kiln.trainer.loop import EVAL_BATCH

    model.eval()
    with torch.no_grad():
        logits = [model(x_train[i : i + EVAL_BATCH]).float() for i in range(0, x_train.shape[0], EVAL_BATCH)]
    names = feature_names if len(feature_names) == config.inputSize else None
    try:
        profile = build_profile(
            {config.inputName: x_train}, {config.outputName: torch.cat(logits)}, feature_names=names
        )
    except ProfileError as e:
        log.warning("no reference profile in the artifact (drift monitoring off for it): %s", e)
        return None
    return profile.to_json()


def _publish(
    config: TrainConfig,
    plan: dict[str, Any],
    result: FitResult,
    model_config: ModelConfig,
    metadata: ArtifactMetadata,
    mirror: CheckpointMirror | None,
    profile: bytes | None = None,
) -> None:
    """Rank 0 after training: write the artifact (and upload it for an ``s3://`` output), write
    the termination message, then remove the run's checkpoints (locally and in the bucket).

    ``mirror`` is the bucket copy of the checkpoints (None without an ``s3://`` output);
    ``profile`` the reference profile written as ``profile.json`` (None: none).

    Raises:
        OSError: the artifact cannot be written locally (FileExistsError: it exists).
        kiln.storage.StorageError: the upload failed.
    """
    from kiln.trainer.output import publish_artifact, write_artifact, write_termination_message

    final_dir = Path(plan["artifact_dir"])
    if config.output_remote is not None:
        shutil.rmtree(final_dir, ignore_errors=True)  # staging leftovers of an interrupted upload
    written = write_artifact(
        final_dir,
        result.model.state_dict(),
        model_config,
        metadata,
        weights_metadata=fault_injection_weights_metadata(
            config.hyperparameters.servingFaultInjectionFailRate
        ),
        extra_files={PROFILE_FILE: profile} if profile is not None else None,
    )
    if config.output_remote is not None:
        publish_artifact(final_dir, storage.parse(plan["artifact_uri"]))
    metrics = metadata.metrics
    message = format_termination_message(
        TrainingResult(artifactUri=plan["artifact_uri"], digest=written.weightsDigest, metrics=metrics)
    )
    write_termination_message(config.termination_log, message, config.termination_log_explicit)
    print(message, flush=True)
    log.info(
        "result accuracy=%.4f loss=%.4f val_accuracy=%.4f resumedFromEpoch=%s artifact=%s digest=%s",
        metrics["accuracy"],
        metrics["loss"],
        metrics["valAccuracy"],
        result.resumed_from_epoch,
        plan["artifact_uri"],
        written.weightsDigest,
    )
    _remove_checkpoints(Path(plan["checkpoint_root"]), default_location=config.checkpoint_dir is None)
    if mirror is not None:
        try:
            mirror.delete_all()
        except StorageError as e:  # the result stands; stale checkpoints only cost space
            log.warning("could not delete the checkpoints in %s: %s", mirror.remote, e)


def _share_checkpoint(ctx: Any, path: Path, stack: contextlib.ExitStack) -> Path:
    """The checkpoint ``path`` chosen by rank 0, readable on this rank.

    With a volume shared by all nodes every rank reads ``path`` itself. When some rank cannot see
    it (node-local storage such as hostPath, or an ``s3://`` output: rank 0 downloaded the
    checkpoint from the bucket into its own staging directory), rank 0 sends the checkpoint's
    files as bytes over the process group and that rank loads them from a private temporary
    directory, through the same safetensors/JSON loader (no pickle on disk).
    """
    import torch

    missing = torch.tensor([0.0 if path.is_dir() else 1.0], device=ctx.device)
    ctx.all_reduce_sum(missing)
    if missing.item() == 0:
        return path
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()} if ctx.is_main else None
    files = ctx.broadcast_object(files)
    if path.is_dir():
        return path
    local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-ckpt-"))) / path.name
    local.mkdir()
    for name, data in files.items():
        (local / name).write_bytes(data)
    log.warning(
        "rank %d cannot see checkpoint %s (not on a volume shared by all nodes); received it from rank 0",
        ctx.rank,
        path,
    )
    return local


def _plan(
    config: TrainConfig, dataset_digest: str, lineage: dict[str, Any], fingerprint: str, timestamp: str
) -> dict[str, Any]:
    """Rank 0's decisions, broadcast to all ranks (plain values only).

    Keys: ``artifact_dir`` (local directory the artifact is assembled in), ``artifact_uri``
    (where it is published and reported: ``file://`` of ``artifact_dir``, or the ``s3://``
    prefix), ``checkpoint_root`` (local) and ``checkpoint_remote`` (``s3://`` prefix or None),
    ``done`` + ``result`` (the artifact already exists for this configuration), ``resume``
    (local checkpoint path or None; downloaded from the bucket when it came from there),
    ``usage_error`` / ``error`` (message: every rank raises it), ``storage_error``
    (``[reason, message]``: every rank raises ``StorageError``).
    """
    from kiln.trainer.checkpoint import CheckpointMirror, find_resumable
    from kiln.trainer.output import artifact_dir, default_checkpoint_root

    run_name = config.training_job or timestamp
    final = artifact_dir(config.output_root, config.model_name, run_name)
    ckpt_root = config.checkpoint_dir or default_checkpoint_root(
        config.output_root, config.model_name, run_name
    )
    remote = config.output_remote
    published = remote.join(config.model_name, run_name) if remote else None
    mirror = CheckpointMirror(remote.join(config.model_name, ".checkpoints", run_name)) if remote else None
    plan: dict[str, Any] = {
        "artifact_dir": str(final),
        "artifact_uri": published.uri if published else path_to_uri(final),
        "checkpoint_root": str(ckpt_root),
        "checkpoint_remote": mirror.remote.uri if mirror else None,
        "resume": None,
    }
    where = f"artifact {published}" if published else f"artifact directory {final}"
    try:
        meta = _existing_artifact(final, published)
        if meta is not None:
            same = (
                meta.dataset is not None
                and meta.dataset.digest == dataset_digest
                and _identity(meta.hyperparameters) == _identity(lineage)
            )
            if not same:
                plan["usage_error"] = (
                    f"{where} already exists and was trained with a different "
                    "dataset or hyperparameters; artifacts are immutable: use a new TrainingJob name"
                )
                return plan
            plan["done"] = True
            plan["result"] = format_termination_message(
                TrainingResult(
                    artifactUri=plan["artifact_uri"], digest=meta.weightsDigest, metrics=meta.metrics
                )
            )
            return plan
        found = find_resumable(ckpt_root, fingerprint, mirror)
        if found is not None:
            plan["resume"] = str(found[1])
    except StorageError as e:
        plan["storage_error"] = [e.reason, str(e)]
    except ArtifactError as e:
        plan["error"] = f"{where} exists but is not a valid artifact: {e}"
    except OSError as e:
        plan["error"] = f"cannot inspect the output directory: {e}"
    return plan


def _existing_artifact(final: Path, published: storage.Location | None) -> ArtifactMetadata | None:
    """The verified metadata of the artifact already at the target, or None when there is none.

    Local: the directory ``final`` exists. ``s3://``: ``published`` has its ``metadata.json``
    (the completeness marker; objects of an interrupted upload without it do not count).

    Raises:
        kiln.storage.StorageError: the store cannot be read.
        ArtifactError: something is there but it does not verify.
    """
    if published is None:
        return verify_artifact(final) if final.exists() else None
    if not storage.exists(published.join(METADATA_FILE)):
        return None
    return storage.verify_artifact_at(published)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entrypoint; returns the process exit code (0, 1 or 2)."""
    term_path, term_explicit = termination_log_from_env()
    rank = os.environ.get("RANK", "0") or "0"
    setup_logging(int(rank) if rank.isdigit() else 0)
    try:
        config = resolve_config(argv)
        term_path, term_explicit = config.termination_log, config.termination_log_explicit
        return run(config)
    except UsageError as e:
        print(f"kiln-train: error: {e}", file=sys.stderr, flush=True)
        write_failure_message(term_path, f"error (rank {rank}): {e}", term_explicit)
        return 2
    except StorageError as e:  # messages name bucket/key and cause, never credentials
        what = "object store unavailable" if e.transient else "error"
        print(f"kiln-train: {what}: {e.reason}: {e}", file=sys.stderr, flush=True)
        write_failure_message(term_path, f"{what} (rank {rank}): {e.reason}: {e}", term_explicit)
        return 1 if e.transient else 2
    except Exception as e:
        traceback.print_exc()
        sys.stderr.flush()
        write_failure_message(term_path, f"crashed (rank {rank}): {type(e).__name__}: {e}", term_explicit)
        return 1


if __name__ == "__main__":
    sys.exit(main())
