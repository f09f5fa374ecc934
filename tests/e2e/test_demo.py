"""The README's demo, end to end on the real node, with assertions on what it measured.

Runs hack/demo.py (the same code path as `make demo`): images built from images/*/Dockerfile
and imported, Kiln installed with helm, 2-pod DDP training, registration, promotion, serving
through the Service, a canary under load analysed by Prometheus (Kubernetes discovery of what the
ServiceMonitor selects) and promoted, a broken version rolled back; then the bring-your-own-model
example (examples/cnn: a user's DDP script in 2 pods, torch.export, served); a FeatureGroup
materialized into Redis by Jobs on the real node, a version trained on its point-in-time join and
served by entity key; and the monitoring loop (drifted traffic -> alert -> retraining -> a new version
canaried, no human in it). The helm release is removed
afterwards so the operator it installed never meets the integration tests' objects.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Cluster, run_demo

DEMO_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def demo(real_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_demo(tmp_path_factory.mktemp("demo") / "demo.json", timeout=DEMO_TIMEOUT_S)


def test_every_step_succeeded(demo: dict) -> None:
    failed = [s for s in demo["steps"] if not s["ok"]]
    assert not failed, failed
    assert demo["ok"] and demo["returncode"] == 0
    names = " ".join(s["name"] for s in demo["steps"])
    for n in ("1.", "2.", "3.", "4.", "5.", "6.", "7.", "8.", "9.", "10.", "11."):
        assert n in names


def test_training_registered_an_accurate_version(demo: dict) -> None:
    f = demo["figures"]
    assert f["v1: registered accuracy"] >= 0.9
    assert (
        f["v1: apply -> pods Running s"]
        < f["v1: apply -> training done s"]
        <= f["v1: apply -> version registered s"]
    )


def test_answers_through_the_service_match_the_registered_accuracy(demo: dict) -> None:
    f = demo["figures"]
    assert abs(f["v1: accuracy measured through the Service"] - f["v1: registered accuracy"]) <= 0.005


def test_canary_rollout_lost_no_request(demo: dict) -> None:
    f = demo["figures"]
    assert f["v2: requests during rollout"] > 100
    assert f["v2: failed requests during rollout (target 0)"] == 0


def test_broken_version_rolled_back(demo: dict) -> None:
    f = demo["figures"]
    assert f["v3: requests failed by the broken canary"] > 0  # the fault injection really ran
    assert f["v3: failing analysis -> rollback complete s"] is not None
    assert f["v3: failed/non-v2 answers after rollback"] == 0


def test_own_cnn_registered_and_served(demo: dict) -> None:
    f = demo["figures"]
    assert f["cnn: registered accuracy"] >= 0.9
    assert "(torch-export)" in f["cnn: artifact"]
    assert abs(f["cnn: accuracy measured through the Service"] - f["cnn: registered accuracy"]) <= 0.005


def test_feature_store_training_and_serving_see_the_same_features(demo: dict) -> None:
    f = demo["figures"]
    assert f["features: rows written to Redis"] == 1797  # each digit's latest row, once
    assert f["features: registered accuracy"] >= 0.9
    # trained on the point-in-time join, served from Redis by digit_id: the same numbers
    assert (
        abs(f["features: accuracy by entity key through the Service"] - f["features: registered accuracy"])
        <= 0.005
    )


def test_drift_closes_the_loop(demo: dict) -> None:
    f = demo["figures"]
    assert (
        f["drift: share before (in-distribution traffic)"]
        < 0.5
        < f["drift: share while inverted digits are served"]
    )
    assert (
        f["drift: inverted traffic -> share over 0.5 s"]
        <= f["drift: inverted traffic -> alert firing s"]
        < f["drift: inverted traffic -> new version serving s"]
    )
    assert (
        f["drift: inverted traffic -> retraining job created s"]
        < f["drift: inverted traffic -> new version serving s"]
    )
    assert f["drift: failed requests during the loop"] == 0
