"""TrainingJobs queued in a real Kueue (v0.17.0, hack/cluster) on kwok GPU nodes.

Each test gets its own quota world: two kwok nodes of 8 GPUs each (labelled and tainted for
this test only, so other tests' pods never land there and ours land nowhere else), a
ResourceFlavor pointing at them (node labels + a toleration: Kueue's admission is what places
the pods), a ClusterQueue of 16 GPUs open to the test's namespace only, and a LocalQueue. Jobs
ask for 2 nodes x 4 GPUs each. kwok plays the kubelet; ``finish_pod`` ends pods.

Needs Kueue built (`hack/cluster build --kueue`, or CI's `hack/cluster up --kueue`): skipped
otherwise, a failure under CI=true. The fixture starts it on the running cluster
(`hack/cluster kueue --no-build`, idempotent).

On a cluster shared with other sessions, any other Kiln operator watching all namespaces (an
`operator` fixture elsewhere, a Helm install for the demo) also reconciles these jobs, and one
from a checkout without Kueue support creates their pods at once: the quota checks then fail,
rightly. Run these tests on a cluster of their own there, e.g.
``KILN_CLUSTER_DIR=/tmp/kueue-cluster KILN_CLUSTER_PORT_OFFSET=1000 hack/cluster up --kueue``
with the same two variables set for pytest (and for its ``hack/cluster down`` afterwards).
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kiln import API_VERSION, kube
from kiln.artifact import TrainingResult, format_termination_message
from kiln.conditions import get_condition
from kiln.resources import workload as wl

from .conftest import HACK_CLUSTER, IN_CI, REPO, Cluster
from .helpers import finish_pod, run_operator, wait_for

KUEUE = "kueue.x-k8s.io/v1beta2"
GPUS_PER_NODE = 4
NODES_PER_JOB = 2
QUOTA = 16
TIMEOUT = 90
#: Kueue's kinds this test creates (kiln.kube knows only those the operator touches).
PLURALS = {
    "ResourceFlavor": "resourceflavors",
    "ClusterQueue": "clusterqueues",
    "LocalQueue": "localqueues",
    "WorkloadPriorityClass": "workloadpriorityclasses",
}


@pytest.fixture(scope="module")
def kueue(cluster: Cluster) -> None:
    """Kueue running on the cluster (built: else skip, or fail under CI)."""
    env = json.loads(
        subprocess.run([str(HACK_CLUSTER), "env", "--json"], text=True, capture_output=True, cwd=REPO).stdout
    )
    if not env.get("kueue"):
        reason = "Kueue is not built (hack/cluster build --kueue)"
        if IN_CI:
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    up = subprocess.run([str(HACK_CLUSTER), "kueue", "--no-build"], text=True, capture_output=True, cwd=REPO)
    if up.returncode != 0:
        pytest.fail(f"hack/cluster kueue failed:\n{up.stderr[-4000:]}", pytrace=False)


class World:
    """The test's nodes, ResourceFlavor, ClusterQueue and LocalQueue (cluster-scoped objects
    named with a random suffix, deleted afterwards)."""

    def __init__(self, api: client.ApiClient, ns: str) -> None:
        self.api, self.ns = api, ns
        self.suffix = secrets.token_hex(3)
        self.flavor = f"kiln-gpu-{self.suffix}"
        self.cq = f"kiln-gpus-{self.suffix}"
        self.lq = "team"
        self.nodes = [f"kwok-kueue-{self.suffix}-{i}" for i in range(2)]
        self.priorities: list[str] = []

    def create(self) -> None:
        core = client.CoreV1Api(self.api)
        for name in self.nodes:
            core.create_node(self._node(name))
        taint = {
            "key": "kiln.dev/kueue-test",
            "operator": "Equal",
            "value": self.suffix,
            "effect": "NoSchedule",
        }
        self._create(
            {
                "apiVersion": KUEUE,
                "kind": "ResourceFlavor",
                "metadata": {"name": self.flavor},
                "spec": {"nodeLabels": {"kiln.dev/kueue-test": self.suffix}, "tolerations": [taint]},
            }
        )
        self._create(
            {
                "apiVersion": KUEUE,
                "kind": "ClusterQueue",
                "metadata": {"name": self.cq},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.ns}},
                    "resourceGroups": [
                        {
                            "coveredResources": ["nvidia.com/gpu"],
                            "flavors": [
                                {
                                    "name": self.flavor,
                                    "resources": [{"name": "nvidia.com/gpu", "nominalQuota": QUOTA}],
                                }
                            ],
                        }
                    ],
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                },
            }
        )
        self._create(
            {
                "apiVersion": KUEUE,
                "kind": "LocalQueue",
                "metadata": {"name": self.lq, "namespace": self.ns},
                "spec": {"clusterQueue": self.cq},
            }
        )
        wait_for(self._queue_active, 30, message=f"ClusterQueue {self.cq} Active")

    def priority(self, name: str, value: int) -> str:
        full = f"{name}-{self.suffix}"
        self._create(
            {"apiVersion": KUEUE, "kind": "WorkloadPriorityClass", "metadata": {"name": full}, "value": value}
        )
        self.priorities.append(full)
        return full

    def delete(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        kinds = [("ClusterQueue", self.cq), ("ResourceFlavor", self.flavor)]
        for kind, name in kinds + [("WorkloadPriorityClass", p) for p in self.priorities]:
            try:
                custom.delete_cluster_custom_object("kueue.x-k8s.io", "v1beta2", PLURALS[kind], name)
            except client.ApiException as e:
                if e.status != 404:
                    raise
        core = client.CoreV1Api(self.api)
        for name in self.nodes:
            core.delete_node(name)

    def _create(self, body: dict[str, Any]) -> None:
        custom = client.CustomObjectsApi(self.api)
        ns, plural = body["metadata"].get("namespace"), PLURALS[body["kind"]]
        if ns:
            custom.create_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", ns, plural, body)
        else:
            custom.create_cluster_custom_object("kueue.x-k8s.io", "v1beta2", plural, body)

    def _node(self, name: str) -> dict[str, Any]:
        gpus = {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi", "pods": "110"}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "type": "kwok",
                    "kiln.dev/kueue-test": self.suffix,
                },
            },
            "spec": {
                "taints": [
                    {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                    {"key": "kiln.dev/kueue-test", "value": self.suffix, "effect": "NoSchedule"},
                ]
            },
            "status": {"capacity": gpus, "allocatable": gpus},
        }

    def _cluster_queue(self) -> dict[str, Any]:
        custom = client.CustomObjectsApi(self.api)
        cq: dict[str, Any] = custom.get_cluster_custom_object(
            "kueue.x-k8s.io", "v1beta2", "clusterqueues", self.cq
        )
        return cq

    def _queue_active(self) -> bool:
        active = get_condition((self._cluster_queue().get("status") or {}).get("conditions"), "Active")
        return bool(active and active["status"] == "True")

    def reserved_gpus(self) -> int:
        """GPUs the ClusterQueue has reserved for admitted Workloads (status.flavorsReservation)."""
        cq = self._cluster_queue()
        total = 0
        for f in (cq.get("status") or {}).get("flavorsReservation") or []:
            for r in f.get("resources") or []:
                if r["name"] == "nvidia.com/gpu":
                    total += int(r.get("total", 0))
        return total


@pytest.fixture
def world(
    kueue: None, cluster: Cluster, kiln_crds: list[str], kube: client.ApiClient, namespace: str
) -> Iterator[World]:
    """The test's quota world and the operator, watching the test's namespace only."""
    _ensure_trainingjob_crd(cluster)
    w = World(kube, namespace)
    try:
        w.create()
        with run_operator(cluster.kubeconfig, namespace=namespace):
            yield w
    finally:
        w.delete()


def _ensure_trainingjob_crd(cluster: Cluster) -> None:
    """This checkout's TrainingJob CRD (phase Queued, status.workload), applied again when
    another test session on this shared cluster applied an older one since ``kiln_crds`` ran."""
    crd = REPO / "crds" / "kiln.dev_trainingjobs.yaml"
    phases = cluster.kubectl_run(
        "get",
        "crd",
        "trainingjobs.kiln.dev",
        "-o",
        "jsonpath={.spec.versions[0].schema.openAPIV3Schema.properties.status.properties.phase.enum}",
    ).stdout
    if "Queued" not in phases:
        cluster.kubectl_run(
            "apply", "--server-side", "--force-conflicts", "--field-manager=kiln-tests", f"--filename={crd}"
        )
        cluster.kubectl_run(
            "wait", "--for=condition=Established", "--timeout=60s", "crd/trainingjobs.kiln.dev"
        )


# --- jobs ---------------------------------------------------------------------------------------


def make_job(w: World, name: str, priority: str | None = None) -> None:
    labels = {wl.QUEUE_LABEL: w.lq} | ({wl.PRIORITY_CLASS_LABEL: priority} if priority else {})
    body = {
        "apiVersion": API_VERSION,
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": w.ns, "labels": labels},
        "spec": {
            "image": "kiln-trainer:dev",
            "imagePullPolicy": "Never",
            "dataset": {"builtin": "sklearn-digits"},
            "numNodes": NODES_PER_JOB,
            "resourcesPerNode": {"limits": {"nvidia.com/gpu": GPUS_PER_NODE}},
            "maxRestarts": 0,
        },
    }
    assert kube.create(w.api, body) is not None


def status(w: World, name: str) -> dict[str, Any]:
    job = kube.get(w.api, API_VERSION, "TrainingJob", w.ns, name)
    assert job is not None
    return job.get("status") or {}


def live_pods(w: World, name: str | None = None) -> list[dict[str, Any]]:
    """The job's (every job's) pods that are not being deleted."""
    sel = f"kiln.dev/trainingjob={name}" if name else "kiln.dev/trainingjob"
    return [
        p
        for p in kube.list_objects(w.api, "v1", "Pod", w.ns, sel)
        if not p["metadata"].get("deletionTimestamp")
    ]


def check_quota(w: World) -> None:
    """Never more than the ClusterQueue's GPUs in pods that run or wait to, never part of a gang."""
    by_job: dict[str, int] = {}
    for p in live_pods(w):
        if p["status"].get("phase") not in ("Succeeded", "Failed"):
            job = p["metadata"]["labels"]["kiln.dev/trainingjob"]
            by_job[job] = by_job.get(job, 0) + 1
    assert sum(by_job.values()) * GPUS_PER_NODE <= QUOTA, by_job


