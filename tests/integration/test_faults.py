"""Faults on the real API server: the operator killed mid-write, kube-apiserver restarted, 409s.

Each test drives a run through a fault and checks that it ends as an undisturbed run ends: one
gang of pods (the same pods where they already existed), one registered version, one history
entry per event, the rollout at the step it had reached.

The operator runs as ``kiln operator`` in its own process (as in a pod). It is killed at an exact
point of a reconcile by a failpoint (:mod:`kiln.failpoints`, ``KILN_FAILPOINTS``): the process
sends itself SIGKILL there, so nothing is flushed, released or retried. A second process without
the failpoint then takes over, as the Deployment's replacement pod would.
"""

from __future__ import annotations

import copy
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kiln import API_VERSION
from kiln import kube as kiln_kube
from kiln.conditions import get_condition

from .conftest import HACK_CLUSTER, REPO
from .helpers import OperatorProcess, finish_pod, wait_for
from .test_inferenceservice import (
    create_isvc,
    create_model,
    deployment,
    set_production,
    store,  # noqa: F401 - the fixture
    wait_status,
)
from .test_trainingjob import JOB, get_job, make_job, pods, result_message, running_gang

#: One GPU per pod: the two kwok GPU nodes (8 GPUs each) hold every gang these tests create.
SMALL = {"requests": {"cpu": "100m", "nvidia.com/gpu": 1}, "limits": {"cpu": "100m", "nvidia.com/gpu": 1}}


def start(cluster: Any, ns: str, tmp: Path, name: str, failpoint: str | None = None) -> OperatorProcess:
    """A ``kiln operator`` process watching ``ns`` (no leader election: one process at a time)."""
    env = {"KILN_FAILPOINTS": failpoint} if failpoint else {}
    return OperatorProcess(
        cluster.kubeconfig, ["--standalone", f"--namespace={ns}"], tmp / f"{name}.log", name, ns, env=env
    )


def died_at(proc: OperatorProcess, failpoint: str, timeout: float = 90) -> None:
    """Wait for ``proc`` to kill itself at ``failpoint`` (exit by SIGKILL, the failpoint's line logged)."""
    try:
        code = proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the operator did not reach failpoint {failpoint}:\n{proc.log()[-3000:]}"
        ) from None
    assert code == -signal.SIGKILL, f"exit {code}:\n{proc.log()[-3000:]}"
    assert f"failpoint {failpoint}" in proc.log()


def live_pods(api: client.ApiClient, ns: str, job: str = "digits") -> dict[str, str]:
    return {
        p["metadata"]["name"]: p["metadata"]["uid"]
        for p in pods(api, ns, job)
        if not p["metadata"].get("deletionTimestamp")
    }


def undisturbed(st: dict[str, Any]) -> None:
    """The counters of a gang that was neither restarted nor disrupted."""
    assert (st.get("gang"), st.get("restartCount"), st.get("disruptionCount")) == (0, 0, 0), st


def model_status(api: client.ApiClient, ns: str) -> dict[str, Any]:
    return (kiln_kube.get(api, API_VERSION, "Model", ns, "digits") or {}).get("status") or {}


def create_empty_model(api: client.ApiClient, ns: str) -> None:
    body = {"apiVersion": API_VERSION, "kind": "Model", "metadata": {"name": "digits", "namespace": ns}}
    assert kiln_kube.create(api, {**body, "spec": {}}) is not None


# --------------------------------------------------------------------------------------------


def test_killed_mid_gang_creation_completes_the_same_gang(cluster, kube, namespace, kiln_crds, tmp_path):
    ns = namespace
    first = start(cluster, ns, tmp_path, "op-1", "trainingjob-pod-created")
    try:
        make_job(kube, ns, numNodes=3, resourcesPerNode=SMALL)
        died_at(first, "trainingjob-pod-created")
    finally:
        first.stop()
    created = live_pods(kube, ns)
    assert 1 <= len(created) <= 3
    assert not (get_job(kube, ns).get("status") or {}).get("startTime")  # the status write never came

    second = start(cluster, ns, tmp_path, "op-2")
    try:
        running_gang(kube, ns, 0, n=3)
        st = wait_for(
            lambda: (s := get_job(kube, ns).get("status") or {}).get("phase") == "Running" and s,
            60,
            message="Running",
        )
    finally:
        second.stop()
    undisturbed(st)
    assert st["createdGang"] == 0
    after = live_pods(kube, ns)
    assert sorted(after) == [f"digits-node-{i}" for i in range(3)]
    assert {n: after[n] for n in created} == created  # the pods made before the kill were kept


