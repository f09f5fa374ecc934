"""Artifacts in a real S3 server (versitygw, started by hack/cluster): kiln.storage, the registry's
verification and records, registration while the store is down, ``kiln registry rebuild`` of a
bucket prefix, and the refusals a user sees for wrong credentials, a missing bucket or object and
a digest mismatch. No mock of S3 anywhere: every request goes to the real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kiln import API_VERSION, storage
from kiln import kube as kb
from kiln.artifact import WEIGHTS_FILE, ArtifactError
from kiln.cli import main as kiln_main
from kiln.registration import ArtifactRefused, register_version
from kiln.registry import artifacts, record
from tests.s3 import PrivateS3, S3Bucket, S3Settings

from .conftest import Cluster
from .test_model import LINEAGE, create_model, get_model, make_artifact, ready, stages, wait_reconciled


@pytest.fixture
def store_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point kiln.storage (and the in-process operator) at a store, the way pods get it: AWS_*."""

    def use(settings: S3Settings, **over: str) -> None:
        for k, v in (settings.aws_env() | over).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("KILN_S3_MAX_ATTEMPTS", "1")  # fault tests: fail fast, the caller retries

    return use


def upload_artifact(tmp_path: Path, bucket: S3Bucket, model: str, job: str, **kw: Any) -> tuple[str, str]:
    """A complete artifact written locally, then uploaded to ``s3://<bucket>/models/<model>/<job>``."""
    _, digest = make_artifact(tmp_path / "src", model, job, **kw)
    uri = bucket.uri(f"models/{model}/{job}")
    storage.upload_dir(tmp_path / "src" / model / job, uri, last=["metadata.json"])
    return uri, digest


def test_storage_round_trip_and_fetch(s3: S3Bucket, store_env: Any, tmp_path: Path) -> None:
    store_env(s3.settings)
    uri, digest = upload_artifact(tmp_path, s3, "digits", "job-1")
    assert storage.list_files(uri) == ["config.json", "metadata.json", "model.safetensors"]
    assert storage.verify_artifact_at(uri, digest).weightsDigest == digest
    assert storage.sha256(storage.parse(uri).join(WEIGHTS_FILE)) == digest
    local = storage.fetch_artifact(uri, tmp_path / "cache", digest)
    assert local == tmp_path / "cache" / digest.split(":")[1]
    assert storage.fetch_artifact(uri, tmp_path / "cache", digest) == local  # reused, re-verified
    with pytest.raises(ArtifactError, match="expected"):
        storage.fetch_artifact(uri, tmp_path / "other", "sha256:" + "0" * 64)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x5a" * (20 << 20))  # > multipart threshold: a multipart upload and download
    storage.upload_file(big, s3.uri("big/big.bin"))
    assert storage.stat(s3.uri("big/big.bin")).size == 20 << 20
    storage.download_file(s3.uri("big/big.bin"), tmp_path / "big.copy")
    assert (tmp_path / "big.copy").read_bytes() == big.read_bytes()
    assert storage.delete_tree(s3.uri("big")) == 1 and storage.list_files(s3.uri("big")) == []


def test_store_errors_name_bucket_key_and_cause(s3: S3Bucket, store_env: Any, tmp_path: Path) -> None:
    store_env(s3.settings)
    uri, digest = upload_artifact(tmp_path, s3, "digits", "job-1")
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(s3.uri("models/digits/nope/metadata.json"))
    assert e.value.reason == storage.OBJECT_NOT_FOUND and f"s3://{s3.bucket}/models/digits/nope" in str(
        e.value
    )
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes("s3://kiln-no-such-bucket-4711/x/metadata.json")
    assert e.value.reason == storage.BUCKET_NOT_FOUND and "kiln-no-such-bucket-4711" in str(e.value)
    store_env(s3.settings, AWS_SECRET_ACCESS_KEY="wrong-secret-value")
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(storage.parse(uri).join("metadata.json"))
    assert e.value.reason == storage.ACCESS_DENIED and not e.value.transient
    assert "wrong-secret-value" not in str(e.value) and s3.settings.access_key_id not in str(e.value)
    problem = artifacts.verify(uri, digest)[1]
    assert problem is not None and problem.reason == "AccessDenied" and s3.bucket in problem.message