def phases(w: World, names: list[str]) -> dict[str, str]:
    check_quota(w)
    return {n: status(w, n).get("phase", "") for n in names}


def wait_phases(w: World, names: list[str], want: dict[str, int], what: str) -> dict[str, str]:
    """Poll until the jobs' phases have these counts, checking the quota at every poll."""

    def ok() -> dict[str, str] | None:
        got = phases(w, names)
        counts = {ph: list(got.values()).count(ph) for ph in want}
        return got if counts == want else None

    return wait_for(ok, TIMEOUT, interval=0.5, message=what)


def running(w: World, name: str) -> list[dict[str, Any]]:
    """Wait until the job runs with its whole gang; returns the pods."""

    def ok() -> list[dict[str, Any]] | None:
        check_quota(w)
        ps = live_pods(w, name)
        whole = len(ps) == NODES_PER_JOB and all(p["status"].get("phase") == "Running" for p in ps)
        return ps if whole and status(w, name).get("phase") == "Running" else None

    return wait_for(ok, TIMEOUT, interval=0.5, message=f"{name} Running with its whole gang")


def succeed(w: World, name: str) -> None:
    message = format_termination_message(
        TrainingResult(
            artifactUri=f"file:///var/lib/kiln/artifacts/{name}/{name}", digest="sha256:" + "5e" * 32
        )
    )
    finish_pod(w.api, w.ns, f"{name}-node-0", 0, message)
    wait_for(lambda: status(w, name).get("phase") == "Succeeded", TIMEOUT, message=f"{name} Succeeded")


