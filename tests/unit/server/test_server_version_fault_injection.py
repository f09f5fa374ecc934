"""FAULT INJECTION carried by a version: an artifact with ``servingFaultInjectionFailRate`` in its
weights header (a deliberately broken version for canary-rollback drills)."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("torch")  # the serve extra

import numpy as np
from safetensors.torch import load_file, save_file

from kiln.artifact import (
    FAULT_INJECTION_FAIL_RATE_KEY,
    METADATA_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    fault_injection_fail_rate,
    read_weights_metadata,
    sha256_file,
)
from kiln.server.__main__ import main as serve_main
from kiln.server.model import load_model

from .conftest import MODEL_NAME, MODEL_VERSION, DigitsArtifact, ThreadedServer
from .test_server_http import INFER, infer_body, metric_samples, sample

pytestmark = pytest.mark.torch


def broken_copy(src: DigitsArtifact, dest: Path, rate: str) -> str:
    """Copy the artifact, rewriting the weights with ``servingFaultInjectionFailRate: rate`` in
    the safetensors header (as the trainer writes it); returns the new digest."""
    shutil.copytree(src.path, dest)
    weights = dest / WEIGHTS_FILE
    save_file(load_file(str(weights)), str(weights), metadata={FAULT_INJECTION_FAIL_RATE_KEY: rate})
    digest = sha256_file(weights)
    meta = json.loads((dest / METADATA_FILE).read_text())
    meta["weightsDigest"] = digest
    try:
        recorded: Any = float(rate) if math.isfinite(float(rate)) else rate
    except ValueError:
        recorded = rate
    meta["hyperparameters"][FAULT_INJECTION_FAIL_RATE_KEY] = recorded
    (dest / METADATA_FILE).write_text(json.dumps(meta))
    return digest


@pytest.fixture(scope="module")
def broken(digits_artifact: DigitsArtifact, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the digits artifact carrying a fault-injection rate of 0.3."""
    dest = tmp_path_factory.mktemp("broken") / "digits-v4"
    return dest, broken_copy(digits_artifact, dest, "0.3")


def test_the_rate_is_in_the_digest_covered_weights_file(broken: tuple[Path, str], digits_artifact) -> None:
    path, digest = broken
    assert read_weights_metadata(path / WEIGHTS_FILE) == {FAULT_INJECTION_FAIL_RATE_KEY: "0.3"}
    assert fault_injection_fail_rate(path) == 0.3
    assert fault_injection_fail_rate(digits_artifact.path) == 0.0  # a normal artifact has none
    assert digest != digits_artifact.digest  # the weights' bytes changed with the header
    # Removing it means rewriting the weights: the expected digest no longer matches.
    with pytest.raises(ArtifactError, match="digest"):
        load_model(path, digits_artifact.digest, name=MODEL_NAME, version=MODEL_VERSION)


def test_loaded_version_fails_at_its_rate_and_says_so(
    broken: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    path, digest = broken
    with caplog.at_level(logging.WARNING, logger="kiln.server"):
        model = load_model(path, digest, name=MODEL_NAME, version=MODEL_VERSION)
    assert model.fault_injection_fail_rate == 0.3
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert (
        "FAULT INJECTION" in warning and FAULT_INJECTION_FAIL_RATE_KEY in warning and "ON PURPOSE" in warning
    )

    s = ThreadedServer(model, fail_rate=0.1)  # the server's own rate is lower: the artifact's wins
    try:
        assert s.server.core.fail_rate == 0.3
        s.server.core._random = random.Random(0)  # a fixed sequence: the count below is exact
        rows = np.zeros((1, 64), dtype=np.float32)
        with requests.Session() as http:
            answers = [http.post(s.url + INFER, json=infer_body(rows), timeout=5) for _ in range(400)]
        codes = [r.status_code for r in answers]
        assert set(codes) == {200, 500}
        share = codes.count(500) / len(codes)
        assert 0.24 < share < 0.36, share  # 0.3 +- 4 standard deviations of 400 draws
        error = next(r for r in answers if r.status_code == 500).json()["error"]
        assert "injected failure" in error and "servingFaultInjectionFailRate 0.3" in error
        m = metric_samples(s)
        assert sample(m, "kiln_inference_fault_injection_rate") == 0.3
        assert sample(m, "kiln_inference_injected_failures_total") == codes.count(500)
        assert sample(m, "kiln_inference_requests_total", protocol="rest", code="500") == codes.count(500)
        assert sample(m, "kiln_model_info", digest=digest) == 1
    finally:
        s.close()


def test_a_higher_server_rate_wins(broken: tuple[Path, str], make_server: Any, loaded_model: Any) -> None:
    path, digest = broken
    model = load_model(path, digest, name=MODEL_NAME, version=MODEL_VERSION)
    s = ThreadedServer(model, fail_rate=1.0)
    try:
        assert s.server.core.fail_rate == 1.0
        r = requests.post(s.url + INFER, json=infer_body(np.zeros((1, 64))), timeout=5)
        assert r.status_code == 500
        assert sample(metric_samples(s), "kiln_inference_fault_injection_rate") == 1.0
    finally:
        s.close()
    # and a normal artifact with no server rate injects nothing
    plain = make_server()
    assert loaded_model.fault_injection_fail_rate == 0.0 and plain.server.core.fail_rate == 0.0


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "nan", "inf", "often"])
def test_an_invalid_rate_refuses_the_artifact(
    digits_artifact: DigitsArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    path = tmp_path / "bad"
    digest = broken_copy(digits_artifact, path, bad)
    with pytest.raises(
        ArtifactError, match=f"{FAULT_INJECTION_FAIL_RATE_KEY} in {WEIGHTS_FILE} must be a number"
    ):
        load_model(path, digest, name=MODEL_NAME, version=MODEL_VERSION)
    # kiln-serve refuses to serve it (exit status 1) before binding any port
    argv = ["--artifact", str(path), "--digest", digest, "--model-name", MODEL_NAME, "--port", "0"]
    assert serve_main(argv, {}) == 1
    assert "refusing to serve" in capsys.readouterr().err
