"""``kiln operator`` flags and the write fence of the operator's API client."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client as k8s

from kiln import kube
from kiln.cli import build_parser
from kiln.cli.operator import leader_election_config
from kiln.controllers.client import FencedApiClient
from kiln.leaderelection import NotLeader


def parse(*argv: str):
    return build_parser().parse_args(["operator", *argv])


def test_leader_election_flags(monkeypatch):
    monkeypatch.setenv("POD_NAME", "kiln-7d9f-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "kiln-system")
    assert leader_election_config(parse()) is None
    cfg = leader_election_config(
        parse(
            "--leader-elect",
            "--leader-elect-lease-name=kiln",
            "--leader-elect-lease-duration=6",
            "--leader-elect-renew-deadline=4",
            "--leader-elect-retry-period=1",
        )
    )
    assert (cfg.name, cfg.namespace, cfg.lease_duration, cfg.renew_deadline, cfg.retry_period) == (
        "kiln",
        "kiln-system",
        6,
        4,
        1,
    )
    assert cfg.identity.startswith("kiln-7d9f-abcde_")
    other = leader_election_config(parse("--leader-elect"))
    assert other.identity != cfg.identity  # a restarted container never reuses its predecessor's
    with pytest.raises(SystemExit, match="renew deadline"):
        leader_election_config(parse("--leader-elect", "--leader-elect-renew-deadline=20"))


def test_leader_election_needs_a_namespace(monkeypatch):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setattr("kiln.cli.operator.SERVICEACCOUNT_NAMESPACE", Path("/nonexistent"))
    with pytest.raises(SystemExit, match="namespace"):
        leader_election_config(parse("--leader-elect"))
    assert leader_election_config(parse("--leader-elect", "--leader-elect-namespace=ops")).namespace == "ops"


def test_log_format_flag():
    assert parse().log_format == "json"
    assert parse("--log-format=text").log_format == "text"
    with pytest.raises(SystemExit):
        parse("--log-format=yaml")


class Response:
    status, reason, data = 200, "OK", b'{"kind": "Pod"}'

    def read(self) -> bytes:
        return self.data

    def getheaders(self):
        return {}


def test_the_fence_refuses_writes_before_they_leave_the_process(monkeypatch):
    leader = {"now": False}
    api = FencedApiClient(k8s.Configuration(host="http://127.0.0.1:9"), lambda: leader["now"])
    sent: list[str] = []

    def transport(method, url, **_):
        sent.append(method)
        return Response()

    monkeypatch.setattr(api.rest_client, "request", transport)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}}
    assert kube.get(api, "v1", "Pod", "ns", "p") == {"kind": "Pod"}  # reads always pass
    for write in (
        lambda: kube.create(api, pod),
        lambda: kube.apply(api, pod),
        lambda: kube.delete(api, "v1", "Pod", "ns", "p"),
        lambda: k8s.CoreV1Api(api).delete_namespaced_pod("p", "ns"),
    ):
        with pytest.raises(NotLeader, match="not the leader"):
            write()
    assert sent == ["GET"]
    leader["now"] = True
    kube.create(api, pod)
    assert sent == ["GET", "POST"]


def test_the_connection_pool_holds_one_connection_per_calling_thread(tmp_path, monkeypatch):
    """Fewer connections than threads and urllib3 drops what it cannot keep ("Connection pool
    is full") and opens new ones; the operator asks for every kind's workers plus the gang
    creators (kiln.controllers._startup)."""
    from kiln.controllers.client import api_client

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert api_client(threads=96).configuration.connection_pool_maxsize == 96
    assert api_client().configuration.connection_pool_maxsize == 8
