"""Leader election against the real API server: two ``kiln operator`` processes, one Lease.

The processes run as the chart runs them (``--leader-elect``), with short terms so the test is
quick: lease 6 s, renew deadline 4 s, retry 1 s. The leader is killed with SIGKILL (nothing
released, as after an OOM kill or a node loss); the follower must take over within the lease
duration plus its polling (client-go's bound: lease + 2 x retry x 2.2), and a TrainingJob created
around the switch must get exactly one gang. Failover times are printed (``-s``) for the note.
"""

from __future__ import annotations

import copy
import signal
import time
from typing import Any

from kubernetes import client

from kiln import API_VERSION, kube

from .helpers import OperatorProcess, operator_processes, wait_for
from .test_trainingjob import JOB

LEASE = "kiln-test-leader"
LEASE_S, RENEW_S, RETRY_S = 6, 4, 1
#: client-go's bound on a takeover after the holder's death: the lease, counted from the
#: follower's last observation (at most one retry interval after the last renewal), plus one
#: retry interval to notice the expiry; a retry interval is at most retry x (1 + 1.2).
TAKEOVER_BOUND_S = LEASE_S + 2 * RETRY_S * 2.2
ARGS = [
    "--standalone",
    "--leader-elect",
    f"--leader-elect-lease-name={LEASE}",
    f"--leader-elect-lease-duration={LEASE_S}",
    f"--leader-elect-renew-deadline={RENEW_S}",
    f"--leader-elect-retry-period={RETRY_S}",
]


def lease_spec(kube_api: client.ApiClient, ns: str) -> client.V1LeaseSpec | None:
    try:
        return client.CoordinationV1Api(kube_api).read_namespaced_lease(LEASE, ns).spec
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def holder(kube_api: client.ApiClient, ns: str) -> str:
    spec = lease_spec(kube_api, ns)
    return (spec.holder_identity or "") if spec else ""


def leader_of(kube_api: client.ApiClient, ns: str, procs: list[OperatorProcess]) -> OperatorProcess | None:
    h = holder(kube_api, ns)
    return next((p for p in procs if h.startswith(p.pod_name + "_")), None)


def make_job(kube_api: client.ApiClient, ns: str, name: str) -> None:
    body = copy.deepcopy(JOB)
    body["metadata"] = {"name": name, "namespace": ns}
    body["spec"]["numNodes"] = 2
    assert kube.create(kube_api, body) is not None


def gang(kube_api: client.ApiClient, ns: str, job: str) -> dict[str, str]:
    """Pod name -> uid of a job's pods (terminating ones included)."""
    pods = kube.list_objects(kube_api, "v1", "Pod", ns, f"kiln.dev/trainingjob={job}")
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}


def job_status(kube_api: client.ApiClient, ns: str, job: str) -> dict[str, Any]:
    return (kube.get(kube_api, API_VERSION, "TrainingJob", ns, job) or {}).get("status") or {}


def assert_one_gang(kube_api: client.ApiClient, ns: str, job: str) -> dict[str, str]:
    pods = wait_for(lambda: (g := gang(kube_api, ns, job)) and len(g) == 2 and g, 60, message=f"{job}'s gang")
    assert sorted(pods) == [f"{job}-node-0", f"{job}-node-1"]
    st = wait_for(
        lambda: (s := job_status(kube_api, ns, job)).get("phase") and s, 30, message=f"{job} status"
    )
    # gang 0 is the first gang; a restart or a recreated pod would have bumped it
    assert (st["gang"], st["restartCount"], st["disruptionCount"]) == (0, 0, 0), st
    return pods