def workload(w: World, name: str) -> dict[str, Any]:
    wl_name = status(w, name)["workload"]
    obj = kube.get(w.api, KUEUE, "Workload", w.ns, wl_name)
    assert obj is not None
    return obj


def wl_cond(w: World, name: str, type_: str) -> str | None:
    c = get_condition((workload(w, name).get("status") or {}).get("conditions"), type_)
    return c["status"] if c else None


def assert_queued(w: World, name: str) -> None:
    st = status(w, name)
    assert st["phase"] == "Queued" and not live_pods(w, name)
    suspended = get_condition(st["conditions"], "Suspended")
    assert suspended["status"] == "True" and suspended["reason"] == "Queued"
    assert get_condition(st["conditions"], "Admitted")["status"] == "False"
    assert wl_cond(w, name, "QuotaReserved") != "True"


# --- tests --------------------------------------------------------------------------------------


def test_quota_admits_whole_gangs_queues_the_rest_and_releases_on_finish(world: World):
    """4 jobs x 8 GPUs on a 16-GPU ClusterQueue: 2 run, 2 wait Suspended/Queued with no pods;
    each job that finishes gives its quota to a waiting one."""
    w = world
    names = [f"job-{i}" for i in range(4)]
    for n in names:
        make_job(w, n)
    got = wait_phases(w, names, {"Running": 2, "Queued": 2}, "2 jobs Running, 2 Queued")
    first = [n for n in names if got[n] == "Running"]
    waiting = [n for n in names if got[n] == "Queued"]
    for n in first:
        pods = running(w, n)
        assert wl_cond(w, n, "Admitted") == "True"
        for p in pods:  # placed by the admitted flavor: node labels and its toleration
            assert p["spec"]["nodeSelector"]["kiln.dev/kueue-test"] == w.suffix
            assert p["spec"]["nodeName"] in w.nodes
            assert any(t.get("key") == "kiln.dev/kueue-test" for t in p["spec"]["tolerations"])
    for n in waiting:
        assert_queued(w, n)
    # Kueue's own books agree (its ClusterQueue status is written a moment after admissions)
    wait_for(lambda: w.reserved_gpus() == QUOTA, 30, message="ClusterQueue reserving 16 GPUs")

    # the first job finishes: its Workload is Finished, a waiting job takes the quota
    succeed(w, first[0])
    assert wl_cond(w, first[0], "Finished") == "True"
    got = wait_phases(w, names, {"Running": 2, "Queued": 1, "Succeeded": 1}, "a waiting job admitted")
    started = next(n for n in waiting if got[n] == "Running")
    running(w, started)
    last = next(n for n in waiting if n != started)
    assert_queued(w, last)

    succeed(w, first[1])
    wait_phases(w, names, {"Running": 2, "Succeeded": 2}, "the last job admitted")
    running(w, last)
    assert all(status(w, n)["disruptionCount"] == 0 for n in names)


