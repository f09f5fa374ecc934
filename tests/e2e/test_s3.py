"""Pods on the real node reach the cluster's S3 server through its Service name."""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

import pytest
from kubernetes import client

from .conftest import REAL_NODE
from .test_real_node import _finished, _pod

pytestmark = pytest.mark.e2e


def test_pod_reads_an_object_through_the_service_name(kube, namespace, busybox_image, real_cluster, s3):
    body = "artifact-bytes-from-the-host"
    s3.client.put_object(Bucket=s3.bucket, Key="models/m/1/weights", Body=body.encode())
    # Signed for the Service's host name (SigV4 signs the Host header): only a request that
    # reaches versitygw under that name, through CoreDNS and kube-proxy, gets the object back.
    assert s3.settings.pod_endpoint
    pod_client = dataclasses.replace(s3.settings, endpoint=s3.settings.pod_endpoint).client()
    url = urlsplit(
        pod_client.generate_presigned_url(
            "get_object", Params={"Bucket": s3.bucket, "Key": "models/m/1/weights"}, ExpiresIn=600
        )
    )
    # busybox-static's wget crashes in its static glibc (NSS lookups): nslookup + nc instead.
    # The request line and Host header come in through the environment, never through printf's
    # format (the query is full of %2F). The image's /tmp is root's: no files.
    cmd = (
        f"for i in $(seq 20); do ip=$(nslookup {url.hostname} | awk '/^Address: /{{a=$2}} END{{print a}}'); "
        '[ -n "$ip" ] && break; sleep 1; done; '
        'out=$(printf \'GET %s HTTP/1.0\\r\\nHost: %s\\r\\n\\r\\n\' "$REQ" "$HOST" '
        f'| nc -w 10 "$ip" {url.port}); '
        'echo "$out" | head -n 1 | tr -d \'\\r\' > /dev/termination-log; echo "$out" | tail -n 1; '
        "echo \"$out\" | grep -q '^HTTP/1.1 200'"
    )
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(
        namespace,
        _pod(
            "s3-get",
            busybox_image,
            cmd,
            env=[
                {"name": "REQ", "value": f"{url.path}?{url.query}"},
                {"name": "HOST", "value": url.netloc},
            ],
        ),
    )
    pod = _finished(core, namespace, "s3-get", timeout=120)
    log = core.read_namespaced_pod_log("s3-get", namespace)
    term = pod.status.container_statuses[0].state.terminated
    assert pod.spec.node_name == REAL_NODE
    assert pod.status.phase == "Succeeded", f"{term.message!r} {log}"
    assert term.message.startswith("HTTP/1.1 200")
    assert log.strip().endswith(body)


def test_pod_gets_an_s3_error_without_credentials(kube, namespace, busybox_image, real_cluster):
    """Anonymous requests are refused with an S3 XML error (the store is not world-readable)."""
    cmd = (
        "for i in $(seq 20); do ip=$(nslookup s3.kiln-s3.svc.cluster.local "
        "| awk '/^Address: /{a=$2} END{print a}'); [ -n \"$ip\" ] && break; sleep 1; done; "
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 \"$ip\" 9000"
    )
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(namespace, _pod("s3-anon", busybox_image, cmd))
    _finished(core, namespace, "s3-anon", timeout=120)
    log = core.read_namespaced_pod_log("s3-anon", namespace)
    assert log.startswith("HTTP/1.1 403"), log
    assert "<Code>AccessDenied</Code>" in log, log
