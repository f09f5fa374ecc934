"""Bad input is stopped at admission by the generated CRD schemas (the API server decides).

Each case is a manifest the API server must reject, and a fragment the rejection message must
contain that names the offending field.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from kiln import API_VERSION
from kiln.api.trainingjob import max_name_length
from kiln.kube import create, get, patch, path, request

TJ = {"image": "kiln-trainer:dev", "dataset": {"builtin": "sklearn-digits"}}
ISVC = {"modelRef": {"name": "digits", "stage": "Production"}, "runtime": {"image": "kiln-server:dev"}}
FG = {
    "entities": [{"name": "customer_id"}],
    "features": [{"name": "orders_7d", "dtype": "int64"}],
    "source": {"uri": "/data/x.parquet"},
}


def obj(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "bad"}, "spec": spec}


def merged(base: dict[str, Any], **over: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(over)
    return out


CASES: list[tuple[str, dict[str, Any], str]] = [
    # wrong types
    ("tj-numNodes-string", obj("TrainingJob", merged(TJ, numNodes="two")), "spec.numNodes"),
    ("tj-suspend-not-bool", obj("TrainingJob", merged(TJ, suspend="yes")), "spec.suspend"),
    ("model-aliases-not-int", obj("Model", {"aliases": {"champion": "three"}}), "spec.aliases.champion"),
    ("fg-features-not-list", obj("FeatureGroup", merged(FG, features={"name": "x"})), "spec.features"),
    # out of range
    ("tj-numNodes-zero", obj("TrainingJob", merged(TJ, numNodes=0)), "spec.numNodes"),
    ("tj-maxRestarts-negative", obj("TrainingJob", merged(TJ, maxRestarts=-1)), "spec.maxRestarts"),
    ("tj-numProcPerNode-zero", obj("TrainingJob", merged(TJ, numProcPerNode=0)), "spec.numProcPerNode"),
    ("model-history-limit-huge", obj("Model", {"versionHistoryLimit": 100000}), "spec.versionHistoryLimit"),
    (
        "isvc-weight-over-100",
        obj("InferenceService", merged(ISVC, rollout={"steps": [{"weight": 150}]})),
        "spec.rollout.steps[0].weight",
    ),
    ("isvc-replicas-negative", obj("InferenceService", merged(ISVC, replicas=-2)), "spec.replicas"),
    # unknown enum values
    ("tj-numProcPerNode-word", obj("TrainingJob", merged(TJ, numProcPerNode="many")), "spec.numProcPerNode"),
    (
        "tj-unknown-builtin",
        obj("TrainingJob", merged(TJ, dataset={"builtin": "mnist"})),
        "spec.dataset.builtin",
    ),
    (
        "isvc-stage-unknown",
        obj("InferenceService", merged(ISVC, modelRef={"name": "d", "stage": "Prod"})),
        "spec.modelRef.stage",
    ),
    (
        "isvc-nodata-unknown",
        obj(
            "InferenceService",
            merged(
                ISVC,
                rollout={
                    "analysis": {
                        "prometheus": {"address": "http://p:9090"},
                        "noDataPolicy": "Ignore",
                        "metrics": [{"name": "e", "query": "up", "max": 1}],
                    }
                },
            ),
        ),
        "spec.rollout.analysis.noDataPolicy",
    ),
    (
        "isvc-toleration-operator-unknown",
        obj("InferenceService", merged(ISVC, tolerations=[{"key": "kiln.dev/pool", "operator": "Matches"}])),
        "spec.tolerations[0].operator",
    ),
    (
        "fg-dtype-unknown",
        obj("FeatureGroup", merged(FG, features=[{"name": "x", "dtype": "float16"}])),
        "spec.features[0].dtype",
    ),
    (
        "model-policy-stage-unknown",
        obj("Model", {"promotionPolicy": [{"stage": "Canary", "metric": "a", "min": 1}]}),
        "spec.promotionPolicy[0].stage",
    ),
    (
        "tj-failure-policy-exit-0",
        obj(
            "TrainingJob",
            merged(
                TJ,
                podFailurePolicy={
                    "rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [0]}}]
                },
            ),
        ),
        "spec.podFailurePolicy.rules[0].onExitCodes.values[0]",
    ),
    (
        "tj-failure-policy-action-unknown",
        obj(
            "TrainingJob",
            merged(
                TJ,
                podFailurePolicy={
                    "rules": [{"action": "Retry", "onExitCodes": {"operator": "In", "values": [2]}}]
                },
            ),
        ),
        "spec.podFailurePolicy.rules[0].action",
    ),
    # conflicting fields (CEL rules)
    (
        "tj-two-datasets",
        obj(
            "TrainingJob",
            merged(TJ, dataset={"builtin": "sklearn-digits", "uri": "/d.csv", "labelColumn": "y"}),
        ),
        "dataset needs exactly one of builtin, uri, featureGroupRef",
    ),
    (
        "tj-uri-without-label",
        obj("TrainingJob", merged(TJ, dataset={"uri": "/d.csv"})),
        "spec.dataset.labelColumn",
    ),
    (
        "tj-gpu-request-ne-limit",
        obj(
            "TrainingJob",
            merged(TJ, resourcesPerNode={"requests": {"nvidia.com/gpu": 4}, "limits": {"nvidia.com/gpu": 8}}),
        ),
        "GPU requests must equal GPU limits",
    ),
    (
        "isvc-stage-and-version",
        obj("InferenceService", merged(ISVC, modelRef={"name": "d", "stage": "Production", "version": 3})),
        "modelRef needs exactly one of stage, version, alias",
    ),
    (
        "isvc-autoscaling-min-gt-max",
        obj("InferenceService", merged(ISVC, autoscaling={"minReplicas": 5, "maxReplicas": 2})),
        "maxReplicas must be >= minReplicas",
    ),
    (
        "model-version-two-stages",
        obj("Model", {"stages": {"staging": 3, "production": 3}}),
        "a version can hold only one stage",
    ),
    (
        "model-policy-without-bound",
        obj("Model", {"promotionPolicy": [{"stage": "Staging", "metric": "accuracy"}]}),
        "a promotion rule needs min or max",
    ),
    (
        "fg-duplicate-feature",
        obj(
            "FeatureGroup",
            merged(FG, features=[{"name": "x", "dtype": "int64"}, {"name": "x", "dtype": "int64"}]),
        ),
        "feature names must be unique",
    ),
    (
        "fg-online-without-store",
        obj("FeatureGroup", merged(FG, online={"enabled": True})),
        "spec.online.store",
    ),
    # LLM runtime (docs/llm.md)
    (
        "isvc-llm-settings-on-kiln-engine",
        obj("InferenceService", merged(ISVC, runtime={"image": "x", "llm": {"maxModelLen": 256}})),
        "runtime.llm applies to LLM engines",
    ),
    (
        "isvc-engine-unknown",
        obj("InferenceService", merged(ISVC, runtime={"image": "x", "engine": "triton"})),
        "spec.runtime.engine",
    ),
    (
        "isvc-llm-max-model-len-tiny",
        obj(
            "InferenceService",
            merged(ISVC, runtime={"image": "x", "engine": "vllm", "llm": {"maxModelLen": 8}}),
        ),
        "spec.runtime.llm.maxModelLen",
    ),
    (
        "isvc-llm-feature-groups",
        obj(
            "InferenceService",
            merged(ISVC, runtime={"image": "x", "engine": "vllm"}, featureGroups=[{"name": "fg"}]),
        ),
        "featureGroups apply to runtime.engine kiln",
    ),
    (
        "isvc-metric-query-and-template",
        obj(
            "InferenceService",
            merged(
                ISVC,
                rollout={
                    "analysis": {
                        "prometheus": {"address": "http://p:9090"},
                        "metrics": [{"name": "m", "query": "up", "template": "LLMErrorRatio", "max": 1}],
                    }
                },
            ),
        ),
        "a metric needs exactly one of query, template",
    ),
    (
        "isvc-metric-template-unknown",
        obj(
            "InferenceService",
            merged(
                ISVC,
                rollout={
                    "analysis": {
                        "prometheus": {"address": "http://p:9090"},
                        "metrics": [{"name": "m", "template": "TokensPerSecond", "max": 1}],
                    }
                },
            ),
        ),
        "spec.rollout.analysis.metrics[0].template",
    ),
    # missing required fields
    ("tj-no-image", obj("TrainingJob", {"dataset": {"builtin": "sklearn-digits"}}), "spec.image"),
    ("isvc-no-runtime", obj("InferenceService", {"modelRef": {"name": "d", "version": 1}}), "spec.runtime"),
]


def _message(e: ApiException) -> str:
    try:
        return json.loads(e.body)["message"]
    except (ValueError, KeyError, TypeError):
        return str(e.body)


@pytest.mark.parametrize(("manifest", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_with_field_named(kube, namespace, kiln_crds, manifest, fragment):
    body = copy.deepcopy(manifest)
    body["metadata"]["namespace"] = namespace
    with pytest.raises(ApiException) as err:
        create(kube, body)
    assert err.value.status == 422, _message(err.value)
    assert fragment in _message(err.value)


@pytest.mark.parametrize(
    ("kind", "spec", "change", "fragment"),
    [
        ("TrainingJob", TJ, {"numNodes": 4}, "numNodes is immutable"),
        ("TrainingJob", TJ, {"image": "other:1"}, "image is immutable"),
        ("TrainingJob", TJ, {"dataset": {"uri": "/d.csv", "labelColumn": "y"}}, "dataset is immutable"),
    ],
    ids=["numNodes", "image", "dataset"],
)
def test_immutable_fields(kube, namespace, kiln_crds, kind, spec, change, fragment):
    body = obj(kind, copy.deepcopy(spec))
    body["metadata"]["namespace"] = namespace
    create(kube, body)
    with pytest.raises(ApiException) as err:
        patch(kube, API_VERSION, kind, namespace, "bad", {"spec": change})
    assert err.value.status == 422
    assert fragment in _message(err.value)
    # mutable fields still change
    patch(kube, API_VERSION, kind, namespace, "bad", {"spec": {"suspend": True}})


def test_valid_examples_are_accepted(kube, namespace, kiln_crds):
    """The documented examples pass the same admission (server-side dry run)."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    for f in sorted([*examples.glob("*.yaml"), *examples.glob("llm/*.yaml")]):
        doc = yaml.safe_load(f.read_text())
        doc["metadata"]["namespace"] = namespace
        request(
            kube, "POST", path(doc["apiVersion"], doc["kind"], namespace), body=doc, query=[("dryRun", "All")]
        )


# Names the children cannot carry (kiln.api.names): (id, kind, name, spec, message fragment).
REJECTED_NAMES: list[tuple[str, str, str, dict[str, Any], str]] = [
    (
        "tj-digit-first",
        "TrainingJob",
        "1st-run",
        TJ,
        "metadata.name: Invalid value: TrainingJob name must start with a lowercase letter "
        "(a DNS-1035 label): it names the job's headless Service and its pods' hostnames",
    ),
    ("tj-dot", "TrainingJob", "run.v1", TJ, "TrainingJob name must not contain '.'"),
    (
        "tj-1-node-57",
        "TrainingJob",
        "a" * 57,
        TJ,
        "metadata.name: Invalid value: TrainingJob name too long for numNodes: pod hostnames "
        "<name>-node-<i> must fit in 63 characters (a DNS-1123 label), so the name may have at most 56 "
        "with up to 10 nodes, 55 with up to 100 nodes, 54 with up to 256 nodes",
    ),
    (
        "tj-11-nodes-56",
        "TrainingJob",
        "a" * 56,
        merged(TJ, numNodes=11),
        "TrainingJob name too long for numNodes",
    ),
    (
        "tj-256-nodes-55",
        "TrainingJob",
        "a" * 55,
        merged(TJ, numNodes=256),
        "TrainingJob name too long for numNodes",
    ),
    (
        "isvc-digit-first",
        "InferenceService",
        "1st-model",
        ISVC,
        "InferenceService name must start with a lowercase letter",
    ),
    ("isvc-dot", "InferenceService", "digits.v1", ISVC, "InferenceService name must not contain '.'"),
    (
        "isvc-64",
        "InferenceService",
        "a" * 64,
        ISVC,
        "metadata.name: Invalid value: InferenceService name must be at most 63 characters: "
        "it names its Service",
    ),
    (
        "fg-53",
        "FeatureGroup",
        "a" * 53,
        FG,
        "FeatureGroup name must be at most 52 characters: it names the group's materialization CronJob",
    ),
]

# The longest (or otherwise boundary) names that must still be accepted.
ACCEPTED_NAMES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("tj-1-node-56", "TrainingJob", "a" * max_name_length(1), TJ),
    ("tj-10-nodes-56", "TrainingJob", "a" * max_name_length(10), merged(TJ, numNodes=10)),
    ("tj-11-nodes-55", "TrainingJob", "a" * max_name_length(11), merged(TJ, numNodes=11)),
    ("tj-256-nodes-54", "TrainingJob", "a" * max_name_length(256), merged(TJ, numNodes=256)),
    ("isvc-63", "InferenceService", "a" * 63, ISVC),
    ("fg-52", "FeatureGroup", "a" * 52, FG),
    ("fg-digit-first", "FeatureGroup", "1st-features", FG),
    # no child takes a Model's name: none of the rules apply
    ("model-digit-first-with-dot", "Model", "1st.model", {}),
    ("model-253", "Model", "m" * 253, {}),
]


def _named(kind: str, name: str, spec: dict[str, Any], namespace: str) -> dict[str, Any]:
    body = obj(kind, copy.deepcopy(spec))
    body["metadata"] = {"name": name, "namespace": namespace}
    return body


@pytest.mark.parametrize(
    ("kind", "name", "spec", "fragment"), [c[1:] for c in REJECTED_NAMES], ids=[c[0] for c in REJECTED_NAMES]
)
def test_names_children_cannot_carry_are_rejected(kube, namespace, kiln_crds, kind, name, spec, fragment):
    with pytest.raises(ApiException) as err:
        create(kube, _named(kind, name, spec, namespace))
    assert err.value.status == 422, _message(err.value)
    assert fragment in _message(err.value), _message(err.value)


@pytest.mark.parametrize(
    ("kind", "name", "spec"), [c[1:] for c in ACCEPTED_NAMES], ids=[c[0] for c in ACCEPTED_NAMES]
)
def test_boundary_names_are_accepted_and_stay_updatable(kube, namespace, kiln_crds, kind, name, spec):
    assert create(kube, _named(kind, name, spec, namespace)) is not None
    # the rules hold on create only: updates (labels, status, finalizers) never re-check the name
    patch(kube, API_VERSION, kind, namespace, name, {"metadata": {"labels": {"kiln.dev/test": "updated"}}})
    stored = get(kube, API_VERSION, kind, namespace, name)
    assert stored is not None and stored["metadata"]["labels"]["kiln.dev/test"] == "updated"