def test_priority_preempts_a_whole_gang_which_restarts_when_readmitted(world: World):
    """A high-priority job on a full ClusterQueue: Kueue preempts one low-priority Workload;
    Kiln deletes all of its pods (a disruption, not a failure) and gives the quota back; the
    other low job is untouched; the preempted one runs a new gang once readmitted."""
    w = world
    low, high = w.priority("low", 100), w.priority("high", 1000)
    make_job(w, "low-a", low)
    make_job(w, "low-b", low)
    before = {n: {p["metadata"]["uid"] for p in running(w, n)} for n in ("low-a", "low-b")}
    make_job(w, "urgent", high)
    running(w, "urgent")

    def preempted() -> str | None:
        check_quota(w)
        gone = [n for n in before if not {p["metadata"]["uid"] for p in live_pods(w, n)} & before[n]]
        return gone[0] if len(gone) == 1 and status(w, gone[0]).get("phase") == "Queued" else None

    victim = wait_for(preempted, TIMEOUT, interval=0.5, message="one low job preempted")
    survivor = next(n for n in before if n != victim)
    # never part of a gang: the victim has no pod left, the survivor still has its whole gang
    assert not live_pods(w, victim)
    assert {p["metadata"]["uid"] for p in live_pods(w, survivor)} == before[survivor]
    st = status(w, victim)
    assert st["disruptionCount"] == 1 and st["restartCount"] == 0 and st["gang"] == 1
    assert get_condition(st["conditions"], "Admitted")["status"] == "False"
    assert wl_cond(w, victim, "QuotaReserved") == "False" and wl_cond(w, victim, "Evicted") == "True"

    # the urgent job finishes: the victim is readmitted and runs a new gang
    succeed(w, "urgent")
    pods = running(w, victim)
    assert {p["metadata"]["labels"]["kiln.dev/gang"] for p in pods} == {"1"}
    assert status(w, victim)["disruptionCount"] == 1 and status(w, victim)["restartCount"] == 0
