"""Loading a verified Kiln artifact for inference (the only torch-importing module of the server).

The weights digest is checked against the expected one *before* anything is loaded; weights are
read with ``safetensors.torch.load_file`` (never pickle) into the network rebuilt from
``config.json``, with ``load_state_dict(strict=True)``. The model runs in eval mode under
``torch.inference_mode``.

FAULT INJECTION: an artifact may carry ``servingFaultInjectionFailRate`` in its weights header
(covered by the digest; see ``kiln.artifact``), a deliberately broken version for
canary-rollback drills. It is read here into ``LoadedModel.fault_injection_fail_rate`` and
logged as a warning; the server then fails that fraction of requests on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kiln.artifact import (
    FAULT_INJECTION_FAIL_RATE_KEY,
    WEIGHTS_FILE,
    ArtifactError,
    ArtifactMetadata,
    ModelConfig,
    fault_injection_fail_rate,
    read_config,
    uri_to_path,
    verify_artifact,
)
from kiln.nn import build_model

log = logging.getLogger(__name__)


_thread_state = threading.local()


@dataclass
class LoadedModel:
    """A verified artifact ready for inference.

    ``predict`` may be called from any thread. torch's intra-op thread count is an OpenMP setting
    *of the calling thread*, so each new calling thread (e.g. the server's executor thread) sets it
    to ``threads`` on first use; without that, the executor thread would use every core and
    compute slightly different floats from the main thread.
    """

    name: str
    version: str
    digest: str
    config: ModelConfig
    metadata: ArtifactMetadata
    module: torch.nn.Module
    threads: int = field(default_factory=torch.get_num_threads)
    #: FAULT INJECTION carried by the artifact (its ``servingFaultInjectionFailRate``): the
    #: fraction of requests to fail on purpose; 0.0 for every normal artifact.
    fault_injection_fail_rate: float = 0.0

    def predict(self, rows: np.ndarray) -> np.ndarray:
        """Logits (float32, ``(n, numClasses)``) for float32 rows of shape ``(n, inputSize)``."""
        if getattr(_thread_state, "threads", None) != self.threads:
            torch.set_num_threads(self.threads)
            _thread_state.threads = self.threads
        with torch.inference_mode():
            return self.module(torch.from_numpy(rows)).numpy()


def configure_torch(threads: int) -> None:
    """Set torch's intra-op thread count (for the calling thread) and, if still possible, inter-op."""
    torch.set_num_threads(threads)
    # RuntimeError: already set, or parallel work has started in this process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def load_model(
    artifact: str | Path, digest: str, *, name: str, version: str, threads: int | None = None
) -> LoadedModel:
    """Verify and load an artifact.

    Args:
        artifact: ``file://`` URI or path of the artifact directory.
        digest: the expected ``sha256:<hex>`` of the weights file.
        threads: torch intra-op threads for every thread that calls ``predict`` (default: the
            calling thread's current setting).
    Raises:
        ArtifactError: a file is missing or invalid, the digest does not match, or the weights do
            not fit the architecture in ``config.json``.
    """
    path = uri_to_path(str(artifact))
    if not path.is_dir():
        raise ArtifactError(f"artifact directory {path} does not exist")
    metadata = verify_artifact(path, digest)
    config = read_config(path)
    try:
        module = build_model(config)
    except ValueError as e:
        raise ArtifactError(f"artifact {path}: config.json describes no buildable model: {e}") from e
    try:
        state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"artifact {path}: {WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"artifact {path}: weights do not match config.json: {e}") from e
    fail_rate = fault_injection_fail_rate(path)  # in the weights file's header: digest-checked above
    module.eval()
    model = LoadedModel(
        name,
        version,
        digest,
        config,
        metadata,
        module,
        threads or torch.get_num_threads(),
        fault_injection_fail_rate=fail_rate,
    )
    model.predict(np.zeros((1, config.inputSize), dtype=np.float32))  # warm up
    log.info("loaded artifact %s (%s) as %s version %s", path, digest, name, version)
    if fail_rate > 0:
        log.warning(
            "FAULT INJECTION: artifact %s (model %s version %s) carries %s=%s: this version answers "
            "%.1f%% of inference requests with 500 ON PURPOSE (a deliberately broken version for "
            "canary-rollback drills); it must never serve real traffic",
            path,
            name,
            version,
            FAULT_INJECTION_FAIL_RATE_KEY,
            fail_rate,
            100 * fail_rate,
        )
    return model
