"""S3 for tests: the local cluster's shared versitygw, private versitygw processes, boto3 clients.

Fixtures (import them by name into a conftest.py, as tests/integration/conftest.py does):

- ``s3``: the cluster's versitygw (``hack/cluster up`` starts it; settings from
  ``hack/cluster env --json``) and a fresh bucket named after the test, emptied and deleted
  afterwards (best effort). Needs the ``cluster`` fixture.
- ``private_s3``: a versitygw of the test's own (the binary ``hack/cluster`` built and cached) on
  a free loopback port with its own data directory. ``stop()`` makes the store unavailable,
  ``start()`` brings it back on the same port with the same data: for fault tests.

Both hand out ``S3Settings``; ``S3Settings.client()`` makes a boto3 client with path-style
addressing, as Kiln uses it against S3-compatible stores (/work/shared S3 contract).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
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

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

REPO = Path(__file__).resolve().parents[1]
HACK_CLUSTER = REPO / "hack" / "cluster"
HEALTH_PATH = "/health"  # what hack/cluster passes to versitygw --health, unauthenticated


@dataclass(frozen=True)
class S3Settings:
    """Where an S3 store is and how to sign in to it.

    ``endpoint`` is the URL this machine uses; ``pod_endpoint`` the one pods use (None for a
    private store, which pods cannot reach).
    """

    endpoint: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"
    pod_endpoint: str | None = None

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this store: path-style addressing, these credentials only.

        ``config`` goes to botocore's Config (e.g. ``retries={"max_attempts": 1}``,
        ``connect_timeout=1``); nothing is read from the AWS_* environment or ~/.aws.
        """
        return s3_client(
            self.endpoint, self.access_key_id, self.secret_access_key, region=self.region, **config
        )

    def aws_env(self, *, for_pods: bool = False) -> dict[str, str]:
        """The standard AWS_* variables for this store (what a Secret for Kiln's pods holds)."""
        endpoint = self.pod_endpoint if for_pods else self.endpoint
        if endpoint is None:
            raise ValueError("this store is not reachable from pods")
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": endpoint,
        }


def s3_client(
    endpoint: str, access_key_id: str, secret_access_key: str, *, region: str, **config: Any
) -> Any:
    """boto3 S3 client with explicit endpoint and keys, path-style addressing, SigV4 throughout.

    A session of its own, so credentials, region or endpoint in the caller's environment or
    ~/.aws never leak in. ``config`` extends botocore.config.Config.
    """
    session = boto3.session.Session(
        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key, region_name=region
    )
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "retries": {"mode": "standard"},
        # SigV4 for presigned URLs too (botocore may presign S3 URLs with SigV2, which
        # versitygw, like AWS for new buckets, refuses: 400 InvalidRequest)
        "signature_version": "s3v4",
    }
    options.update(config)
    return session.client("s3", endpoint_url=endpoint, config=Config(**options))


def cluster_env() -> dict[str, Any]:
    """``hack/cluster env --json`` (raises RuntimeError when it fails)."""
    out = subprocess.run([str(HACK_CLUSTER), "env", "--json"], text=True, capture_output=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"hack/cluster env --json failed: {out.stderr.strip()}")
    return dict(json.loads(out.stdout))


def cluster_s3_settings(env: dict[str, Any] | None = None) -> S3Settings:
    """The cluster's versitygw, from ``hack/cluster env --json`` (after ``hack/cluster up``).

    Raises RuntimeError when the cluster has no S3 credentials yet (never started).
    """
    env = env if env is not None else cluster_env()
    if not env.get("KILN_S3_ACCESS_KEY_ID"):
        raise RuntimeError("the local cluster has no S3 credentials yet: run `hack/cluster up`")
    return S3Settings(
        endpoint=env["KILN_S3_ENDPOINT"],
        access_key_id=env["KILN_S3_ACCESS_KEY_ID"],
        secret_access_key=env["KILN_S3_SECRET_ACCESS_KEY"],
        region=env["KILN_S3_REGION"],
        pod_endpoint=env["KILN_S3_POD_ENDPOINT"],
    )


def bucket_name(hint: str) -> str:
    """A unique valid bucket name (3-63 of [a-z0-9-], starts and ends alphanumeric) from ``hint``."""
    base = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:40].strip("-") or "bucket"
    return f"t-{base}-{secrets.token_hex(4)}"


