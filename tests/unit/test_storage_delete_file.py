"""kiln.storage.delete_file on a directory and on a real S3 server (versitygw)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import storage
from tests.s3 import PrivateS3, private_s3  # noqa: F401  (fixture, by name)


def test_delete_file_local(tmp_path: Path):
    f = tmp_path / "d" / "x.json"
    storage.write_bytes(f.as_uri(), b"{}")
    assert storage.exists(str(f))
    storage.delete_file(f.as_uri())
    assert not f.exists() and not storage.exists(str(f))
    storage.delete_file(f.as_uri())  # absent: nothing happens
    assert (tmp_path / "d").is_dir()  # only the file goes


def test_delete_file_s3(private_s3: PrivateS3, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    for k, v in private_s3.aws_env().items():
        monkeypatch.setenv(k, v)
    private_s3.client().create_bucket(Bucket="kiln-test")
    storage.write_bytes("s3://kiln-test/p/x.json", b"{}")
    storage.write_bytes("s3://kiln-test/p/y.json", b"{}")
    storage.delete_file("s3://kiln-test/p/x.json")
    assert storage.list_files("s3://kiln-test/p") == ["y.json"]
    storage.delete_file("s3://kiln-test/p/x.json")  # absent: nothing happens
    with pytest.raises(storage.StorageError) as e:
        storage.delete_file("s3://no-such-bucket/p/x.json")
    assert e.value.reason == storage.BUCKET_NOT_FOUND and "no-such-bucket" in str(e.value)
