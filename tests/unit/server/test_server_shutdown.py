"""Graceful shutdown of a real kiln-serve process on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("torch")

from .conftest import MODEL_NAME, DigitsArtifact, free_port

pytestmark = pytest.mark.torch


class Proc:
    """A kiln-serve subprocess on free ports."""

    def __init__(self, artifact: DigitsArtifact, log: Path, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {
            **os.environ,
            "KILN_ARTIFACT_URI": artifact.path.as_uri(),
            "KILN_ARTIFACT_DIGEST": artifact.digest,
            "KILN_MODEL_NAME": MODEL_NAME,
            "KILN_HOST": "127.0.0.1",
            "KILN_PORT": str(self.port),
            "KILN_METRICS_PORT": str(self.metrics_port),
        }
        with open(log, "wb") as out:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "kiln.server", *args], env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.p.poll() is None, self.output()
            try:
                if requests.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise AssertionError("server did not become ready:\n" + self.output())

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def inflight(self) -> float:
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        for line in text.splitlines():
            if line.startswith("kiln_inference_inflight_requests{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no inflight gauge")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


def _start_slow_request(proc: Proc, body: bytes) -> tuple[socket.socket, bytes]:
    """Send the headers and half the body of an infer request; return the socket and the rest."""
    head = (
        f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    half = len(body) // 2
    sock.sendall(head + body[:half])
    deadline = time.monotonic() + 10
    while proc.inflight() < 1:  # the handler has started and is reading the body
        assert time.monotonic() < deadline, "request never became in-flight"
        time.sleep(0.02)
    return sock, body[half:]


def _read_response(sock: socket.socket) -> tuple[int, dict]:  # type: ignore[type-arg]
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(rest) >= length:
                return int(head.split(b" ")[1]), json.loads(rest[:length])
    raise AssertionError(f"connection closed before a full response: {data!r}")


def test_sigterm_turns_unready_then_drains_in_flight_requests(
    digits_artifact: DigitsArtifact, tmp_path: Path, procs: list[Proc]
) -> None:
    proc = Proc(
        digits_artifact,
        tmp_path / "serve.log",
        "--shutdown-delay-seconds",
        "1",
        "--drain-timeout-seconds",
        "20",
    )
    procs.append(proc)
    rows = digits_artifact.x_test[:3]
    body = json.dumps(
        {
            "id": "slow",
            "inputs": [
                {"name": "input-0", "shape": [3, 64], "datatype": "FP32", "data": rows.ravel().tolist()}
            ],
        }
    ).encode()
    sock, rest = _start_slow_request(proc, body)

    proc.p.send_signal(signal.SIGTERM)
    # Readiness drops at once; during the shutdown delay the listener stays open, liveness stays
    # and new requests are still served while endpoints catch up.
    deadline = time.monotonic() + 2.0
    while (r := requests.get(proc.url + "/v2/health/ready", timeout=2)).status_code == 200:
        assert time.monotonic() < deadline, "readiness did not turn false"
        time.sleep(0.01)
    assert (r.status_code, r.json()) == (503, {"ready": False})
    assert requests.get(proc.url + "/v2/health/live", timeout=2).status_code == 200
    # After the delay the listener closes, while the slow request is still open.
    deadline = time.monotonic() + 20
    while True:
        try:
            requests.get(proc.url + "/v2/health/live", timeout=2)
        except requests.ConnectionError:
            break
        assert time.monotonic() < deadline, "the listener never closed"
        time.sleep(0.05)
    assert proc.p.poll() is None, "exited with a request in flight"

    sock.sendall(rest)
    status, doc = _read_response(sock)
    sock.close()
    assert status == 200 and doc["id"] == "slow"
    assert doc["outputs"][1]["data"] == digits_artifact.predictions[:3].tolist()
    assert proc.p.wait(15) == 0
    out = proc.output()
    assert "readiness is now false" in out and "shut down" in out and "drain timed out" not in out


def test_drain_timeout_bounds_shutdown(make_server: Any) -> None:
    """A request that never completes does not hold shutdown past the drain timeout."""
    s = make_server(drain_timeout_seconds=0.5)
    sock = socket.create_connection(("127.0.0.1", s.server.port), timeout=10)
    sock.sendall(
        f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode()
    )
    deadline = time.monotonic() + 10
    labels = {"model": MODEL_NAME, "version": s.settings.model_version}
    while (s.server.metrics.registry.get_sample_value("kiln_inference_inflight_requests", labels) or 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t = time.monotonic()
    assert s.run(s.server.shutdown()) is False  # drained=False: the request was cut off
    assert time.monotonic() - t < 5
    sock.close()