def test_follower_takes_over_when_the_leader_is_killed(cluster, kube, namespace, kiln_crds, tmp_path):
    ns = namespace
    args = [*ARGS, f"--namespace={ns}", f"--leader-elect-namespace={ns}"]
    with operator_processes(cluster.kubeconfig, args, ["op-a", "op-b"], ns, tmp_path) as procs:
        t_start = time.monotonic()
        first = wait_for(lambda: leader_of(kube, ns, procs), 60, message="a leader")
        acquired_s = time.monotonic() - t_start
        follower = next(p for p in procs if p is not first)
        # both ready: the follower is ready but idle
        wait_for(lambda: all(p.healthy() for p in procs), 60, message="both /healthz answering")
        spec = lease_spec(kube, ns)
        assert spec.lease_duration_seconds == LEASE_S and spec.lease_transitions == 0
        assert spec.acquire_time is not None and spec.renew_time is not None

        make_job(kube, ns, "before")
        before = assert_one_gang(kube, ns, "before")
        assert first.metric("kiln_leader") == 1 and follower.metric("kiln_leader") == 0
        assert first.metric("kiln_reconcile_total") > 0
        assert follower.metric("kiln_reconcile_total") == 0  # watches, never reconciles
        assert follower.metric("kiln_api_requests_total") == 0

        # the switch: a job created just before the kill, another right after it
        make_job(kube, ns, "around")
        first.kill()
        t_kill = time.monotonic()
        make_job(kube, ns, "after")
        wait_for(lambda: leader_of(kube, ns, procs) is follower, TAKEOVER_BOUND_S + 10, interval=0.05)
        failover_s = time.monotonic() - t_kill
        wait_for(lambda: len(gang(kube, ns, "after")) == 2, 30, interval=0.05, message="after's gang")
        first_write_s = time.monotonic() - t_kill

        assert failover_s <= TAKEOVER_BOUND_S, f"takeover took {failover_s:.1f}s"
        spec = lease_spec(kube, ns)
        assert spec.lease_transitions == 1
        for job in ("around", "after"):
            assert_one_gang(kube, ns, job)
        assert gang(kube, ns, "before") == before  # the new leader recreated nothing
        assert follower.metric("kiln_leader") == 1

        # every reconcile line of the new leader names its object
        lines = [j for j in follower.json_lines() if j.get("logger", "").startswith("kiln.")]
        assert lines and all({"time", "level", "logger", "message"} <= set(j) for j in lines)
        print(
            f"\nleader elected in {acquired_s:.1f}s; after SIGKILL of the leader: Lease taken over in "
            f"{failover_s:.1f}s, first gang created in {first_write_s:.1f}s "
            f"(lease {LEASE_S}s, renew {RENEW_S}s, retry {RETRY_S}s; bound {TAKEOVER_BOUND_S:.1f}s)"
        )


def test_graceful_stop_releases_and_a_lost_lease_stops_the_leader(
    cluster, kube, namespace, kiln_crds, tmp_path
):
    ns = namespace
    args = [*ARGS, f"--namespace={ns}", f"--leader-elect-namespace={ns}"]
    with operator_processes(cluster.kubeconfig, args, ["op-c", "op-d"], ns, tmp_path) as procs:
        first = wait_for(lambda: leader_of(kube, ns, procs), 60, message="a leader")
        second = next(p for p in procs if p is not first)
        wait_for(second.healthy, 60, message="the follower's /healthz")

        # SIGTERM (a rolling update, a drain): the leader releases; the follower takes over fast
        t0 = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: leader_of(kube, ns, procs) is second, 15, interval=0.05)
        handover_s = time.monotonic() - t0
        assert first.proc.wait(60) == 0
        assert "released lease" in first.log()
        # released: the follower's next attempt (at most retry x 2.2 later) takes it
        assert handover_s < RETRY_S * 2.2 + 2, f"handover took {handover_s:.1f}s: the Lease was not released"

        # someone else takes the Lease (as another replica would after a partition): the leader
        # sees it at its next renewal, refuses writes at once and exits non-zero to restart
        lease_api = client.CoordinationV1Api(kube)

        def steal() -> bool:
            lease = lease_api.read_namespaced_lease(LEASE, ns)
            lease.spec.holder_identity = "intruder"
            lease.spec.lease_duration_seconds = 3600
            try:
                lease_api.replace_namespaced_lease(LEASE, ns, lease)  # guarded by resourceVersion
            except client.ApiException as e:
                if e.status == 409:  # the leader renewed in between: read again
                    return False
                raise
            return True

        wait_for(steal, 30, interval=0.05, message="the Lease replaced")
        t1 = time.monotonic()
        code = second.proc.wait(RENEW_S + 2 * RETRY_S + 30)
        assert code == 1 and "leadership lost" in second.log()
        print(
            f"\ngraceful handover in {handover_s:.1f}s; a stolen Lease stopped the leader in {time.monotonic() - t1:.1f}s"
        )