def test_killed_mid_registration_registers_once(cluster, kube, namespace, kiln_crds, tmp_path):
    ns = namespace
    create_empty_model(kube, ns)
    first = start(cluster, ns, tmp_path, "op-1", "trainingjob-registered")
    try:
        make_job(kube, ns, modelRef={"name": "digits"})
        running_gang(kube, ns, 0)
        finish_pod(kube, ns, "digits-node-1", exit_code=0)
        finish_pod(kube, ns, "digits-node-0", exit_code=0, message=result_message())
        died_at(first, "trainingjob-registered")
    finally:
        first.stop()
    # the Model has the version, the job does not know it
    assert [v["version"] for v in model_status(kube, ns)["versions"]] == [1]
    assert (get_job(kube, ns).get("status") or {}).get("registeredVersion") is None

    second = start(cluster, ns, tmp_path, "op-2")
    try:
        job = wait_for(
            lambda: (j := get_job(kube, ns)).get("status", {}).get("registeredVersion") == 1 and j,
            60,
            message="registeredVersion 1",
        )
    finally:
        second.stop()
    ready = get_condition(job["status"]["conditions"], "Ready")
    assert ready["status"] == "True" and "version 1" in ready["message"], ready
    undisturbed(job["status"])
    st = model_status(kube, ns)
    assert [v["version"] for v in st["versions"]] == [1] and st["latestVersion"] == 1
    assert st["versions"][0]["lineage"]["trainingJob"] == "digits"
    registrations = [e for e in st.get("history") or [] if e.get("cause") == "Registration"]
    assert len(registrations) <= 1, st.get("history")


def test_killed_mid_canary_step_resumes_at_that_step(cluster, kube, namespace, kiln_crds, store, tmp_path):  # noqa: F811
    ns = namespace
    v1, v2 = store.version(1), store.version(2)
    steps = [{"weight": 20, "pauseSeconds": 1}, {"weight": 60, "pauseSeconds": 3600}]
    first = start(cluster, ns, tmp_path, "op-1", "inferenceservice-step-applied")
    try:
        create_model(kube, ns, [v1], production=1)
        create_isvc(kube, ns, replicas=5, rollout={"steps": steps})
        wait_status(kube, ns, lambda s: s.get("stableVersion") == 1, message="stable 1")
        set_production(kube, ns, [v1, v2], production=2)
        # the canary's first traffic shift (0 -> 20%: its pods became ready) is applied, then the
        # operator dies before the status says so
        died_at(first, "inferenceservice-step-applied")
    finally:
        first.stop()
    before = wait_status(kube, ns, lambda s: s.get("canaryVersion") == 2, message="canary 2")
    assert (before["currentStep"], before["canaryWeight"]) == (0, 0), before

    second = start(cluster, ns, tmp_path, "op-2")
    try:
        after = wait_status(
            kube, ns, lambda s: s.get("currentStep") == 1 and s.get("stepStartTime"), 60, message="step 2"
        )
    finally:
        second.stop()
    assert (after["canaryVersion"], after["canaryWeight"], after["rolloutPhase"]) == (2, 60, "Progressing")
    assert after["stableVersion"] == 1
    assert deployment(kube, ns, "canary")["spec"]["replicas"] == 3
    assert deployment(kube, ns, "stable")["spec"]["replicas"] == 2
    # one history entry per rollout event, as an undisturbed run writes them
    entries = [(h["phase"], h.get("fromVersion"), h.get("toVersion")) for h in after.get("history") or []]
    assert entries.count(("Progressing", 1, 2)) == 1, after.get("history")
    assert len(entries) == len(set(entries)), after.get("history")


