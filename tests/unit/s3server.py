"""A private versitygw S3 server for tests that need a real object store but no cluster.

Fixture ``private_s3``: a versitygw process of the test's own (``posix`` backend in the test's
temporary directory, loopback port chosen by the OS), started before and stopped after the test.
Its ``aws_env()`` gives the standard ``AWS_*`` variables that ``kiln.storage`` (botocore) reads.

The binary: ``$KILN_VERSITYGW``, else the one ``hack/cluster`` builds and caches
(``~/.cache/kiln/versitygw/<version>/bin/versitygw``), else ``versitygw`` on ``PATH``. Without one
the test is skipped with the reason (under ``CI=true`` it fails instead: CI builds the cluster, so
a missing binary there is a defect, not a reason to skip).

Interim: the same shape as ``private_s3`` in ``tests/s3.py`` (branch s3infra); once that is
merged this module can go and the tests import the shared fixture.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HEALTH_PATH = "/health"


def versitygw_binary() -> str | None:
    """Path of a versitygw binary on this machine, or None (see the module docstring)."""
    explicit = os.environ.get("KILN_VERSITYGW", "").strip()
    if explicit:
        return explicit if Path(explicit).is_file() else None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln" / "versitygw"
    built = sorted(cache.glob("*/bin/versitygw"), key=lambda p: p.stat().st_mtime, reverse=True)
    if built:
        return str(built[0])
    return shutil.which("versitygw")


@dataclass(frozen=True)
class S3Settings:
    """Endpoint and credentials of one store."""

    endpoint: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def aws_env(self) -> dict[str, str]:
        """The standard AWS_* variables for this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        """A boto3 client of its own (path-style; nothing read from the caller's AWS setup)."""
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )
        return session.client(
            "s3", endpoint_url=self.endpoint, config=Config(s3={"addressing_style": "path"})
        )


class PrivateS3:
    """A versitygw process on a free loopback port with its data under ``workdir``."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.log_file = workdir / "versitygw.log"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.settings = S3Settings(
            endpoint=f"http://127.0.0.1:{self.port}",
            access_key_id="TEST" + secrets.token_hex(8).upper(),
            secret_access_key=secrets.token_urlsafe(30),
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self) -> Any:
        return self.settings.client()

    def aws_env(self) -> dict[str, str]:
        return self.settings.aws_env()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.settings.endpoint}{HEALTH_PATH}", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def start(self, timeout: float = 30) -> None:
        """Start it and wait (polling its health endpoint) until it answers."""
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VGW_", "ROOT_"))}
        env |= {
            "ROOT_ACCESS_KEY_ID": self.settings.access_key_id,
            "ROOT_SECRET_ACCESS_KEY": self.settings.secret_access_key,
            "VGW_REGION": self.settings.region,
        }
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--port=127.0.0.1:{self.port}", f"--health={HEALTH_PATH}", "posix", str(data)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"versitygw did not start: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it (SIGTERM, SIGKILL after 10 s); the port then refuses connections."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[PrivateS3]:
    """A started versitygw of this test's own (skips when there is no binary, see above)."""
    binary = versitygw_binary()
    if binary is None:
        reason = "no versitygw binary (set KILN_VERSITYGW, or build it with `hack/cluster build`)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    store = PrivateS3(binary, tmp_path / "versitygw")
    store.start()
    yield store
    store.stop()