def test_registration_waits_for_the_store(
    kube: client.ApiClient, namespace: str, private_s3: PrivateS3, store_env: Any, tmp_path: Path
) -> None:
    """S3 down while a version registers: refused (nothing written), registered once it is back,
    under one number however often it was retried, with its record in the bucket."""
    store_env(private_s3.settings)
    private_s3.client().create_bucket(Bucket="models")
    bucket = S3Bucket(private_s3.settings, "models", private_s3.client())
    uri, digest = upload_artifact(tmp_path, bucket, "digits", "job-1")
    create_model(kube, namespace)

    def attempt() -> int:
        return register_version(
            kube,
            namespace,
            "digits",
            artifact_uri=uri,
            digest=digest,
            lineage={**LINEAGE, "trainingJob": "job-1"},
        )

    with private_s3.unavailable():
        for _ in range(3):
            with pytest.raises(ArtifactRefused) as e:
                attempt()
            assert e.value.problem.reason == "StoreUnavailable"
        assert (get_model(kube, namespace).get("status") or {}).get("versions") is None
    assert attempt() == 1
    assert attempt() == 1  # idempotent per TrainingJob: the retry after success writes nothing
    st = get_model(kube, namespace)["status"]
    assert st["latestVersion"] == 1 and [v["version"] for v in st["versions"]] == [1]
    rec = record.parse(storage.read_bytes(storage.parse(uri).join(record.RECORD_FILE)))
    reg = rec.find(namespace, "digits")
    assert reg is not None and reg.version.version == 1 and reg.version.artifact_uri == uri


def test_refusals_keep_the_previous_stage_and_rebuild_lists_the_bucket(
    kube: client.ApiClient,
    namespace: str,
    operator: object,
    s3: S3Bucket,
    store_env: Any,
    tmp_path: Path,
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_env(s3.settings)

    def promote(version: int) -> int:
        argv = ["promote", "digits", str(version), "--stage", "Production", "-n", namespace]
        return kiln_main([*argv, "--kubeconfig", cluster.kubeconfig])

    create_model(kube, namespace)
    good, good_digest = upload_artifact(tmp_path, s3, "digits", "job-1", accuracy=0.9)
    tampered, tampered_digest = upload_artifact(tmp_path, s3, "digits", "job-2", accuracy=0.8)
    for job, (uri, digest) in (("job-1", (good, good_digest)), ("job-2", (tampered, tampered_digest))):
        register_version(
            kube,
            namespace,
            "digits",
            artifact_uri=uri,
            digest=digest,
            lineage={**LINEAGE, "trainingJob": job},
        )
    promote(1)
    wait_reconciled(kube, namespace, lambda o: stages(o).get("production") == 1)

    # The weights of version 2 are replaced in the bucket after registration.
    s3.client.put_object(
        Bucket=s3.bucket, Key="models/digits/job-2/model.safetensors", Body=b"not the weights"
    )
    promote(2)
    obj = wait_reconciled(kube, namespace, lambda o: ready(o).get("reason") == "DigestMismatch")
    assert "models/digits/job-2" in ready(obj)["message"] and stages(obj)["production"] == 1

    # Its artifact deleted: the missing object is named (an annotation wakes the reconcile up
    # instead of waiting for the periodic re-check of refused declarations).
    storage.delete_tree(tampered)
    kb.patch(kube, API_VERSION, "Model", namespace, "digits", {"metadata": {"annotations": {"touch": "1"}}})
    obj = wait_reconciled(kube, namespace, lambda o: ready(o).get("reason") == "ArtifactMissing")
    assert f"s3://{s3.bucket}/models/digits/job-2" in ready(obj)["message"] and stages(obj)["production"] == 1

    # Back to version 1; then the status is lost (a restore without status) and rebuilt from the bucket.
    promote(1)
    wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")
    obj = get_model(kube, namespace)
    kb.patch_status(kube, obj, {k: None for k in obj["status"]})
    wait_reconciled(kube, namespace, lambda o: ready(o).get("reason") == "VersionNotFound")
    capsys.readouterr()
    rc = kiln_main(
        [
            "registry",
            "rebuild",
            "digits",
            "-n",
            namespace,
            "--artifacts",
            s3.uri("models"),
            "--kubeconfig",
            cluster.kubeconfig,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "restored 1 version(s)" in out
    after = wait_reconciled(kube, namespace, lambda o: ready(o).get("status") == "True")
    # Version 2's artifact and record are gone (no record is written back into a deleted prefix).
    assert [v["version"] for v in after["status"]["versions"]] == [1]
    assert after["status"]["latestVersion"] == 1
    assert storage.list_files(tampered) == []
    assert stages(after) == {"production": 1}
