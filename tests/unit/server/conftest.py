"""Fixtures for the model server tests: a real digits artifact and servers on free ports.

The artifact is made here (not with ``kiln.trainer``): an MLP trained for a few hundred full-batch
Adam steps on scikit-learn's bundled 8x8 digits, saved with safetensors, plus the config.json and
metadata.json of ``kiln.artifact``. torch is imported lazily so that collecting this directory
without torch only skips its tests.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # numpy and torch come with the serve extra; tests without it are skipped
    import numpy as np

MODEL_NAME = "digits"
MODEL_VERSION = "3"


@dataclass(frozen=True)
class DigitsArtifact:
    """An artifact directory and the held-out data to check it with."""

    path: Path
    digest: str
    x_test: np.ndarray  # float32 (n, 64)
    y_test: np.ndarray  # int64 (n,)
    logits_test: np.ndarray  # in-process logits of x_test (float32)

    @property
    def predictions(self) -> np.ndarray:
        """In-process predicted classes of ``x_test``."""
        return self.logits_test.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        """In-process accuracy on the held-out rows."""
        return float((self.predictions == self.y_test).mean())


def make_digits_artifact(directory: Path, *, steps: int = 300, seed: int = 0) -> DigitsArtifact:
    """Train a small MLP on the digits and write a complete artifact into ``directory``."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from kiln.artifact import (
        CONFIG_FILE,
        METADATA_FILE,
        WEIGHTS_FILE,
        ArtifactMetadata,
        DatasetInfo,
        ModelConfig,
        sha256_file,
        utc_now_rfc3339,
    )
    from kiln.nn import build_model

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    train, test = order[:1400], order[1400:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std < 1e-3, 1.0, std)
    config = ModelConfig(
        inputSize=64,
        hiddenSizes=[64, 32],
        numClasses=10,
        inputMean=[float(v) for v in mean],
        inputStd=[float(v) for v in std],
        labels=[str(i) for i in range(10)],
    )
    torch.set_num_threads(1)  # tiny model: extra threads only contend (the server uses 1 too)
    torch.manual_seed(seed)
    model = build_model(config)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train]).long()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(x[test])).numpy()

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    digest = sha256_file(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    meta = ArtifactMetadata(
        modelName=MODEL_NAME,
        weightsDigest=digest,
        metrics={"accuracy": float((logits.argmax(1) == y[test]).mean())},
        hyperparameters={"steps": steps, "lr": 0.01},
        dataset=DatasetInfo(name="digits", digest="sha256:" + "0" * 64, numSamples=len(train)),
        createdAt=utc_now_rfc3339(),
        framework={"torch": torch.__version__},
    )
    (directory / METADATA_FILE).write_text(meta.model_dump_json(indent=2))
    return DigitsArtifact(directory, digest, x[test], y[test].astype(np.int64), logits)


@pytest.fixture(scope="session")
def digits_artifact(tmp_path_factory: pytest.TempPathFactory) -> DigitsArtifact:
    """A trained digits artifact shared by the whole session (read-only: copy it to modify)."""
    return make_digits_artifact(tmp_path_factory.mktemp("artifact") / "digits-v3")


@pytest.fixture(scope="session")
def loaded_model(digits_artifact: DigitsArtifact) -> Any:
    """The artifact loaded by the server's own loader."""
    from kiln.server.model import configure_torch, load_model

    configure_torch(1)
    return load_model(digits_artifact.path, digits_artifact.digest, name=MODEL_NAME, version=MODEL_VERSION)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """An ``InferenceServer`` running on its own event loop in a background thread."""

    def __init__(self, model: Any, profile_dir: Any = None, **overrides: Any) -> None:
        from kiln.server.app import InferenceServer
        from kiln.server.settings import ServerSettings

        settings = ServerSettings(
            artifact="unused",
            digest=model.digest,
            model_name=model.name,
            model_version=model.version,
            host="127.0.0.1",
            port=0,
            grpc_port=0,
            metrics_port=0,
            max_request_bytes=256 * 1024,
            drain_timeout_seconds=5.0,
        )
        self.settings = replace(settings, **overrides)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kiln-test-server", daemon=True)
        self._thread.start()
        self.server = InferenceServer(model, self.settings, profile_dir=profile_dir)
        self.run(self.server.start())
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.metrics_url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        self.grpc_target = f"127.0.0.1:{self.server.grpc_port}"

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Drain, stop and join the loop thread."""
        try:
            self.run(self.server.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def make_server(loaded_model: Any) -> Iterator[Callable[..., ThreadedServer]]:
    """Factory: start a server with settings overrides; all are shut down after the test."""
    servers: list[ThreadedServer] = []

    def make(**overrides: Any) -> ThreadedServer:
        s = ThreadedServer(loaded_model, **overrides)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def server(loaded_model: Any) -> Iterator[ThreadedServer]:
    """One default server shared by a test module."""
    s = ThreadedServer(loaded_model)
    yield s
    s.close()
