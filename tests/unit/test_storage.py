"""kiln.storage on file:// locations and URI parsing (no object store needed).

The same operations against a real S3 server are in tests/integration/test_storage_s3.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln import storage
from kiln.artifact import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, ArtifactError, sha256_file


def test_parse_s3_and_file():
    loc = storage.parse("s3://bucket/models/digits/")
    assert (loc.scheme, loc.bucket, loc.key) == ("s3", "bucket", "models/digits")
    assert loc.uri == "s3://bucket/models/digits"
    assert loc.join("v1", "model.safetensors").uri == "s3://bucket/models/digits/v1/model.safetensors"
    assert storage.parse("s3://bucket").join("a").key == "a"
    assert storage.parse("s3://bucket/a/b").parent().uri == "s3://bucket/a"
    f = storage.parse("file:///var/lib/kiln/artifacts")
    assert f.is_local and f.path == Path("/var/lib/kiln/artifacts")
    assert storage.parse("/abs/dir").uri == "file:///abs/dir"
    assert f.join("digits/.checkpoints").uri == "file:///var/lib/kiln/artifacts/digits/.checkpoints"


@pytest.mark.parametrize("bad", ["gs://bucket/x", "s3:///nobucket", "relative/path", "http://x/y"])
def test_parse_rejects(bad: str):
    with pytest.raises(storage.StorageError) as e:
        storage.parse(bad)
    assert e.value.reason == storage.INVALID_URI


def test_join_refuses_parent_segments():
    with pytest.raises(storage.StorageError):
        storage.parse("s3://b/p").join("../other")


def test_addressing_style_follows_endpoint():
    assert storage.addressing_style({}) == "auto"
    assert storage.addressing_style({"AWS_ENDPOINT_URL": "http://s3.local:9000"}) == "path"
    assert (
        storage.addressing_style({"AWS_ENDPOINT_URL": "http://x", "KILN_S3_ADDRESSING_STYLE": "virtual"})
        == "virtual"
    )


def test_local_round_trip(tmp_path: Path):
    root = storage.parse(tmp_path.as_uri())
    storage.write_bytes(root.join("a/b.txt"), b"hello")
    assert storage.read_bytes(root.join("a/b.txt")) == b"hello"
    assert storage.exists(root.join("a/b.txt")) and not storage.exists(root.join("a/none"))
    assert storage.list_files(root) == ["a/b.txt"]
    assert storage.list_files(root.join("missing")) == []
    assert storage.sha256(root.join("a/b.txt")) == sha256_file(tmp_path / "a/b.txt")
    info = storage.stat(root.join("a/b.txt"))
    assert info.size == 5
    dest = tmp_path / "copy"
    assert storage.download_dir(root.join("a"), dest) == ["b.txt"]
    assert (dest / "b.txt").read_bytes() == b"hello"
    assert storage.upload_dir(dest, root.join("up"), last=["b.txt"]) == ["b.txt"]
    assert storage.delete_tree(root.join("up")) == 1 and not (tmp_path / "up").exists()


def test_local_missing_is_object_not_found(tmp_path: Path):
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes((tmp_path / "nope").as_uri())
    assert e.value.reason == storage.OBJECT_NOT_FOUND and not e.value.transient
    assert str(tmp_path / "nope") in str(e.value)


def write_artifact(d: Path, weights: bytes = b"weights") -> str:
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(weights)
    (d / CONFIG_FILE).write_text("{}")
    digest = sha256_file(d / WEIGHTS_FILE)
    meta = {"weightsDigest": digest, "createdAt": "2026-11-30T00:00:00Z"}
    (d / METADATA_FILE).write_text(json.dumps(meta))
    return digest


def test_upload_dir_puts_named_files_last(tmp_path: Path):
    digest = write_artifact(tmp_path / "art")
    order = storage.upload_dir(tmp_path / "art", (tmp_path / "dest").as_uri(), last=[METADATA_FILE])
    assert order[-1] == METADATA_FILE and set(order) == {WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE}
    assert storage.verify_artifact_at((tmp_path / "dest").as_uri(), digest).weightsDigest == digest


def test_verify_and_cache(tmp_path: Path):
    digest = write_artifact(tmp_path / "art")
    uri = (tmp_path / "art").as_uri()
    cache = storage.VerificationCache()
    assert cache.verify(uri, digest).weightsDigest == digest
    with pytest.raises(ArtifactError, match="expected"):
        cache.verify(uri, "sha256:" + "0" * 64)
    # Replacing the weights under the same name is noticed (the cache keys on size + mtime/inode).
    (tmp_path / "art" / WEIGHTS_FILE).write_bytes(b"tampered!")
    with pytest.raises(ArtifactError, match="weights digest"):
        cache.verify(uri, digest)
    (tmp_path / "art" / CONFIG_FILE).unlink()
    with pytest.raises(storage.StorageError, match=CONFIG_FILE) as e:
        storage.verify_artifact_at(uri, digest)
    assert e.value.reason == storage.OBJECT_NOT_FOUND


def test_fetch_local_artifact_is_used_in_place(tmp_path: Path):
    digest = write_artifact(tmp_path / "art")
    assert storage.fetch_artifact((tmp_path / "art").as_uri(), tmp_path / "cache", digest) == tmp_path / "art"
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ArtifactError):
        storage.fetch_artifact((tmp_path / "art").as_uri(), tmp_path / "cache", "sha256:" + "1" * 64)
