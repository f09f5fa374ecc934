"""kiln.kube.covers: the "apply only what changed" test (no cluster)."""

from __future__ import annotations

import copy

import pytest

from kiln.kube import covers

DESIRED = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "digits-stable", "labels": {"kiln.dev/inferenceservice": "digits"}},
    "spec": {
        "replicas": 2,
        "template": {
            "spec": {
                "containers": [
                    {"name": "server", "image": "kiln/server:dev", "ports": [{"containerPort": 8080}]}
                ],
                "volumes": [{"name": "model", "emptyDir": {}}],
            }
        },
    },
}


def live() -> dict:
    """DESIRED as the API server returns it: defaults and other managers' fields added."""
    out = copy.deepcopy(DESIRED)
    out["metadata"].update(uid="u1", resourceVersion="7", generation=3, managedFields=[{"manager": "kiln"}])
    out["metadata"]["labels"]["other.example.com/team"] = "ml"
    c = out["spec"]["template"]["spec"]["containers"][0]
    c.update(terminationMessagePath="/dev/termination-log", imagePullPolicy="IfNotPresent")
    c["ports"][0]["protocol"] = "TCP"
    out["spec"]["strategy"] = {"type": "RollingUpdate"}
    out["status"] = {"readyReplicas": 2}
    return out


def test_live_object_with_defaults_covers_what_we_apply():
    assert covers(live(), DESIRED)


@pytest.mark.parametrize(
    "change",
    [
        lambda o: o["spec"].update(replicas=3),  # someone scaled it: drift to correct
        lambda o: o["spec"]["template"]["spec"]["containers"][0].update(image="kiln/server:old"),
        lambda o: o["metadata"]["labels"].pop("kiln.dev/inferenceservice"),
        lambda o: o["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"}),
        lambda o: o["spec"]["template"]["spec"]["volumes"][0].pop("emptyDir"),
        lambda o: o["spec"].update(replicas="2"),  # another type is another value
    ],
)
def test_any_difference_in_our_fields_means_apply(change):
    obj = live()
    change(obj)
    assert not covers(obj, DESIRED)


def test_null_in_desired_needs_the_field_absent():
    assert covers({"a": 1}, {"b": None})
    assert covers({"a": 1, "b": None}, {"b": None})
    assert not covers({"b": 2}, {"b": None})
