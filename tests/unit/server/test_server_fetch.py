"""``kiln-serve --fetch-only`` (the InferenceService pods' storage-initializer) against a real S3
server (a private versitygw): a verified copy lands in the model directory, and every failure
exits 1 with the bucket, key and cause on stderr, never the credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln import storage
from kiln.artifact import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, sha256_file
from kiln.server.__main__ import main
from tests.s3 import PrivateS3, private_s3  # noqa: F401  (fixture, by name)


@pytest.fixture
def store(private_s3: PrivateS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, str]:  # noqa: F811
    """Bucket ``models`` with one artifact; returns ``(uri, digest)``."""
    for k, v in private_s3.aws_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KILN_S3_MAX_ATTEMPTS", "1")
    private_s3.client().create_bucket(Bucket="models")
    src = tmp_path / "src"
    src.mkdir()
    (src / WEIGHTS_FILE).write_bytes(b"\x01" * 4096)
    digest = sha256_file(src / WEIGHTS_FILE)
    (src / CONFIG_FILE).write_text("{}")
    (src / METADATA_FILE).write_text(
        json.dumps({"weightsDigest": digest, "createdAt": "2026-12-01T00:00:00Z"})
    )
    uri = "s3://models/digits/digits-v1"
    storage.upload_dir(src, uri, last=[METADATA_FILE])
    return uri, digest


def fetch(uri: str, digest: str, model_dir: Path) -> int:
    return main(
        [
            "--fetch-only",
            "--artifact",
            uri,
            "--digest",
            digest,
            "--model-name",
            "digits",
            "--model-dir",
            str(model_dir),
        ],
        environ={},
    )


def test_fetch_only_downloads_and_verifies(store: tuple[str, str], tmp_path: Path) -> None:
    uri, digest = store
    assert fetch(uri, digest, tmp_path / "model") == 0
    copy = tmp_path / "model" / digest.split(":")[1]
    assert sha256_file(copy / WEIGHTS_FILE) == digest and (copy / METADATA_FILE).is_file()
    assert fetch(uri, digest, tmp_path / "model") == 0  # a restart reuses the copy, re-verified


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "no objects under this prefix"),
        ("mismatch", "weights digest"),
        ("bucket", "does not exist"),
    ],
)
def test_fetch_only_refuses(
    store: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, reason: str
) -> None:
    uri, digest = store
    if case == "missing":
        uri = "s3://models/digits/nope"
    elif case == "mismatch":
        digest = "sha256:" + "0" * 64
    else:
        uri = "s3://no-such-bucket/digits/digits-v1"
    assert fetch(uri, digest, tmp_path / "model") == 1
    err = capsys.readouterr().err
    assert reason in err and uri in err
    assert not (tmp_path / "model" / digest.split(":")[1]).exists()


def test_fetch_only_with_wrong_credentials_names_no_secret(
    store: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, digest = store
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")
    assert fetch(uri, digest, tmp_path / "model") == 1
    err = capsys.readouterr().err
    assert "access denied" in err and "not-the-secret-at-all" not in err
