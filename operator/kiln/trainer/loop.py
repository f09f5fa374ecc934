"""The DDP training loop: sampler, mixed precision, per-epoch validation and checkpoints.

Data sets are small tables held in memory, so each split is one tensor on the compute device
and a batch is an index gather (``x[idx]``) rather than a ``DataLoader`` collating rows one by
one, which would dominate the step time of a small MLP. ``DistributedSampler`` still decides
which rows each rank sees and in which order (shuffled with ``seed + epoch``, padded so every
rank takes the same number of steps, which DDP needs).

Determinism: the model is initialised from ``seed`` (and DDP broadcasts rank 0's weights), and
every epoch reseeds torch's generators from ``(seed, epoch, rank)``, so dropout masks and
shuffles of epoch ``e`` do not depend on whether the run was resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler, TensorDataset

from kiln.artifact import ModelConfig
from kiln.nn import MLPClassifier, build_model
from kiln.trainer.checkpoint import CheckpointError, CheckpointMirror, load_checkpoint, save_checkpoint
from kiln.trainer.config import Hyperparameters, Precision
from kiln.trainer.distributed import DistContext

log = logging.getLogger("kiln.trainer")
EVAL_BATCH = 8192


@dataclass
class SplitTensors:
    """The three splits on the compute device: features ``(n, d)`` float32, labels ``(n,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class EpochStats:
    """What one epoch did (identical on every rank after the all-reduce)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    #: Training samples processed by all ranks (includes the sampler's padding rows).
    samples: int
    #: Wall time of the optimisation steps only (no validation, no checkpoint), seconds.
    train_seconds: float
    #: Wall time of the whole epoch including validation and checkpoint, seconds.
    epoch_seconds: float
    #: CPU time (all threads of this process) of the optimisation steps, seconds.
    train_cpu_seconds: float = 0.0

    @property
    def samples_per_second(self) -> float:
        """Training throughput of all ranks together, samples/s."""
        return self.samples / self.train_seconds if self.train_seconds > 0 else float("nan")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EpochStats:
        """Rebuild from ``dataclasses.asdict`` output (as stored in a checkpoint)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class FitResult:
    """The trained (un-wrapped) model and how training went."""

    model: MLPClassifier
    history: list[EpochStats]
    #: Last epoch restored from a checkpoint, or None for a fresh run.
    resumed_from_epoch: int | None
    precision: str


def _no_buffer_sync_kwargs() -> dict[str, Any]:
    """DDP keyword that stops the per-forward buffer broadcast (the normalisation buffers never
    change; DDP still syncs them from rank 0 at construction). torch >= 2.15 renamed
    ``broadcast_buffers`` to ``forward_sync_buffers`` and warns on the old name."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of torch's generators for (1-based) ``epoch`` on ``rank``: stable across runs."""
    digest = hashlib.sha256(f"kiln:{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def config_fingerprint(hp: Hyperparameters, dataset_digest: str) -> str:
    """Identifies a training configuration; a checkpoint only resumes a run with the same one.

    World size is excluded: the model and optimizer state do not depend on it. So is the
    serving fault-injection rate (``servingFaultInjectionFailRate``), which only goes into the
    artifact written at the end.
    """
    doc = json.dumps(
        {
            "hyperparameters": hp.model_dump(mode="json", exclude={"servingFaultInjectionFailRate"}),
            "dataset": dataset_digest,
        },
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


def resolve_precision(requested: Precision, device: torch.device) -> str:
    """The precision actually used: ``fp32``, ``bf16`` or ``fp16``.

    Mixed precision is only used on GPUs: on CPU every request becomes ``fp32`` (with a warning
    when bf16/fp16 was asked for explicitly). ``auto`` on a GPU is bf16 when supported, else fp16.
    """
    if device.type != "cuda":
        if requested in ("bf16", "fp16"):
            log.warning("precision %s is only used on GPU; training in fp32 on %s", requested, device)
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for bf16/fp16 on the device, a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(hp: Hyperparameters, params: Any) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) from the hyperparameters."""
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.learningRate, weight_decay=hp.weightDecay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.learningRate, weight_decay=hp.weightDecay)
    return torch.optim.SGD(params, lr=hp.learningRate, momentum=hp.momentum, weight_decay=hp.weightDecay)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: DistContext, precision: str = "fp32"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, sharded over the ranks.

    Rank ``r`` scores rows ``r, r + W, r + 2W, ...`` and the sums are all-reduced, so every row
    counts exactly once and all ranks get the same numbers.

    Args:
        x: features ``(n, d)`` on the model's device; y: labels ``(n,)``.
    Returns:
        ``(loss, accuracy)``; loss in nats per sample, accuracy in [0, 1].
    """
    was_training = model.training
    model.eval()
    xs, ys = x[ctx.rank :: ctx.world_size], y[ctx.rank :: ctx.world_size]
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, xs.shape[0], EVAL_BATCH):
        xb, yb = xs[start : start + EVAL_BATCH], ys[start : start + EVAL_BATCH]
        with autocast_context(precision, x.device):
            logits = model(xb)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(dim=1) == yb).sum().double()
    totals = torch.stack(
        [loss_sum, correct, torch.tensor(float(xs.shape[0]), dtype=torch.float64, device=x.device)]
    )
    ctx.all_reduce_sum(totals)
    model.train(was_training)
    loss, acc, n = totals.tolist()
    if n == 0:
        return float("nan"), float("nan")
    return loss / n, acc / n


