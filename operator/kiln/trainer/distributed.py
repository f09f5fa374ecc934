"""Process group setup: torchrun's environment, or a single process without one.

Under torchrun every worker has ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment; the trainer then joins the group with ``init_method='env://'``.
Without ``WORLD_SIZE`` it runs as a single process (rank 0 of 1) with no process group and no
DDP wrapper. If a process group is already initialised (e.g. by a benchmark harness), it is
reused and left alone at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kiln.trainer.config import Backend, DeviceKind, UsageError


@dataclass
class DistContext:
    """Where this process sits in the job and which device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    #: 'nccl' or 'gloo' when a process group is in use, else None (single process).
    backend: str | None
    #: True when this module created the process group (and so destroys it in ``close``).
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the only rank that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use (also for a group of one)."""
        return self.backend is not None

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.distributed:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (must be a plain, trusted Python value)."""
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``t`` over ranks, in place; returns ``t``."""
        if self.distributed and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def _env_int(env: dict[str, str] | os._Environ[str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UsageError(f"{name} is not set (run under torchrun, or without WORLD_SIZE for one process)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {raw!r}") from None


def resolve_device(kind: DeviceKind, local_rank: int) -> torch.device:
    """The compute device of this process.

    ``auto`` is ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.

    Raises:
        UsageError: ``cuda`` requested without a GPU, or more local processes than GPUs.
    """
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA GPU is available")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UsageError(
            f"LOCAL_RANK {local_rank} has no GPU: only {n} visible on this node; "
            "run at most one process per GPU (numProcPerNode)"
        )
    return torch.device("cuda", local_rank)


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``auto`` is NCCL on GPUs and gloo on CPU.

    Raises:
        UsageError: NCCL requested for a CPU device, or unavailable in this torch build.
    """
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if device.type != "cuda":
            raise UsageError("--backend nccl needs CUDA GPUs; use gloo on CPU")
        if not dist.is_nccl_available():
            raise UsageError("this torch build has no NCCL support")
    elif not dist.is_gloo_available():
        raise UsageError("this torch build has no gloo support")
    return backend


def setup_distributed(
    backend: Backend = "auto", device: DeviceKind = "auto", environ: dict[str, str] | None = None
) -> DistContext:
    """Join torchrun's process group (or run alone) and select the device.

    Raises:
        UsageError: inconsistent torchrun variables, or device/backend choices that cannot work.
    """
    env: dict[str, str] | os._Environ[str] = os.environ if environ is None else environ
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int(env, "LOCAL_RANK", 0)
        dev = resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, local_rank, world, dev, str(dist.get_backend()), owns_group=False)

    if not env.get("WORLD_SIZE"):
        dev = resolve_device(device, 0)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if backend != "auto":
            resolve_backend(backend, dev)  # validate the choice even though no group is needed
        return DistContext(0, 0, 1, dev, None)

    world = _env_int(env, "WORLD_SIZE")
    rank = _env_int(env, "RANK")
    local_rank = _env_int(env, "LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is outside WORLD_SIZE {world}")
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed support")
    dev = resolve_device(device, local_rank)
    be = resolve_backend(backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=be, init_method="env://", rank=rank, world_size=world)
    return DistContext(rank, local_rank, world, dev, be, owns_group=True)
