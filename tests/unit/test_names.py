"""Admission rules on metadata.name (kiln.api.names): where they are, and that the limits fit the
children's names. The API server evaluating them is tests/integration/test_admission.py."""

from __future__ import annotations

import pytest

from kiln.api import KIND_BY_NAME
from kiln.api.crd import crd_for
from kiln.api.names import CRONJOB_NAME_MAX, DNS_LABEL_MAX
from kiln.api.trainingjob import max_name_length
from kiln.resources import inferenceservice as isvc
from kiln.resources.trainingjob import pod_name, service_name


def _root(kind: str) -> dict:
    return crd_for(KIND_BY_NAME[kind])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize(
    ("num_nodes", "limit"), [(1, 56), (10, 56), (11, 55), (100, 55), (101, 54), (256, 54)]
)
def test_trainingjob_limit_makes_the_last_hostname_exactly_63(num_nodes, limit):
    assert max_name_length(num_nodes) == limit
    name = "a" * limit
    assert len(pod_name(name, num_nodes - 1)) == DNS_LABEL_MAX
    assert len(service_name(name)) <= DNS_LABEL_MAX


def test_inferenceservice_children_fit_a_63_character_name():
    name = "a" * DNS_LABEL_MAX
    assert isvc.service_name(name) == name
    for track in (isvc.STABLE, isvc.CANARY):
        assert len(isvc.deployment_name(name, track)) <= DNS_LABEL_MAX
        assert len(isvc.track_service_name(name, track)) <= DNS_LABEL_MAX


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("TrainingJob", ["matches('^[a-z]')", "contains('.')", "self.spec.numNodes - 1"]),
        ("InferenceService", ["matches('^[a-z]')", "contains('.')", f"size() <= {DNS_LABEL_MAX}"]),
        ("FeatureGroup", [f"size() <= {CRONJOB_NAME_MAX}"]),
    ],
)
def test_name_rules_sit_at_the_root_and_apply_on_create_only(kind, fragments):
    rules = _root(kind)["x-kubernetes-validations"]
    assert len(rules) == len(fragments)
    for rule, fragment in zip(rules, fragments, strict=True):
        assert fragment in rule["rule"] and "metadata.name" in rule["rule"]
        assert rule["rule"].startswith("oldSelf.hasValue() || ") and rule["optionalOldSelf"] is True
        assert rule["message"].startswith(f"{kind} name must") or "too long" in rule["message"]


def test_model_name_is_limited_only_with_retraining():
    # A Model names no child, except the kiln.dev/model label of its retraining TrainingJobs.
    (rule,) = _root("Model")["x-kubernetes-validations"]
    assert rule["rule"] == f"!has(self.spec.retraining) || self.metadata.name.size() <= {DNS_LABEL_MAX}"
    assert rule["fieldPath"] == ".metadata.name"
