"""TrainingJob builders and the pure gang logic (no cluster)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kiln.api.trainingjob import TrainingJobSpec
from kiln.artifact import TrainingResult, format_termination_message
from kiln.conditions import get_condition, is_true, rfc3339
from kiln.gang import backoff_seconds, plan, view
from kiln.resources import trainingjob as build
from kiln.resources.storage import StorageDefaults
from tests.unit.golden import assert_golden

GOLDEN = Path(__file__).parent / "golden"
T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32


def job(spec: dict | None = None, status: dict | None = None) -> dict:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {
            "name": "digits",
            "namespace": "ml",
            "uid": "uid-1",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": spec or SPEC,
        "status": status or {},
    }


SPEC = {
    "modelRef": {"name": "digits"},
    "image": "kiln/trainer:dev",
    "dataset": {"builtin": "sklearn-digits"},
    "hyperparameters": {"epochs": 30, "learningRate": 0.001},
    "numNodes": 2,
    "resourcesPerNode": {"limits": {"nvidia.com/gpu": 8, "cpu": "16", "memory": "64Gi"}},
    "nodeSelector": {"kiln.dev/pool": "gpu"},
    "maxRestarts": 2,
}


def golden(name: str, obj: Any) -> None:
    assert_golden(GOLDEN, name, obj)


def spec(**over) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate({**SPEC, **over})


# --- builders ---------------------------------------------------------------------------------


def test_pod_golden():
    golden("trainingjob-pod-rank1", build.pod(job(), spec(), rank=1, gang=0))


def test_service_golden():
    golden("trainingjob-service", build.service(job()))


def test_pod_env_is_torchrun_env():
    env = {
        e["name"]: e["value"]
        for e in build.pod(job(), spec(), rank=1, gang=3)["spec"]["containers"][0]["env"]
    }
    assert env["PET_NNODES"] == "2"
    assert env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_NODE_RANK"] == "1"
    assert env["PET_MASTER_ADDR"] == "digits-node-0.digits.ml.svc"
    assert env["PET_MASTER_PORT"] == "29500"


def test_pods_are_named_per_node_and_owned():
    pods = build.pods(job(), spec(), gang=0)
    assert [p["metadata"]["name"] for p in pods] == ["digits-node-0", "digits-node-1"]
    for p in pods:
        ref = p["metadata"]["ownerReferences"][0]
        assert ref["controller"] and ref["uid"] == "uid-1" and ref["kind"] == "TrainingJob"
        assert p["spec"]["restartPolicy"] == "Never"
        assert p["spec"]["subdomain"] == "digits"


@pytest.mark.parametrize(
    ("resources", "nproc", "expected"),
    [
        (None, "auto", 1),
        ({"limits": {"nvidia.com/gpu": 4}}, "auto", 4),
        ({"requests": {"amd.com/gpu": "2"}, "limits": {"amd.com/gpu": "2"}}, "auto", 2),
        ({"limits": {"cpu": "8"}}, "auto", 1),
        ({"limits": {"nvidia.com/gpu": 4}}, 2, 2),
    ],
)
def test_num_proc_per_node(resources, nproc, expected):
    s = spec(resourcesPerNode=resources, numProcPerNode=nproc)
    assert build.resolve_nproc_per_node(s) == expected


def test_gpu_toleration_added_once():
    tols = build.pod(job(), spec(), 0, 0)["spec"]["tolerations"]
    assert tols == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    own = [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}]
    assert build.pod(job(), spec(tolerations=own), 0, 0)["spec"]["tolerations"] == own
    cpu = spec(resourcesPerNode={"limits": {"cpu": "4"}})
    assert "tolerations" not in build.pod(job(), cpu, 0, 0)["spec"]


def test_output_volume_is_mounted_at_uri_path():
    s = spec(
        output={"uri": "file:///mnt/artifacts", "volume": {"persistentVolumeClaim": {"claimName": "art"}}}
    )
    p = build.pod(job(), s, 0, 0)
    mounts = {m["name"]: m["mountPath"] for m in p["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["output"] == "/mnt/artifacts"
    vol = next(v for v in p["spec"]["volumes"] if v["name"] == "output")
    assert vol["persistentVolumeClaim"] == {"claimName": "art"}


# --- gang logic -------------------------------------------------------------------------------


def pod(
    rank: int,
    phase: str = "Running",
    gang: int = 0,
    exit_code: int | None = None,
    message: str = "",
    reason: str | None = None,
    conditions: list | None = None,
    deleting: bool = False,
) -> dict:
    p = build.pod(job(), spec(), rank, gang)
    p["metadata"]["uid"] = f"pod-{gang}-{rank}"
    status: dict = {"phase": phase, "conditions": conditions or []}
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                        "message": message,
                    }
                },
            }
        ]
    elif reason:
        status["reason"] = reason
    p["status"] = status
    if deleting:
        p["metadata"]["deletionTimestamp"] = rfc3339(T0)
    return p


RESULT = format_termination_message(
    TrainingResult(artifactUri="file:///a/digits/digits", digest=DIGEST, metrics={"accuracy": 0.97})
)


def test_new_job_creates_gang():
    p = plan(job(), spec(), [], T0)
    assert p.create_gang and not p.delete_pods
    assert p.status["startTime"] == rfc3339(T0)
    assert is_true(p.status["conditions"], "Created")
    assert get_condition(p.status["conditions"], "Ready")["status"] == "False"


def test_all_running_sets_running():
    p = plan(job(status={"gang": 0, "startTime": rfc3339(T0)}), spec(), [pod(0), pod(1)], T0)
    assert not p.create_gang and p.status["phase"] == "Running"
    assert is_true(p.status["conditions"], "Running")
    assert p.status["nodes"] == {"pending": 0, "running": 2, "succeeded": 0, "failed": 0}


def test_pod_failure_restarts_whole_gang_with_backoff():
    st = {"gang": 0, "startTime": rfc3339(T0), "restartCount": 0}
    p = plan(job(status=st), spec(), [pod(0), pod(1, "Failed", exit_code=1, message="boom")], T0)
    assert sorted(n for n, _ in p.delete_pods) == ["digits-node-0", "digits-node-1"]
    assert p.status["gang"] == 1 and p.status["restartCount"] == 1
    assert p.status["lastFailure"]["exitCode"] == 1 and p.status["lastFailure"]["pod"] == "digits-node-1"
    assert p.status["nextRestartTime"] == rfc3339(T0 + timedelta(seconds=10))
    assert is_true(p.status["conditions"], "Restarting") and p.requeue_after == 10
    # old pods still terminating: wait, do not create
    p2 = plan(job(status=p.status), spec(), [pod(0, deleting=True), pod(1, "Failed", exit_code=1)], T0)
    assert not p2.create_gang and p2.requeue_after == 1.0
    # gone, but back-off not over
    p3 = plan(job(status=p.status), spec(), [], T0 + timedelta(seconds=5))
    assert not p3.create_gang and p3.requeue_after == 5
    # back-off over: the new gang is created
    p4 = plan(job(status=p.status), spec(), [], T0 + timedelta(seconds=10))
    assert p4.create_gang and p4.status["gang"] == 1
    assert not is_true(p4.status["conditions"], "Restarting")


def test_backoff_is_exponential_and_capped():
    s = spec(restartBackoff={"initialSeconds": 10, "maxSeconds": 60})
    assert [backoff_seconds(s, n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_max_restarts_fails_job_and_frees_gpus():
    st = {"gang": 2, "startTime": rfc3339(T0), "restartCount": 2}
    p = plan(
        job(status=st),
        spec(),
        [pod(0, gang=2), pod(1, "Failed", gang=2, exit_code=137, reason="OOMKilled")],
        T0,
    )
    assert is_true(p.status["conditions"], "Failed")
    assert get_condition(p.status["conditions"], "Failed")["reason"] == "BackoffLimitExceeded"
    assert p.status["lastFailure"]["reason"] == "OOMKilled"
    assert [n for n, _ in p.delete_pods] == ["digits-node-0"]  # the running one is deleted
    assert p.status["phase"] == "Failed" and p.status["completionTime"]


def test_disruption_restarts_without_counting():
    st = {"gang": 0, "startTime": rfc3339(T0), "restartCount": 0}
    disrupted = pod(
        1,
        "Failed",
        reason="Evicted",
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
    )
    p = plan(job(status=st), spec(), [pod(0), disrupted], T0)
    assert p.status["restartCount"] == 0 and p.status["disruptionCount"] == 1
    assert p.status["gang"] == 1 and p.requeue_after == 1.0


def test_vanished_pod_of_running_gang_is_a_disruption():
    st = {"gang": 0, "startTime": rfc3339(T0), "createdGang": 0}
    p = plan(job(status=st), spec(), [pod(0)], T0)
    assert p.status["disruptionCount"] == 1 and p.status["gang"] == 1


def test_complete_gang_is_recorded():
    p = plan(job(status={"gang": 3, "startTime": rfc3339(T0)}), spec(), [pod(0, gang=3), pod(1, gang=3)], T0)
    assert p.status["createdGang"] == 3


@pytest.mark.parametrize(
    "status", [{}, {"gang": 0, "startTime": rfc3339(T0)}, {"gang": 0, "createdGang": -1}]
)
def test_partly_created_gang_is_completed_not_restarted(status):
    """Creation interrupted (operator killed between pod creates and the status write) or refused
    (a ResourceQuota admits 1 of 2 pods): the missing pod is created again, the gang is kept, no
    disruption is counted, whatever rank 0 is doing meanwhile."""
    p = plan(job(status=status), spec(), [pod(0, "Running")], T0)
    assert p.create_gang and not p.delete_pods
    assert p.status["gang"] == 0 and p.status["disruptionCount"] == 0
    assert "createdGang" not in p.status or p.status["createdGang"] != 0


def test_success_records_result_and_registers():
    st = {"gang": 0, "startTime": rfc3339(T0)}
    p = plan(job(status=st), spec(), [pod(0, "Succeeded", exit_code=0, message=RESULT), pod(1)], T0)
    assert p.status["result"]["digest"] == DIGEST and p.status["result"]["metrics"] == {"accuracy": 0.97}
    assert p.register is not None and p.register.digest == DIGEST
    assert [n for n, _ in p.delete_pods] == ["digits-node-1"]
    assert get_condition(p.status["conditions"], "Ready")["reason"] == "Registering"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("", "ResultMissing"),
        ("not json", "ResultMalformed"),
        ("{" + "x" * 5000 + "}", "ResultTooLarge"),
        ('{"artifactUri": "file:///a", "digest": "md5:1"}', "ResultMalformed"),
    ],
)
def test_bad_result_fails_with_clear_reason(message, reason):
    st = {"gang": 0, "startTime": rfc3339(T0)}
    p = plan(job(status=st), spec(), [pod(0, "Succeeded", exit_code=0, message=message)], T0)
    assert get_condition(p.status["conditions"], "Failed")["reason"] == reason
    assert p.register is None


def test_terminal_job_never_recreates_and_deletes_running_pods():
    st = {
        "gang": 0,
        "completionTime": rfc3339(T0),
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": ""}],
        "registeredVersion": 1,
        "result": {"artifactUri": "file:///a", "digest": DIGEST, "metrics": {}},
    }
    p = plan(job(status=st), spec(), [], T0)
    assert not p.create_gang and p.register is None
    p2 = plan(job(status=st), spec(), [pod(1)], T0)
    assert [n for n, _ in p2.delete_pods] == ["digits-node-1"] and not p2.create_gang


def test_ttl_after_finished():
    st = {
        "gang": 0,
        "completionTime": rfc3339(T0),
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": ""}],
    }
    s = spec(ttlSecondsAfterFinished=60)
    assert plan(job(status=st), s, [], T0 + timedelta(seconds=30)).requeue_after == 30
    assert plan(job(status=st), s, [], T0 + timedelta(seconds=60)).delete_job


def test_deadline_exceeded():
    st = {"gang": 0, "startTime": rfc3339(T0)}
    s = spec(activeDeadlineSeconds=100)
    p = plan(job(status=st), s, [pod(0), pod(1)], T0 + timedelta(seconds=40))
    assert p.requeue_after == 60
    p = plan(job(status=st), s, [pod(0), pod(1)], T0 + timedelta(seconds=100))
    assert get_condition(p.status["conditions"], "Failed")["reason"] == "DeadlineExceeded"
    assert len(p.delete_pods) == 2


def test_suspend_and_resume():
    st = {"gang": 0, "startTime": rfc3339(T0)}
    p = plan(job(status=st), spec(suspend=True), [pod(0), pod(1)], T0)
    assert len(p.delete_pods) == 2 and is_true(p.status["conditions"], "Suspended")
    assert p.status["phase"] == "Suspended" and "startTime" not in p.status
    resumed = plan(job(status=p.status), spec(), [], T0 + timedelta(seconds=5))
    assert resumed.create_gang and resumed.status["gang"] == 1
    assert not is_true(resumed.status["conditions"], "Suspended")
    assert resumed.status["startTime"] == rfc3339(T0 + timedelta(seconds=5))


def test_suspended_job_reconciled_again_stays_put():
    """Only entering suspension moves the gang on and posts an Event; later reconciles of the
    suspended job change nothing more. A gang without pods is not moved on."""
    st = {"gang": 0, "startTime": rfc3339(T0)}
    first = plan(job(status=st), spec(suspend=True), [pod(0), pod(1)], T0)
    assert first.status["gang"] == 1 and [e[1] for e in first.events] == ["Suspended"]
    terminating = [pod(0, deleting=True), pod(1, deleting=True)]
    again = plan(job(status=first.status), spec(suspend=True), terminating, T0 + timedelta(seconds=5))
    assert again.status["gang"] == 1 and again.events == [] and again.delete_pods == []
    assert again.status["phase"] == "Suspended" and again.status["conditions"] == first.status["conditions"]
    never_started = plan(job(status={"gang": 0}), spec(suspend=True), [], T0)
    assert never_started.status["gang"] == 0 and is_true(never_started.status["conditions"], "Suspended")


def test_partly_created_gang_is_completed_then_pending_until_all_run():
    """Only rank 0 was created (the operator restarted mid-creation): the next plan creates the
    rest without a second GangCreated Event; the job stays Pending until every pod runs."""
    st = {"gang": 0, "startTime": rfc3339(T0)}
    p = plan(job(status=st), spec(), [pod(0, "Pending")], T0)
    assert p.create_gang and p.events == [] and p.status["phase"] == "Pending"
    assert is_true(p.status["conditions"], "Created")
    p = plan(job(status=p.status), spec(), [pod(0), pod(1, "Pending")], T0 + timedelta(seconds=1))
    assert not p.create_gang and p.events == [] and p.status["phase"] == "Pending"
    assert not is_true(p.status["conditions"], "Running")


def test_idempotent_when_nothing_changes():
    st = {"gang": 0, "startTime": rfc3339(T0)}
    first = plan(job(status=st), spec(), [pod(0), pod(1)], T0)
    again = plan(job(status=first.status), spec(), [pod(0), pod(1)], T0 + timedelta(seconds=30))
    assert (
        again.status == first.status and not again.events and not again.create_gang and not again.delete_pods
    )


def test_view_handles_unlabelled_pod():
    v = view({"metadata": {"name": "x"}, "status": {}})
    assert v.rank == -1 and v.gang == -1 and v.phase == "Pending"


POLICY = {
    "rules": [
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
        {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [137, 143]}},
    ]
}


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [(2, "FailJob"), (137, "Ignore"), (1, "Count"), (None, "Count")],
)
def test_failure_action(exit_code, expected):
    from kiln.gang import failure_action

    assert failure_action(spec(podFailurePolicy=POLICY), exit_code) == expected
    assert failure_action(spec(), exit_code) == "Count"
    not_in = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [1, 137]}}]}
    assert failure_action(spec(podFailurePolicy=not_in), 3) == "FailJob"
    assert failure_action(spec(podFailurePolicy=not_in), 1) == "Count"


def test_pod_failure_policy_fail_job_is_immediate():
    st = {"gang": 0, "startTime": rfc3339(T0), "restartCount": 0}
    p = plan(job(status=st), spec(podFailurePolicy=POLICY), [pod(0), pod(1, "Failed", exit_code=2)], T0)
    assert get_condition(p.status["conditions"], "Failed")["reason"] == "PodFailurePolicy"
    assert p.status["restartCount"] == 0 and [n for n, _ in p.delete_pods] == ["digits-node-0"]


def test_pod_failure_policy_ignore_restarts_without_counting():
    st = {"gang": 0, "startTime": rfc3339(T0), "restartCount": 2}  # at maxRestarts already
    p = plan(job(status=st), spec(podFailurePolicy=POLICY), [pod(0), pod(1, "Failed", exit_code=137)], T0)
    assert p.status["restartCount"] == 2 and p.status["gang"] == 1
    assert not is_true(p.status["conditions"], "Failed") and is_true(p.status["conditions"], "Restarting")


# --- object storage ---------------------------------------------------------------------------


def _container(pod: dict) -> dict:
    return pod["spec"]["containers"][0]


def test_s3_output_gets_sdk_env_and_no_output_volume():
    s = spec(
        output={"uri": "s3://kiln-artifacts/models"},
        storage={
            "secretRef": {"name": "team-s3"},
            "endpoint": "http://s3.store.svc:7070",
            "region": "eu-west-1",
        },
    )
    p = build.pod(job(), s, rank=0, gang=0, defaults=StorageDefaults(secret_name="kiln-s3"))
    c = _container(p)
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KILN_OUTPUT_URI"] == "s3://kiln-artifacts/models"
    assert env["AWS_ENDPOINT_URL"] == "http://s3.store.svc:7070" and env["AWS_REGION"] == "eu-west-1"
    assert env["KILN_STAGING_DIR"].startswith("/tmp/")
    assert c["envFrom"] == [{"secretRef": {"name": "team-s3"}}]  # the spec's Secret is required
    assert "output" not in {v["name"] for v in p["spec"]["volumes"]}
    assert not any("AWS_SECRET" in str(e) for e in c["env"])  # secrets only by reference


def test_operator_defaults_fill_what_the_spec_leaves_unset():
    d = StorageDefaults(
        artifact_root="s3://kiln-artifacts/models",
        secret_name="kiln-s3",
        endpoint="http://s3:9000",
        region="us-east-1",
    )
    c = _container(build.pod(job(), spec(), rank=0, gang=0, defaults=d))
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KILN_OUTPUT_URI"] == "s3://kiln-artifacts/models"
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    # The operator's default Secret is optional: a namespace using a workload identity has none.
    assert c["envFrom"] == [{"secretRef": {"name": "kiln-s3", "optional": True}}]


def test_file_output_keeps_its_volume_and_no_sdk_env():
    s = spec(
        output={"uri": "file:///data/artifacts", "volume": {"persistentVolumeClaim": {"claimName": "a"}}}
    )
    p = build.pod(
        job(), s, rank=0, gang=0, defaults=StorageDefaults(secret_name="kiln-s3", endpoint="http://s3")
    )
    c = _container(p)
    assert "envFrom" not in c and not any(e["name"].startswith("AWS_") for e in c["env"])
    assert {"name": "output", "mountPath": "/data/artifacts"} in c["volumeMounts"]


def test_s3_dataset_alone_brings_the_sdk_env():
    s = spec(dataset={"uri": "s3://data/digits.csv", "labelColumn": "label"}, output={"uri": "/out"})
    env = {e["name"] for e in _container(build.pod(job(), s, rank=0, gang=0))["env"]}
    assert "KILN_STAGING_DIR" in env


def test_storage_defaults_from_environ():
    d = StorageDefaults.from_environ(
        {
            "KILN_ARTIFACT_ROOT": "s3://b/p",
            "KILN_STORAGE_SECRET_NAME": "s",
            "AWS_ENDPOINT_URL": "",
            "AWS_REGION": "r",
        }
    )
    assert d == StorageDefaults(artifact_root="s3://b/p", secret_name="s", endpoint=None, region="r")
    assert StorageDefaults.from_environ({}).artifact_root == "file:///var/lib/kiln/artifacts"


def test_gang_whose_creation_was_not_recorded_gets_its_start_time():
    """The status write after creating the gang lost a 409: the next plan records the gang."""
    p = plan(job(status={"gang": 0}), spec(), [pod(0, "Pending"), pod(1, "Pending")], T0)
    assert not p.create_gang and p.status["startTime"] == rfc3339(T0)
    assert is_true(p.status["conditions"], "Created")


def _env(s: TrainingJobSpec, rank: int) -> dict[str, str]:
    return {
        e["name"]: e["value"] for e in build.pod(job(), s, rank=rank, gang=0)["spec"]["containers"][0]["env"]
    }


def test_pod_env_is_pytorchjob_env_for_scripts_without_torchrun():
    """What Kubeflow's PyTorchJob sets (training-operator setPodEnv): WORLD_SIZE = nodes x
    processes per node, RANK = node rank; LOCAL_* only when one process per pod makes them exact."""
    env = _env(spec(), rank=1)  # 8 GPUs per node: numProcPerNode auto -> 8
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("digits-node-0.digits.ml.svc", "29500")
    assert (env["WORLD_SIZE"], env["RANK"]) == ("16", "1")
    assert "LOCAL_RANK" not in env and "LOCAL_WORLD_SIZE" not in env  # per process: the launcher's
    one = spec(numProcPerNode=1, resourcesPerNode={"limits": {"cpu": "1"}})
    for rank in (0, 1):
        env = _env(one, rank)
        assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
            "2",
            str(rank),
            "0",
            "1",
        )
        assert env["PET_NODE_RANK"] == env["RANK"] and env["PET_NNODES"] == env["WORLD_SIZE"]


def test_user_env_comes_after_and_overrides_the_distributed_env():
    s = spec(env=[{"name": "MASTER_PORT", "value": "23456"}])
    names = [e["name"] for e in build.pod(job(), s, rank=0, gang=0)["spec"]["containers"][0]["env"]]
    assert names.index("MASTER_PORT") < len(names) - 1 and names[-1] == "MASTER_PORT"


def test_blocked_gang_is_not_created_and_says_why():
    """A gang that is due but cannot be built (its FeatureGroup is missing) stays uncreated:
    Pending, Ready=False with the blocker's reason, looked at again later; no deadline clock."""
    why = ("FeatureGroupNotFound", "FeatureGroup activity (dataset.featureGroupRef) does not exist")
    p = plan(job(), spec(), [], T0, blocked=why)
    assert not p.create_gang and p.status["phase"] == "Pending" and "startTime" not in p.status
    ready = get_condition(p.status["conditions"], "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", *why)
    assert p.requeue_after == 15.0
    # a running gang is not disturbed by a blocker (it only stops creations)
    st = {"gang": 0, "startTime": rfc3339(T0), "createdGang": 0}
    p = plan(job(status=st), spec(), [pod(0), pod(1)], T0, blocked=why)
    assert not p.delete_pods and p.status["phase"] == "Running"