def test_kube_apiserver_restart_while_reconciling(cluster, kube, namespace, kiln_crds, tmp_path):
    """SIGKILL kube-apiserver while gangs are being created; the watches and the work queue
    recover by themselves and every job ends with exactly one gang."""
    ns = namespace
    op = start(cluster, ns, tmp_path, "op")
    try:
        wait_for(op.healthy, 60, message="operator /healthz")
        names = [f"job-{i}" for i in range(6)]
        for n in names[:3]:
            _make_named(kube, ns, n)
        restart = subprocess.run(
            [str(HACK_CLUSTER), "restart", "kube-apiserver", "--kill"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert restart.returncode == 0, restart.stderr[-3000:]
        for n in names[3:]:  # created after the restart: the watch must have come back
            _make_named(kube, ns, n)
        for n in names:
            running_gang_of(kube, ns, n)
            st = wait_for(
                lambda n=n: (s := get_job(kube, ns, n).get("status") or {}).get("phase") == "Running" and s,
                90,
                message=f"{n} Running",
            )
            undisturbed(st)
        assert op.proc.poll() is None, "the operator exited:\n" + op.log()[-3000:]
        for n in names:
            assert sorted(live_pods(kube, ns, n)) == [f"{n}-node-0", f"{n}-node-1"]
    finally:
        op.stop()
    print(f"\n{restart.stderr.strip().splitlines()[-1]}")


def test_storm_of_conflicting_writers(cluster, kube, namespace, kiln_crds, tmp_path):
    """Writers bump the TrainingJob's and the Model's resourceVersion many times a second while the
    job runs, finishes and registers: status writes lose 409s and are decided again, and the
    end state is an undisturbed run's."""
    ns = namespace
    create_empty_model(kube, ns)
    op = start(cluster, ns, tmp_path, "op")
    stop = threading.Event()
    bumps = {"TrainingJob": 0, "Model": 0}

    def bump(kind: str) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                kube_patch(kube, ns, kind, {"metadata": {"annotations": {"test.kiln.dev/bump": str(i)}}})
                bumps[kind] += 1
            except client.ApiException as e:
                if e.status != 404:
                    raise

    writers = [threading.Thread(target=bump, args=(k,), daemon=True) for k in ("TrainingJob", "Model") * 2]
    try:
        make_job(kube, ns, modelRef={"name": "digits"})
        for w in writers:
            w.start()
        running_gang(kube, ns, 0)
        finish_pod(kube, ns, "digits-node-1", exit_code=0)
        finish_pod(kube, ns, "digits-node-0", exit_code=0, message=result_message())
        job = wait_for(
            lambda: (j := get_job(kube, ns)).get("status", {}).get("registeredVersion") == 1 and j,
            120,
            message="registeredVersion 1 under the storm",
        )
        stop.set()
        for w in writers:
            w.join(10)
        conflicts = _sample(op, "kiln_status_writes_total", 'result="conflict"')
        assert op.proc.poll() is None, op.log()[-3000:]
    finally:
        stop.set()
        op.stop()
    assert conflicts > 0, "the storm produced no 409: this test exercised nothing"
    undisturbed(job["status"])
    assert job["status"]["phase"] == "Succeeded"
    assert sorted(p["metadata"]["name"] for p in pods(kube, ns)) == ["digits-node-0", "digits-node-1"]
    st = model_status(kube, ns)
    assert [v["version"] for v in st["versions"]] == [1] and st["latestVersion"] == 1
    print(f"\n409 storm: {sum(bumps.values())} concurrent writes, {conflicts:.0f} status writes lost a 409")


# --------------------------------------------------------------------------------------------


def _make_named(api: client.ApiClient, ns: str, name: str) -> None:
    body = copy.deepcopy(JOB)
    body["metadata"] = {"name": name, "namespace": ns}
    body["spec"]["resourcesPerNode"] = SMALL
    assert kiln_kube.create(api, body) is not None


def running_gang_of(api: client.ApiClient, ns: str, job: str) -> None:
    def ready() -> bool:
        ps = [p for p in pods(api, ns, job) if not p["metadata"].get("deletionTimestamp")]
        return len(ps) == 2 and all(p["status"].get("phase") == "Running" for p in ps)

    wait_for(ready, 90, message=f"{job}'s gang running")


def kube_patch(api: client.ApiClient, ns: str, kind: str, body: dict[str, Any]) -> None:
    kiln_kube.patch(api, API_VERSION, kind, ns, "digits", body)


def _sample(proc: OperatorProcess, name: str, label: str) -> float:
    """Sum of the samples of ``name`` whose labels contain ``label``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


pytestmark = pytest.mark.timeout(300)
