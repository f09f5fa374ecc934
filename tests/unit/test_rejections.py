"""kiln.controllers.rejections: what a rejected child writes on its parent, and when it writes
nothing. The API server's side (the 403/422 itself) is tests/integration/test_rejections.py."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kiln import kube
from kiln.controllers import rejections

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "digits-node-0", "namespace": "ns"}}
BODY = '{"kind": "Status", "message": "pods \\"digits-node-0\\" is forbidden: exceeded quota: q"}'


class FakeCluster:
    """The parent as kube.get returns it; records status patches and Events."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] = {
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "digits", "namespace": "ns", "generation": 3, "resourceVersion": "7"},
            "status": {"phase": "Pending"},
        }
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(kube, "get", lambda api, v, k, ns, n: self.obj)
        monkeypatch.setattr(kube, "patch_status", self._patch_status)
        monkeypatch.setattr(
            rejections.events, "record", lambda api, o, t, r, m: self.events.append((t, r, m))
        )

    def _patch_status(self, api, obj, status, *, resource_version=None):
        assert resource_version == "7"
        self.patches.append(status)
        self.obj = {**self.obj, "status": {**self.obj["status"], **status}}
        return self.obj


def rejected() -> kube.Rejected:
    return kube.Rejected(POD, ApiException(status=403, reason="Forbidden", body=BODY))


def test_message_names_the_child_and_quotes_the_server():
    assert rejections.message(rejected()) == (
        'Pod digits-node-0 was rejected by the API server (403 Forbidden): pods "digits-node-0" is '
        "forbidden: exceeded quota: q"
    )


def test_reported_once_then_retries_write_nothing(monkeypatch):
    cluster = FakeCluster()
    cluster.install(monkeypatch)

    def reconcile(ns: str, name: str) -> None:
        raise rejected()

    run = rejections.reporting_rejections(None, "TrainingJob", reconcile)  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(kube.Rejected):  # re-raised: the work queue backs off
            run("ns", "digits")
    assert len(cluster.patches) == 1 and len(cluster.events) == 1
    ready = cluster.patches[0]["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "ChildRejected")
    assert ready["message"] == rejections.message(rejected()) and ready["observedGeneration"] == 3
    assert cluster.patches[0]["observedGeneration"] == 3
    assert cluster.events[0] == ("Warning", "ChildRejected", ready["message"])


def test_other_errors_pass_through_unreported(monkeypatch):
    cluster = FakeCluster()
    cluster.install(monkeypatch)

    def reconcile(ns: str, name: str) -> None:
        raise ApiException(status=500, reason="Internal Server Error")

    run = rejections.reporting_rejections(None, "TrainingJob", reconcile)  # type: ignore[arg-type]
    with pytest.raises(ApiException) as err:
        run("ns", "digits")
    assert not isinstance(err.value, kube.Rejected)
    assert not cluster.patches and not cluster.events