def delete_bucket(client: Any, bucket: str) -> None:
    """Delete every object (and unfinished multipart upload) in ``bucket``, then the bucket."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for up in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@dataclass(frozen=True)
class S3Bucket:
    """A test's bucket: ``settings`` of the store, ``bucket`` name, a ready ``client``."""

    settings: S3Settings
    bucket: str
    client: Any

    def uri(self, key: str = "") -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class PrivateS3:
    """A versitygw process of its own: ``posix`` backend in ``workdir/data``, loopback only.

    ``binary`` is the versitygw that hack/cluster built (``hack/cluster env --json``'s
    ``versitygw``). The port is chosen once (``free_port``) and kept across ``stop()``/``start()``,
    as is the data, so a stopped store comes back as it was. Log: ``workdir/versitygw.log``.
    """

    def __init__(self, binary: str, workdir: Path, *, region: str = "us-east-1") -> None:
        self.binary = binary
        self.workdir = workdir
        self.data = workdir / "data"
        self.iam = workdir / "iam"
        self.log_file = workdir / "versitygw.log"
        self.port = free_port()
        self.settings = S3Settings(
            endpoint=f"http://127.0.0.1:{self.port}",
            access_key_id="PRIV" + secrets.token_hex(8).upper(),
            secret_access_key=secrets.token_urlsafe(30),
            region=region,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint

    def client(self, **config: Any) -> Any:
        """A boto3 client for this store (see S3Settings.client)."""
        return self.settings.client(**config)

    def aws_env(self) -> dict[str, str]:
        """The AWS_* variables for this store (see S3Settings.aws_env)."""
        return self.settings.aws_env()

    def healthy(self) -> bool:
        """Whether its health endpoint answers 200 now."""
        try:
            with urllib.request.urlopen(f"{self.endpoint}{HEALTH_PATH}", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def start(self, timeout: float = 30) -> None:
        """Start it (no-op if running) and wait until it answers; RuntimeError if it does not."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.data.mkdir(parents=True, exist_ok=True)
        self.iam.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VGW_", "ROOT_"))}
        env |= {
            "ROOT_ACCESS_KEY_ID": self.settings.access_key_id,
            "ROOT_SECRET_ACCESS_KEY": self.settings.secret_access_key,
            "VGW_REGION": self.settings.region,
        }
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--port=127.0.0.1:{self.port}",
                    f"--health={HEALTH_PATH}",
                    f"--iam-dir={self.iam}",  # 403 InvalidAccessKeyId for unknown keys (hack/cluster)
                    "posix",
                    str(self.data),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"versitygw exited ({self.proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"versitygw not healthy after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self, *, kill: bool = False, timeout: float = 10) -> None:
        """Stop it: SIGTERM (SIGKILL after ``timeout`` s), or SIGKILL at once with ``kill``.

        Returns once the process is gone, so the port refuses connections.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @contextlib.contextmanager
    def unavailable(self, *, kill: bool = False) -> Iterator[None]:
        """``with store.unavailable(): ...``: stopped inside the block, started again after it."""
        self.stop(kill=kill)
        try:
            yield
        finally:
            self.start()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else "(no log)"


def versitygw_binary() -> str:
    """The cached versitygw binary, built by ``hack/cluster build`` if it is not there yet.

    Skips the test (fails it under CI=true) when this machine cannot build it (exit code 2).
    """
    path = Path(cluster_env()["versitygw"])
    if not path.exists():
        out = subprocess.run([str(HACK_CLUSTER), "build"], text=True, capture_output=True, cwd=REPO)
        if out.returncode == 2:
            reason = out.stderr.strip()
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI=true but versitygw cannot be built here: {reason}", pytrace=False)
            pytest.skip(reason)
        if out.returncode != 0:
            pytest.fail(f"hack/cluster build failed:\n{out.stderr[-3000:]}", pytrace=False)
    return str(path)


@pytest.fixture
def s3(request: pytest.FixtureRequest, cluster: Any) -> Iterator[S3Bucket]:
    """The cluster's versitygw with a fresh bucket for this test (deleted after, best effort)."""
    settings = cluster_s3_settings()
    client = settings.client()
    name = bucket_name(request.node.name)
    client.create_bucket(Bucket=name)
    yield S3Bucket(settings, name, client)
    with contextlib.suppress(ClientError, BotoCoreError):
        delete_bucket(client, name)


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[PrivateS3]:
    """A started versitygw of this test's own (see PrivateS3); stopped at the end."""
    store = PrivateS3(versitygw_binary(), tmp_path / "versitygw")
    store.start()
    yield store
    store.stop()
