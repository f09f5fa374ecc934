"""The local cluster's S3 server (versitygw, started by hack/cluster) and the S3 test fixtures."""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from kubernetes import client

from tests.s3 import HACK_CLUSTER, REPO, cluster_s3_settings

pytestmark = pytest.mark.integration


def _hack_cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HACK_CLUSTER), *args], text=True, capture_output=True, cwd=REPO)


def test_versitygw_runs_with_the_cluster(cluster):
    status = _hack_cluster("status", "--quiet")
    line = next((ln for ln in status.stdout.splitlines() if ln.split()[:1] == ["versitygw"]), "")
    assert "healthy" in line and "UNHEALTHY" not in line, status.stdout
    env = json.loads(_hack_cluster("env", "--json").stdout)
    assert env["KILN_S3_ENDPOINT"].startswith("http://127.0.0.1:")
    assert env["KILN_S3_POD_ENDPOINT"] == "http://s3.kiln-s3.svc.cluster.local:9000"
    assert env["KILN_S3_REGION"] == "us-east-1"
    assert env["KILN_S3_ACCESS_KEY_ID"] and env["KILN_S3_SECRET_ACCESS_KEY"]
    creds = Path(cluster.state_dir) / "s3-credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text())["secret_access_key"] == env["KILN_S3_SECRET_ACCESS_KEY"]
    # the keys are handed to versitygw in its environment, never on its command line (ps, log)
    pid = json.loads((Path(cluster.state_dir) / "run" / "versitygw.json").read_text())["pid"]
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert env["KILN_S3_SECRET_ACCESS_KEY"] not in cmdline
    assert env["KILN_S3_SECRET_ACCESS_KEY"] not in (Path(cluster.logs) / "versitygw.log").read_text()


def test_env_exports_kiln_s3_variables_not_aws(cluster):
    out = _hack_cluster("env").stdout
    exported = dict(
        ln.removeprefix("export ").split("=", 1) for ln in out.splitlines() if ln.startswith("export ")
    )
    for key in ("ENDPOINT", "POD_ENDPOINT", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "REGION"):
        assert f"KILN_S3_{key}" in exported, out
    assert not [k for k in exported if k.startswith("AWS_")]
    evaluated = subprocess.run(
        ["bash", "-c", f'{out}\nprintf %s "$KILN_S3_SECRET_ACCESS_KEY"'], text=True, capture_output=True
    )
    assert evaluated.stdout == cluster_s3_settings().secret_access_key


def test_put_get_list_round_trip(s3):
    body = b"weights" * 1000
    s3.client.put_object(Bucket=s3.bucket, Key="models/digits/1/model.safetensors", Body=body)
    s3.client.put_object(Bucket=s3.bucket, Key="models/digits/1/config.json", Body=b"{}")
    s3.client.put_object(Bucket=s3.bucket, Key="datasets/digits.parquet", Body=b"rows")
    got = s3.client.get_object(Bucket=s3.bucket, Key="models/digits/1/model.safetensors")
    assert got["Body"].read() == body
    assert got["ContentLength"] == len(body)
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="models/digits/1/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "models/digits/1/config.json",
        "models/digits/1/model.safetensors",
    ]
    assert s3.bucket in [b["Name"] for b in s3.client.list_buckets()["Buckets"]]


def test_missing_object_and_bucket_are_404(s3):
    with pytest.raises(ClientError) as exc:
        s3.client.get_object(Bucket=s3.bucket, Key="nope")
    assert exc.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(ClientError) as exc:
        s3.client.list_objects_v2(Bucket=s3.bucket + "-missing")
    assert exc.value.response["Error"]["Code"] == "NoSuchBucket"


@pytest.mark.parametrize(
    ("wrong", "code"),
    [("access_key_id", "InvalidAccessKeyId"), ("secret_access_key", "SignatureDoesNotMatch")],
)
def test_wrong_credentials_are_refused(s3, wrong, code):
    good = s3.settings
    bad = dataclasses.replace(good, **{wrong: "WRONG" + getattr(good, wrong)[5:]})  # same length
    with pytest.raises(ClientError) as exc:
        bad.client(retries={"max_attempts": 1}).get_object(Bucket=s3.bucket, Key="any")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert exc.value.response["Error"]["Code"] == code


def test_service_for_pods_is_selectorless_on_port_9000(kube, cluster):
    svc = client.CoreV1Api(kube).read_namespaced_service("s3", "kiln-s3")
    assert svc.spec.selector is None
    assert [(p.name, p.port) for p in svc.spec.ports] == [("s3", 9000)]


def test_private_store_stops_and_comes_back_with_its_data(private_s3):
    s3 = private_s3.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)
    s3.create_bucket(Bucket="faults")
    s3.put_object(Bucket="faults", Key="a", Body=b"kept")
    port = private_s3.port
    with private_s3.unavailable():
        assert not private_s3.healthy()
        with pytest.raises(EndpointConnectionError):
            s3.get_object(Bucket="faults", Key="a")
    assert private_s3.port == port
    assert s3.get_object(Bucket="faults", Key="a")["Body"].read() == b"kept"
    private_s3.stop(kill=True)
    with pytest.raises(EndpointConnectionError):
        s3.list_buckets()
    private_s3.start()
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["faults"]
