#!/usr/bin/env python3
"""A small convolutional network on scikit-learn's 8x8 digits, trained with PyTorch DDP and
handed to Kiln with ``kiln.sdk``: an example of bringing your own training script.

It is written the way a PyTorch user writes a script for Kubeflow's PyTorchJob (process group
from ``env://``, ``DistributedSampler``, ``DistributedDataParallel``), and runs unchanged

- under torchrun (``command: [torchrun, /opt/kiln/examples/cnn/train.py]``): torchrun reads the
  pod's ``PET_*`` variables and sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... per worker;
- as a plain process (``command: [python, /opt/kiln/examples/cnn/train.py]``): one process per
  pod, with the ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` the pod gets;
- alone, without any of these (a laptop): a world of one, no process group.

Backend: gloo on CPU, NCCL on GPUs (one per process, ``LOCAL_RANK``). Rank 0 evaluates nothing
alone: every rank scores its share of the held-out images and the counts are summed. After the
last collective operation, rank 0 exports the network (``--format torch-export`` or ``onnx``)
with its arg-max as a second output, records the test accuracy, and publishes the artifact
(``kiln.sdk.publish``: uploaded to the TrainingJob's output, and the result the operator
registers as a new version of the Model). See examples/cnn/README.md and docs/byom.md.

Locally: ``KILN_OUTPUT_URI=file://$PWD/_out/artifacts python examples/cnn/train.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import kiln.sdk as kiln
from kiln.artifact import DatasetInfo

#: The held-out split: fixed, so every run (and whoever checks the served model) scores the same images.
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: images float32 ``[n, 1, 8, 8]`` in [0, 1], labels int64.

    scikit-learn's copy of the UCI handwritten digits (1797 images, 8x8 pixels of 0..16),
    shipped inside the package: nothing is downloaded. Stratified split, ``SPLIT_SEED``.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return x_train, y_train, x_test, y_test


class DigitsCNN(nn.Module):
    """``[n, 1, 8, 8]`` images -> ``[n, 10]`` logits: two 3x3 convolutions, a 2x2 max-pool, two
    linear layers (about 40k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


class WithPrediction(nn.Module):
    """What is exported: the logits and their arg-max, so clients get the class from the server."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(image)
        return logits, logits.argmax(dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["torch-export", "onnx"], default="torch-export")
    return p.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """Join the process group when launched distributed (``WORLD_SIZE`` set): ``(rank, world, device)``."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not distributed:
        return 0, 1, device
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def train(args: argparse.Namespace) -> None:
    rank, world, device = setup()
    distributed = world > 1
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data()
    train_set = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    net = DigitsCNN().to(device)
    model: nn.Module = DistributedDataParallel(net) if distributed else net
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    print(f"rank {rank} of {world} on {device}: {len(loader)} batches per epoch", flush=True)
    t0 = time.monotonic()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle per epoch, the same on every rank
        model.train()
        total = torch.zeros(2, device=device)  # loss sum, samples
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
            total += torch.stack([loss.detach() * len(y), torch.tensor(float(len(y)), device=device)])
        if distributed:
            dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} loss {total[0].item() / total[1].item():.4f}", flush=True)

    # Every rank scores its share of the held-out images; the counts are summed.
    model.eval()
    mine = slice(rank, None, world)
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test[mine]).to(device)).argmax(dim=1).cpu()
    correct = (predicted == torch.from_numpy(y_test[mine])).sum()
    counts = torch.tensor([float(correct), float(len(predicted))], device=device)
    if distributed:
        dist.all_reduce(counts)
        dist.destroy_process_group()  # the last collective operation is behind us
    accuracy = counts[0].item() / counts[1].item()

    if kiln.is_main_process():
        print(
            f"trained in {time.monotonic() - t0:.1f}s; test accuracy {accuracy:.4f} on {int(counts[1])} images"
        )
        kiln.report_metrics(accuracy=accuracy)
        digits = load_digits()
        lineage = DatasetInfo(
            name="sklearn-digits",
            digest="sha256:" + hashlib.sha256(digits.data.astype(np.float64).tobytes()).hexdigest(),
            numSamples=len(digits.target),
        )
        path = kiln.save_model(
            WithPrediction(net.to("cpu")),  # served on CPU
            (torch.from_numpy(x_test[:2]),),
            kiln.output_dir(),
            format=args.format,
            input_names=["image"],
            output_names=["logits", "predicted_class"],
            hyperparameters={k: v for k, v in vars(args).items() if k != "format"} | {"worldSize": world},
            dataset=lineage,
        )
        kiln.publish(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except Exception as e:
        kiln.report_failure(f"{type(e).__name__}: {e}")  # the TrainingJob's lastFailure (rank 0)
        raise


if __name__ == "__main__":
    main()