def _maybe_fail(epoch: int, ctx: DistContext, fail_after_epoch: int | None, fail_rank: int | None) -> None:
    """Fault injection for tests (``KILN_FAIL_AFTER_EPOCH``): crash once the checkpoint is safe."""
    if fail_after_epoch is None or epoch != fail_after_epoch:
        return
    ctx.barrier()  # rank 0 has finished writing the checkpoint of this epoch
    if fail_rank is None or fail_rank == ctx.rank:
        print(
            f"FAULT INJECTION (KILN_FAIL_AFTER_EPOCH={fail_after_epoch}): rank {ctx.rank} exits with code 1 "
            f"after epoch {epoch}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)


def fit(
    ctx: DistContext,
    hp: Hyperparameters,
    data: SplitTensors,
    model_config: ModelConfig,
    *,
    checkpoint_root: Path | None = None,
    keep_checkpoints: int = 2,
    checkpoint_mirror: CheckpointMirror | None = None,
    fingerprint: str = "",
    resume_from: Path | None = None,
    fail_after_epoch: int | None = None,
    fail_rank: int | None = None,
    wrap_ddp: bool | None = None,
) -> FitResult:
    """Train ``hp.epochs`` epochs (continuing after ``resume_from`` when given).

    Every rank calls this with the same arguments. Rank 0 writes a checkpoint to
    ``checkpoint_root`` after every epoch (none when it is None), uploads it to
    ``checkpoint_mirror`` when given (an ``s3://`` output), and logs one line per epoch.

    The model is wrapped in ``DistributedDataParallel`` when ``wrap_ddp`` is True, or (default,
    None) when the process group has more than one rank: with a single process there is nothing
    to all-reduce, and the wrapper's per-step all-reduce and autograd hooks cost ~20% of a small
    model's step time for nothing (hack/bench-trainer measures both).

    Raises:
        CheckpointError: ``resume_from`` cannot be read or does not fit this model.
        kiln.storage.StorageError: a checkpoint upload failed (rank 0).
    """
    device = ctx.device
    seed_everything(hp.seed)
    model = build_model(model_config).to(device)
    optimizer = build_optimizer(hp, model.parameters())
    precision = resolve_precision(hp.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    history: list[EpochStats] = []
    start_epoch = 1
    resumed_from: int | None = None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        try:
            model.load_state_dict(ckpt.model_state, strict=True)
            optimizer.load_state_dict(ckpt.optimizer_state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {resume_from} does not fit this model: {e}") from e
        if scaler is not None and ckpt.scaler_state:
            scaler.load_state_dict(ckpt.scaler_state)
        history = [EpochStats.from_json(h) for h in ckpt.history]
        start_epoch = ckpt.epoch + 1
        resumed_from = ckpt.epoch
        if ctx.is_main:
            log.info(
                "resumed from checkpoint %s: resumedFromEpoch=%d, continuing at epoch %d/%d",
                resume_from,
                ckpt.epoch,
                start_epoch,
                hp.epochs,
            )

    train_module: nn.Module = model
    if wrap_ddp is None:
        wrap_ddp = ctx.distributed and ctx.world_size > 1
    if wrap_ddp:
        train_module = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **_no_buffer_sync_kwargs(),
        )
    sampler: DistributedSampler[Any] = DistributedSampler(
        TensorDataset(data.x_train),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=hp.seed,
        drop_last=False,
    )
    per_rank_batch = max(1, math.ceil(hp.batchSize / ctx.world_size))
    cuda = device.type == "cuda"

    for epoch in range(start_epoch, hp.epochs + 1):
        epoch_start = time.perf_counter()
        torch.manual_seed(epoch_seed(hp.seed, epoch, ctx.rank))
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler), dtype=torch.long, device=device)
        n_local = int(idx.shape[0])
        sizes = torch.tensor(
            [min(per_rank_batch, n_local - s) for s in range(0, n_local, per_rank_batch)],
            dtype=torch.float32,
            device=device,
        )
        losses: list[torch.Tensor] = []
        train_module.train()
        if cuda:
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, n_local, per_rank_batch):
            b = idx[start : start + per_rank_batch]
            xb, yb = data.x_train[b], data.y_train[b]
            with autocast_context(precision, device):
                logits = train_module(xb)
            loss = F.cross_entropy(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            losses.append(loss.detach())
        if cuda:
            torch.cuda.synchronize(device)
        train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0

        loss_sum = (
            (torch.stack(losses) * sizes).sum().double().reshape(1)
            if losses
            else torch.zeros(1, dtype=torch.float64, device=device)
        )
        ctx.all_reduce_sum(loss_sum)
        total = n_local * ctx.world_size
        val_loss, val_acc = evaluate(model, data.x_val, data.y_val, ctx, precision)
        stats = EpochStats(
            epoch=epoch,
            train_loss=float(loss_sum.item()) / max(total, 1),
            val_loss=val_loss,
            val_accuracy=val_acc,
            samples=total,
            train_seconds=train_seconds,
            epoch_seconds=0.0,
            train_cpu_seconds=train_cpu,
        )
        history.append(stats)
        if ctx.is_main and checkpoint_root is not None:
            save_checkpoint(
                checkpoint_root,
                epoch=epoch,
                model_state=model.state_dict(),
                optimizer_state=optimizer.state_dict(),
                scaler_state=scaler.state_dict() if scaler is not None else None,
                history=[asdict(h) for h in history],
                fingerprint=fingerprint,
                keep=keep_checkpoints,
                mirror=checkpoint_mirror,
            )
        stats.epoch_seconds = time.perf_counter() - epoch_start
        if ctx.is_main:
            log.info(
                "epoch %d/%d loss=%.4f val_loss=%.4f val_accuracy=%.4f samples/s=%.0f time=%.3fs",
                epoch,
                hp.epochs,
                stats.train_loss,
                stats.val_loss,
                stats.val_accuracy,
                stats.samples_per_second,
                stats.epoch_seconds,
            )
        _maybe_fail(epoch, ctx, fail_after_epoch, fail_rank)

    return FitResult(model=model, history=history, resumed_from_epoch=resumed_from, precision=precision)
