"""The InferenceService controller's pure helpers: version resolution, Deployment observation,
status merge patches and the Model -> InferenceService index (no API server needed)."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.api.inferenceservice import ModelSelector
from kiln.controllers.inferenceservice import (
    ReferenceIndex,
    Unresolved,
    _artifact_of,
    progress_failure,
    ready_replicas,
    resolve_version,
    rolled_out_version,
)
from kiln.status import diff

DIGEST = "sha256:" + "cd" * 32


def version(v: int, **over: Any) -> dict[str, Any]:
    return {
        "version": v,
        "artifactUri": f"file:///a/{v}",
        "digest": DIGEST,
        "createdAt": "2026-01-01T00:00:00Z",
        **over,
    }


MODEL = {
    "metadata": {"name": "digits"},
    "status": {
        "versions": [version(1), version(2), version(3, artifactUri="")],
        "stages": {"production": 2, "staging": 3, "archived": [1]},
        "aliases": {"champion": 1, "ghost": 9},
        "policyStages": {"production": 2},  # fields this kind does not model are fine
    },
}


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ({"stage": "Production"}, 2),
        ({"alias": "champion"}, 1),
        ({"version": 1}, 1),
    ],
)
def test_resolve_version(ref, expected):
    v = resolve_version(MODEL, ModelSelector.model_validate({"name": "digits", **ref}))
    assert v["version"] == expected and v["artifactUri"] == f"file:///a/{expected}"


@pytest.mark.parametrize(
    ("model", "ref", "reason", "text"),
    [
        (None, {"stage": "Production"}, "ModelNotFound", "not found"),
        (MODEL, {"stage": "Development"}, "VersionNotResolved", "holds stage Development"),
        (MODEL, {"alias": "nope"}, "VersionNotResolved", "no alias 'nope'"),
        (MODEL, {"alias": "ghost"}, "VersionNotResolved", "version 9, which is not registered"),
        (MODEL, {"version": 7}, "VersionNotResolved", "not registered"),
        (MODEL, {"stage": "Staging"}, "VersionNotResolved", "has no artifact"),
        ({"metadata": {}}, {"version": 1}, "VersionNotResolved", "not registered"),  # no status yet
    ],
)
def test_resolve_version_errors(model, ref, reason, text):
    with pytest.raises(Unresolved) as e:
        resolve_version(model, ModelSelector.model_validate({"name": "digits", **ref}))
    assert e.value.reason == reason and text in e.value.message


def dep(
    version: int | None = 2,
    *,
    replicas: int = 3,
    gen: int = 2,
    observed: int = 2,
    ready: int = 3,
    updated: int = 3,
    total: int = 3,
    available: int = 3,
    conditions: list | None = None,
) -> dict[str, Any]:
    labels = {"kiln.dev/model-version": str(version)} if version is not None else {}
    return {
        "metadata": {"generation": gen},
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "server",
                            "env": [
                                {"name": "KILN_ARTIFACT_URI", "value": "file:///live/2"},
                                {"name": "KILN_ARTIFACT_DIGEST", "value": DIGEST},
                            ],
                        }
                    ]
                },
            },
        },
        "status": {
            "observedGeneration": observed,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "replicas": total,
            "availableReplicas": available,
            "conditions": conditions or [],
        },
    }


def test_ready_replicas():
    assert ready_replicas(dep(), 2) == 3
    assert ready_replicas(dep(ready=1), 2) == 1
    assert ready_replicas(dep(), 3) == 0  # runs another version
    assert ready_replicas(dep(observed=1), 2) == 0  # spec change not seen by the controller yet
    assert ready_replicas(dep(updated=2, total=4), 2) == 0  # old pods still around
    assert ready_replicas(None, 2) == 0 and ready_replicas(dep(), None) == 0


def test_rolled_out_version():
    assert rolled_out_version(dep()) == 2
    assert rolled_out_version(dep(available=2)) is None
    assert rolled_out_version(dep(total=4)) is None  # surge pod of the old version
    assert rolled_out_version(dep(observed=1)) is None
    assert rolled_out_version(dep(replicas=0, ready=0, updated=0, total=0, available=0)) == 2
    assert rolled_out_version(None) is None


def test_progress_failure():
    stuck = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "x" has timed out progressing.',
        }
    ]
    assert progress_failure(dep(conditions=stuck), 2) == 'ReplicaSet "x" has timed out progressing.'
    assert progress_failure(dep(conditions=stuck), 3) is None  # about an older template
    ok = [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]
    assert progress_failure(dep(conditions=ok), 2) is None


def test_artifact_of_falls_back_to_the_live_deployment():
    assert _artifact_of(MODEL, 1, None) == (1, "file:///a/1", DIGEST)
    pruned = {"status": {"versions": []}}
    assert _artifact_of(pruned, 2, dep()) == (2, "file:///live/2", DIGEST)
    assert _artifact_of(pruned, 5, dep()) is None


def test_status_diff_clears_the_finished_canary():
    old = {"a": 1, "canaryVersion": 2, "analysis": {"lastRunTime": "t", "failures": 1}, "history": [1]}
    new = {"a": 1, "analysis": {"failures": 0}, "history": [1, 2]}
    assert diff(old, new) == {
        "canaryVersion": None,
        "analysis": {"lastRunTime": None, "failures": 0},
        "history": [1, 2],
    }
    assert diff(new, new) == {}


def test_model_index():
    idx = ReferenceIndex()
    idx.set("ns", "a", "digits")
    idx.set("ns", "b", "digits")
    idx.set("other", "c", "digits")
    idx.set("ns", "d", "iris")
    assert idx.users("ns", "digits") == ["a", "b"]
    idx.set("ns", "a", "iris")  # modelRef changed
    idx.set("ns", "b", None)  # deleted
    assert idx.users("ns", "digits") == [] and idx.users("ns", "iris") == ["a", "d"]
