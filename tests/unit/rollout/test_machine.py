"""The canary state machine: table-driven tests of kiln.rollout.machine.decide.

A small simulator applies each plan to an idealised cluster (pods become Ready when told) and
advances a clock, so tests read as timelines: t=0 new version, t=1 canary Ready, ...
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiln.api.inferenceservice import InferenceServiceSpec, InferenceServiceStatus, MetricResult
from kiln.conditions import FALSE, TRUE, UNKNOWN
from kiln.rollout.machine import HISTORY_LIMIT, Decision, Measurement, Observed, Plan, analysis_due, decide

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_spec(
    replicas: int = 5,
    analysis: dict[str, Any] | None = None,
    autoscaling: dict[str, Any] | None = None,
    **rollout: Any,
) -> InferenceServiceSpec:
    r: dict[str, Any] = {"steps": [{"weight": 20, "pauseSeconds": 60}, {"weight": 50, "pauseSeconds": 60}]}
    r.update(rollout)
    if analysis is not None:
        r["analysis"] = {
            "prometheus": {"address": "http://prometheus:9090"},
            "intervalSeconds": 10,
            "metrics": [{"name": "error-rate", "query": "x", "max": 0.05}],
            **analysis,
        }
    doc: dict[str, Any] = {
        "modelRef": {"name": "digits", "stage": "Production"},
        "runtime": {"image": "kiln/server:1"},
        "replicas": replicas,
        "rollout": r,
    }
    if autoscaling is not None:
        doc["autoscaling"] = autoscaling
    return InferenceServiceSpec.model_validate(doc)


def stable(version: int = 1) -> InferenceServiceStatus:
    return InferenceServiceStatus(stable_version=version, rollout_phase="Healthy")


def measurement(version: int, *phases: str, value: float | None = 0.01) -> Measurement:
    return Measurement(
        version, tuple(MetricResult(name=f"m{i}", value=value, phase=p) for i, p in enumerate(phases))
    )


class Sim:
    """Feeds decide() with observations derived from its last plan (an idealised cluster)."""

    def __init__(self, spec: InferenceServiceSpec, status: InferenceServiceStatus | None = None) -> None:
        self.spec = spec
        self.status = status or stable(1)
        self.plan: Plan | None = None
        self.canary_ready = 0
        self.decisions: list[Decision] = []

    def tick(
        self,
        t: float,
        resolved: int = 2,
        *,
        ready: bool = True,
        m: Measurement | None = None,
        failure: str | None = None,
        stable_done: bool = True,
        total: int | None = None,
    ) -> Decision:
        # Ready canary pods: with ready=True every planned pod is Ready; else only those that were.
        canary_ready = 0
        if self.plan is not None and self.plan.canary_version == self.status.canary_version:
            planned = self.plan.canary_replicas
            canary_ready = planned if ready else min(self.canary_ready, planned)
        self.canary_ready = canary_ready
        stable_out = self.status.stable_version
        if self.plan is not None and stable_done:
            stable_out = self.plan.stable_version
        obs = Observed(
            resolved_version=resolved,
            total_replicas=self.spec.replicas if total is None else total,
            canary_ready_replicas=canary_ready,
            canary_failure=failure,
            stable_rolled_out_version=stable_out,
        )
        d = decide(self.spec, self.status, obs, m, at(t))
        self.status, self.plan = d.status, d.plan
        self.decisions.append(d)
        return d

    def due(self, t: float) -> bool:
        return analysis_due(self.spec, self.status, at(t))


def events(d: Decision) -> list[str]:
    return [a.reason for a in d.actions if a.kind == "Event"]


# --------------------------------------------------------------------------------------------
# steady states


def test_first_version_is_deployed_without_canary():
    d = decide(
        make_spec(), InferenceServiceStatus(), Observed(resolved_version=3, total_replicas=5), None, T0
    )
    assert d.status.stable_version == 3 and d.status.canary_version is None
    assert d.status.rollout_phase == "Healthy"
    assert d.plan == Plan(stable_version=3, stable_replicas=5)
    assert events(d) == ["Deployed"]
    assert d.status.history and d.status.history[-1].to_version == 3
    assert d.requeue_after is None


def test_same_version_is_a_no_op():
    st = stable(2)
    d = decide(make_spec(), st, Observed(resolved_version=2, total_replicas=5), None, T0)
    assert d.status == st and d.actions == [] and d.requeue_after is None
    assert d.plan == Plan(stable_version=2, stable_replicas=5)
    assert d.rollout_healthy.status == TRUE


def test_autoscaled_stable_replicas_are_left_to_the_hpa():
    sim = Sim(make_spec(autoscaling={"minReplicas": 2, "maxReplicas": 9}))
    d = sim.tick(0, resolved=1, total=4)
    assert d.plan.stable_replicas is None
    sim.tick(1, total=4)
    d = sim.tick(2, total=4)  # canary: ceil(4 * 20%) = 1 pod; the HPA scales the stable
    assert (d.plan.stable_replicas, d.plan.canary_replicas, d.status.canary_weight) == (None, 1, 20)


# --------------------------------------------------------------------------------------------
# steps advance with time


def test_canary_starts_at_step_zero_and_surges_until_ready():
    sim = Sim(make_spec())
    d = sim.tick(0)
    assert d.status.rollout_phase == "Progressing"
    assert (d.status.canary_version, d.status.current_step, d.status.step_start_time) == (2, 0, None)
    # ceil(5 * 20%) = 1 canary pod; the stable keeps all 5 until the canary is Ready
    assert d.plan == Plan(
        stable_version=1, stable_replicas=5, canary_version=2, canary_replicas=1, canary_weight=0
    )
    assert "RolloutStarted" in events(d)
    assert d.canary_ready.status == FALSE and d.canary_ready.reason == "CanaryNotReady"
    assert d.requeue_after is not None and d.requeue_after > 0


def test_weight_is_granted_only_when_canary_is_ready():
    sim = Sim(make_spec())
    sim.tick(0)
    d = sim.tick(5, ready=False)
    assert d.status.step_start_time is None and d.plan.stable_replicas == 5 and d.status.canary_weight == 0
    d = sim.tick(6)
    assert d.status.step_start_time == "2026-03-01T12:00:06Z"
    assert d.plan.stable_replicas == 4 and d.plan.canary_replicas == 1 and d.status.canary_weight == 20
    assert d.canary_ready.status == TRUE
    assert "StepStarted" in events(d)
    assert d.requeue_after == pytest.approx(60)


@pytest.mark.parametrize(
    ("t", "step", "weight", "stable_replicas", "canary_replicas"),
    [
        (30, 0, 20, 4, 1),  # pause of step 1 not over
        (61, 1, 20, 4, 3),  # step 2 started: canary scales to ceil(5*50%)=3, stable holds 4
        (62, 1, 60, 2, 3),  # canary Ready at 3: granted, stable 5-3=2 (real share 3/5 = 60%)
        (122, 2, 38, 5, 3),  # last step done: promoting, stable back to full size (3/8 = 38%)
    ],
)
def test_steps_advance_with_time(t, step, weight, stable_replicas, canary_replicas):
    sim = Sim(make_spec())
    sim.tick(0)
    sim.tick(1)  # granted at t=1
    for tt in (30, 61, 62, 122):
        if tt > t:
            break
        d = sim.tick(tt, ready=tt != 61)
    assert (d.status.current_step, d.status.canary_weight) == (step, weight)
    assert (d.plan.stable_replicas, d.plan.canary_replicas) == (stable_replicas, canary_replicas)


def test_promotion_completes_when_stable_runs_new_version():
    sim = Sim(make_spec())
    for t in (0, 1, 61, 62):
        sim.tick(t)
    d = sim.tick(122, stable_done=False)
    assert d.status.current_step == 2 and d.plan.stable_version == 2 and d.plan.canary_version == 2
    assert "Promoting" in events(d) and d.status.rollout_phase == "Progressing"
    assert d.rollout_healthy.reason == "Promoting"
    d = sim.tick(130)  # stable Deployment rolled out version 2
    assert d.status.rollout_phase == "Promoted"
    assert (d.status.stable_version, d.status.canary_version, d.status.canary_weight) == (2, None, 0)
    assert d.status.current_step is None
    assert d.plan == Plan(stable_version=2, stable_replicas=5)
    assert "Promoted" in events(d)
    assert d.status.history[-1].phase == "Promoted"
    # promoted and steady afterwards
    d = sim.tick(200)
    assert d.status.rollout_phase == "Promoted" and d.actions == []


def test_zero_pause_steps_pass_in_one_reconcile():
    sim = Sim(make_spec(steps=[{"weight": 20}, {"weight": 20}]))
    sim.tick(0)
    d = sim.tick(1)
    assert d.status.current_step == 2  # both steps passed: promoting


def test_no_steps_promotes_directly():
    sim = Sim(make_spec(steps=[]))
    d = sim.tick(0, stable_done=False)
    assert d.plan.stable_version == 2 and d.plan.canary_replicas == 0
    d = sim.tick(1)
    assert d.status.rollout_phase == "Promoted" and d.status.stable_version == 2


# --------------------------------------------------------------------------------------------
# analysis


def analysed_sim(**analysis: Any) -> Sim:
    sim = Sim(
        make_spec(
            analysis=analysis, steps=[{"weight": 20, "pauseSeconds": 20}, {"weight": 50, "pauseSeconds": 20}]
        )
    )
    sim.tick(0)
    sim.tick(1)  # granted
    return sim


def test_analysis_due_follows_interval_and_traffic():
    sim = Sim(make_spec(analysis={}))
    sim.tick(0)
    assert not sim.due(0.5)  # no weight granted: nothing to measure
    sim.tick(1)
    assert sim.due(1)  # never measured in this rollout
    sim.tick(2, m=measurement(2, "Successful"))
    assert not sim.due(11)
    assert sim.due(12)  # interval 10 s


def test_step_waits_for_a_successful_measurement_after_the_grant():
    sim = analysed_sim()
    d = sim.tick(25)  # pause over but never measured
    assert d.status.current_step == 0
    d = sim.tick(26, m=measurement(2, "Successful"))
    assert d.status.current_step == 1 and d.status.analysis.successes == 1


def test_measurement_from_before_the_grant_does_not_count():
    sim = Sim(
        make_spec(analysis={}, steps=[{"weight": 20, "pauseSeconds": 5}, {"weight": 50, "pauseSeconds": 5}])
    )
    sim.tick(0)
    sim.tick(1)
    sim.tick(7, m=measurement(2, "Successful"))  # step 1 -> 2 (not ready yet at 50)
    d = sim.tick(8)  # canary Ready at 50%: granted at t=8
    assert d.status.current_step == 1 and d.status.step_start_time == "2026-03-01T12:00:08Z"
    d = sim.tick(20)  # pause over, but the last measurement (t=7) predates the grant
    assert d.status.current_step == 1
    d = sim.tick(21, m=measurement(2, "Successful"))
    assert d.status.current_step == 2


def test_failures_within_failure_limit_continue():
    sim = analysed_sim(failureLimit=1)
    d = sim.tick(5, m=measurement(2, "Failed"))
    assert d.status.rollout_phase == "Progressing" and d.status.analysis.failures == 1
    d = sim.tick(15, m=measurement(2, "Successful"))
    assert d.status.analysis.successes == 1 and d.status.canary_version == 2


def test_failure_over_limit_rolls_back_at_once():
    sim = analysed_sim(failureLimit=1)
    sim.tick(5, m=measurement(2, "Failed"))
    d = sim.tick(15, m=measurement(2, "Failed", "Successful", value=0.5))
    st = d.status
    assert st.rollout_phase == "RolledBack" and st.rolled_back_version == 2
    assert (st.stable_version, st.canary_version, st.canary_weight, st.current_step) == (1, None, 0, None)
    assert d.plan == Plan(stable_version=1, stable_replicas=5)  # canary gone, stable back to full
    assert st.history[-1].phase == "RolledBack" and st.history[-1].message.startswith("AnalysisFailed")
    kinds = {(a.kind, a.reason) for a in d.actions}
    assert ("Event", "RolledBack") in kinds and ("ModelRollback", "AnalysisFailed") in kinds
    rb = next(a for a in d.actions if a.kind == "ModelRollback")
    assert (rb.version, rb.stable_version) == (2, 1)
    assert next(a for a in d.actions if a.kind == "Event").type == "Warning"
    assert d.rollout_healthy.status == FALSE and d.rollout_healthy.reason == "RolledBack"
    assert st.analysis.results and st.analysis.results[0].phase == "Failed"  # kept for the post-mortem


def test_rolled_back_version_is_not_retried_until_resolution_changes():
    sim = analysed_sim()
    sim.tick(5, m=measurement(2, "Failed"))
    for t in (100, 200, 300):
        d = sim.tick(t)
        assert d.status.rollout_phase == "RolledBack" and d.status.canary_version is None
        assert d.actions == [] and d.plan.canary_version is None and d.requeue_after is None
        assert d.rollout_healthy.status == FALSE
    d = sim.tick(400, resolved=3)
    assert d.status.canary_version == 3 and d.status.rolled_back_version is None
    assert d.status.rollout_phase == "Progressing"


def test_resolving_back_to_stable_after_rollback_is_healthy():
    sim = analysed_sim()
    sim.tick(5, m=measurement(2, "Failed"))
    d = sim.tick(10, resolved=1)
    assert d.status.rollout_phase == "Healthy" and d.status.rolled_back_version is None


def test_inconclusive_retries_then_pauses_then_resumes():
    sim = analysed_sim(inconclusiveLimit=2)
    for i, t in enumerate((5, 15), start=1):
        d = sim.tick(t, m=measurement(2, "Inconclusive", value=None))
        assert d.status.analysis.inconclusive == i
        assert d.status.rollout_phase == "Progressing" and d.status.current_step == 0  # no advance on no data
    d = sim.tick(35, m=measurement(2, "Inconclusive", value=None))  # 3rd in a row > limit 2
    assert d.status.rollout_phase == "Paused"
    assert d.rollout_healthy.status == UNKNOWN and d.rollout_healthy.reason == "AnalysisInconclusive"
    assert "AnalysisInconclusive" in events(d)
    assert d.status.canary_version == 2 and d.status.rolled_back_version is None  # never aborted
    assert sim.due(45)  # still measuring while paused
    d = sim.tick(45, m=measurement(2, "Successful"))
    assert d.status.rollout_phase == "Progressing" and d.status.analysis.inconclusive == 0
    assert d.status.current_step == 1 and "Resumed" in events(d)


def test_errors_count_as_inconclusive_not_failures():
    sim = analysed_sim(inconclusiveLimit=0)
    d = sim.tick(5, m=measurement(2, "Error", value=None))
    assert d.status.analysis.failures == 0 and d.status.rollout_phase == "Paused"


def test_measurement_of_another_version_is_ignored():
    sim = analysed_sim()
    d = sim.tick(5, m=measurement(7, "Failed"))
    assert d.status.analysis.failures == 0 and d.status.analysis.last_run_time is None


# --------------------------------------------------------------------------------------------
# manual override


def test_manual_pause_holds_the_step_and_starts_no_pods():
    sim = Sim(make_spec(paused=True))
    d = sim.tick(0)
    assert d.status.rollout_phase == "Paused" and d.rollout_healthy.reason == "ManualPause"
    assert d.plan.canary_replicas == 0  # a held rollout does not shift traffic to new pods
    sim.spec = make_spec()
    sim.tick(1)
    d = sim.tick(2)
    assert d.status.step_start_time is not None and d.status.rollout_phase == "Progressing"
    sim.spec = make_spec(paused=True)
    d = sim.tick(200)
    assert d.status.current_step == 0 and d.status.rollout_phase == "Paused"
    sim.spec = make_spec()
    d = sim.tick(201)  # resumed: the step's pause is long over, so it advances
    assert d.status.current_step == 1 and "Resumed" in events(d)


def test_abort_rolls_back():
    sim = Sim(make_spec())
    sim.tick(0)
    sim.tick(1)
    sim.spec = make_spec(abort=True)
    d = sim.tick(2)
    assert d.status.rollout_phase == "RolledBack" and d.status.rolled_back_version == 2
    assert d.status.history[-1].message.startswith("Aborted")


def test_abort_during_promotion_restores_the_old_stable():
    sim = Sim(make_spec(steps=[{"weight": 50}]))
    sim.tick(0)
    d = sim.tick(1, stable_done=False)
    assert d.plan.stable_version == 2
    sim.spec = make_spec(steps=[{"weight": 50}], abort=True)
    d = sim.tick(2, stable_done=False)
    assert d.plan.stable_version == 1 and d.status.stable_version == 1 and d.plan.canary_version is None


def test_stuck_canary_rolls_back():
    sim = Sim(make_spec())
    sim.tick(0)
    d = sim.tick(600, ready=False, failure='ReplicaSet "x" has timed out progressing.')
    assert d.status.rollout_phase == "RolledBack"
    assert d.status.history[-1].message.startswith("ProgressDeadlineExceeded")


# --------------------------------------------------------------------------------------------
# resolution changes mid-rollout


def test_resolving_back_to_stable_cancels_the_canary():
    sim = Sim(make_spec())
    sim.tick(0)
    sim.tick(1)
    d = sim.tick(2, resolved=1)
    assert d.status.rollout_phase == "Healthy" and d.status.canary_version is None
    assert d.plan.canary_version is None and "RolloutCancelled" in events(d)


def test_new_version_supersedes_the_running_canary():
    sim = Sim(make_spec(analysis={"failureLimit": 1}))
    sim.tick(0)
    sim.tick(1)
    sim.tick(2, m=measurement(2, "Failed", "Successful"))
    d = sim.tick(3, resolved=3)
    assert (d.status.canary_version, d.status.current_step, d.status.step_start_time) == (3, 0, None)
    assert d.status.analysis.failures == 0  # fresh analysis for the new canary
    assert "superseded" in (d.status.history[-1].message or "")
    assert d.status.canary_weight == 0 and d.plan.stable_replicas == 5  # no grant from version 2's pods


# --------------------------------------------------------------------------------------------
# restart: all state is in status


def test_restart_resumes_at_the_same_step():
    sim = analysed_sim()
    sim.tick(5, m=measurement(2, "Successful"))
    d = sim.tick(25)  # step 1 -> step 2
    sim.tick(26)  # granted at 26
    before = sim.status
    # the operator restarts: status goes through the API server (JSON) and back
    restored = InferenceServiceStatus.model_validate(json.loads(json.dumps(before.to_api())))
    assert restored == before
    sim2 = Sim(sim.spec, restored)
    sim2.plan = sim.plan
    d = sim2.tick(30)
    assert (d.status.current_step, d.status.step_start_time) == (1, "2026-03-01T12:00:26Z")
    assert d.status.analysis.successes == 1 and d.actions == []
    d = sim2.tick(47, m=measurement(2, "Successful"))
    assert d.status.current_step == 2


# --------------------------------------------------------------------------------------------
# traffic routing


def test_gateway_api_keeps_stable_at_full_size_and_weights_the_route():
    sim = Sim(make_spec(trafficRouting="GatewayAPI", gatewayAPI={"parentRefs": [{"name": "gw"}]}))
    d = sim.tick(0)
    assert (d.plan.stable_replicas, d.plan.canary_replicas, d.plan.canary_weight) == (5, 1, 0)
    d = sim.tick(1)
    assert (d.plan.stable_replicas, d.plan.canary_replicas, d.plan.canary_weight) == (5, 1, 20)


def test_small_service_reports_the_real_replica_share():
    sim = Sim(make_spec(replicas=1))
    sim.tick(0)
    d = sim.tick(1)
    # 1 replica: the canary gets 1 pod and the stable keeps 1, so a 20% step serves 50%
    assert (d.plan.stable_replicas, d.plan.canary_replicas, d.status.canary_weight) == (1, 1, 50)


def test_history_is_bounded():
    st = stable(1)
    for v in range(2, 2 + HISTORY_LIMIT + 5):
        st = decide(
            make_spec(abort=True), st, Observed(resolved_version=v, total_replicas=2), None, at(v)
        ).status
    assert st.history is not None and len(st.history) == HISTORY_LIMIT
    assert st.history[-1].to_version == 1 + HISTORY_LIMIT + 5


def test_decide_does_not_mutate_its_input():
    st = stable(1)
    snapshot = st.model_copy(deep=True)
    decide(make_spec(), st, Observed(resolved_version=2, total_replicas=5), None, T0)
    assert st == snapshot
