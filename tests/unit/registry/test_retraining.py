"""The retraining decision (kiln.registry.retraining), on a simulated timeline with a fixed clock.

A tiny simulator plays the controller: it feeds each decision back as the next status and turns
``Decision.create`` into a live TrainingJob that the test then finishes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from kiln.api.model import ModelSpec, Retraining, RetrainingStatus
from kiln.registry import retraining as rt
from kiln.registry.retraining import ACTIVE, FAILED, SUCCEEDED, DriftReading, Observations, Run

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
TEMPLATE: dict[str, Any] = {"spec": {"image": "kiln/trainer:dev", "dataset": {"builtin": "sklearn-digits"}}}
PROM = {"address": "http://prometheus:9090"}


def spec(**over: Any) -> Retraining:
    return Retraining.model_validate({"template": TEMPLATE, **over})


@dataclass
class Sim:
    """The controller's loop: status in, decision out, created runs become live TrainingJobs."""

    spec: Retraining
    now: datetime = T0
    status: RetrainingStatus | None = None
    runs: dict[str, Run] = field(default_factory=dict)
    request: str | None = None
    materialized: datetime | None = None
    drift: float | None = None
    registered: set[str] = field(default_factory=set)
    created: list[str] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    last: rt.Decision | None = None

    def step(self, seconds: float = 0.0, *, create: bool = True) -> rt.Decision:
        self.now += timedelta(seconds=seconds)
        reading = DriftReading(self.drift) if rt.drift_due(self.spec, self.status, self.now) else None
        obs = Observations(
            request=self.request,
            materialization_time=self.materialized,
            drift=reading,
            registered_jobs=frozenset(self.registered),
            template_hash=rt.template_hash(self.spec),
        )
        d = rt.decide("digits", self.spec, self.status, list(self.runs.values()), obs, self.now)
        self.status = d.status
        self.events += d.events
        if d.create is not None and create and d.create.name not in self.runs:
            self.runs[d.create.name] = Run(d.create.name, d.create.number, self.now)
            self.created.append(d.create.name)
        self.last = d
        return d

    def finish(self, name: str, phase: str, failure: str = "") -> None:
        self.runs[name] = replace(self.runs[name], phase=phase, finished=self.now, failure=failure)

    def active(self) -> list[str]:
        return [r.name for r in self.runs.values() if r.phase == ACTIVE]


def test_enabling_retraining_records_baselines_and_starts_nothing():
    s = Sim(
        spec(triggers={"schedule": {"cron": "0 * * * *"}, "newData": {"featureGroupRef": {"name": "fg"}}})
    )
    s.request = "2026-02-01"  # set before retraining was enabled: not a request
    s.materialized = T0 - timedelta(days=1)
    d = s.step()
    assert d.create is None and d.state == "Idle"
    assert d.status.observed_request == "2026-02-01"
    assert d.status.observed_feature_group == "fg"
    assert d.status.observed_materialization_time == "2026-02-28T12:00:00Z"
    assert d.status.last_schedule_time == "2026-03-01T12:00:00Z"
    assert s.step(10).create is None


def test_manual_request_creates_exactly_one_run_and_a_second_waits_for_it():
    s = Sim(spec())
    s.step()
    s.request = "first"
    d = s.step(1, create=False)
    assert d.new_run and d.create is not None and d.create.name == "digits-retrain-1"
    assert d.create.triggers == ["Manual"] and "requested (first)" in d.create.message
    assert d.status.runs == 1 and d.status.last_run == d.create and d.status.observed_request == "first"
    assert s.events[-1][:2] == ("Normal", "RetrainingStarted")
    # Until the job is listed, the decision asks for the same run again (idempotent create).
    assert s.step(1).create == d.create and not s.last.new_run
    assert s.created == ["digits-retrain-1"]
    # A second request while it runs: nothing new, the request waits.
    s.request = "second"
    for _ in range(5):
        d = s.step(30)
        assert d.create is None and d.state == "Running" and d.status.pending == ["Manual"]
    assert "digits-retrain-1 in progress" in d.message
    # It ends; the waiting request (a person's) starts run 2 at once, cooldown or not.
    s.finish("digits-retrain-1", SUCCEEDED)
    d = s.step(1)
    assert d.status.runs == 2 and s.created == ["digits-retrain-1", "digits-retrain-2"]
    assert [e[1] for e in s.events[-2:]] == ["RetrainingSucceeded", "RetrainingStarted"]
    # The same value again is not a new request.
    s.finish("digits-retrain-2", SUCCEEDED)
    assert s.step(1).create is None and s.last.state == "Idle"


def test_cooldown_holds_automatic_triggers():
    s = Sim(spec(cooldownSeconds=600, triggers={"newData": {"featureGroupRef": {"name": "fg"}}}))
    s.step()
    s.materialized = T0 + timedelta(seconds=5)
    d = s.step(10)
    assert d.create is not None and d.create.triggers == ["NewData"]
    s.step(1)
    s.finish(d.create.name, SUCCEEDED)
    end = s.now
    s.step(100)  # the end is observed here; the cooldown runs from the job's completion
    s.materialized = s.now + timedelta(seconds=1)  # new data during the cooldown
    d = s.step(5)
    assert d.create is None and d.state == "Waiting" and d.status.pending == ["NewData"]
    assert d.status.next_run_time == (end + timedelta(seconds=600)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "cooldown until" in d.message and 0 < d.requeue_after <= 600
    s.now = end + timedelta(seconds=599)
    assert s.step().create is None
    d = s.step(1)
    assert d.create is not None and d.create.number == 2 and d.create.triggers == ["NewData"]


def test_failures_back_off_exponentially_then_suspend_without_looping():
    s = Sim(
        spec(
            backoff={"initialSeconds": 60, "maxSeconds": 100},
            maxConsecutiveFailures=3,
            triggers={"schedule": {"cron": "* * * * *"}},  # due every minute: it would loop
        )
    )
    s.step()
    starts = []
    for _ in range(3):
        d = s.step(1)
        while d.create is None or not d.new_run:
            d = s.step(1)
        starts.append(s.now)
        s.step(1)
        s.finish(d.create.name, FAILED, failure="CUDA error: out of memory")
    waits = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert 60 <= waits[0] - 1 < 62 and 100 <= waits[1] - 1 < 102  # 60 s, then capped at 100 s
    # After the third failure: suspended, for as long as we look.
    for _ in range(100):
        d = s.step(600)
        assert d.create is None and d.suspended
    assert d.status.consecutive_failures == 3 and len(s.created) == 3
    assert "3 retraining runs failed in a row" in d.message and "out of memory" in d.message
    assert d.status.last_run.reason == rt.JOB_FAILED
    assert [e[1] for e in s.events].count("RetrainingFailed") == 3
    # A person asks: one more run; it succeeds and the count resets.
    s.request = "try again"
    d = s.step(1)
    assert d.create is not None and d.create.triggers == ["Manual", "Schedule"]
    s.step(1)
    s.finish(d.create.name, SUCCEEDED)
    assert s.step(1).status.consecutive_failures == 0 and not s.last.suspended


def test_a_new_template_resets_the_failure_count():
    s = Sim(spec(maxConsecutiveFailures=1, triggers={"schedule": {"cron": "* * * * *"}}))
    s.step()
    d = s.step(60)
    s.step(1)
    s.finish(d.create.name, FAILED)
    assert s.step(600).suspended
    s.spec = spec(
        maxConsecutiveFailures=1,
        triggers={"schedule": {"cron": "* * * * *"}},
        template={"spec": {**TEMPLATE["spec"], "image": "kiln/trainer:fixed"}},
    )
    d = s.step(1)
    assert d.create is not None and d.new_run and d.status.consecutive_failures == 0


def test_drift_must_stay_above_the_threshold_for_the_duration():
    s = Sim(
        spec(
            triggers={
                "drift": {
                    "prometheus": PROM,
                    "query": "q",
                    "threshold": 0.2,
                    "forSeconds": 120,
                    "intervalSeconds": 30,
                }
            }
        )
    )
    s.drift = 0.5
    d = s.step()
    assert d.status.drift.above_since == "2026-03-01T12:00:00Z" and d.create is None
    assert d.requeue_after == 30
    s.step(30)
    s.drift = 0.1  # dips: the clock restarts
    assert s.step(30).status.drift.above_since is None
    s.drift = float("nan")  # NaN is not above
    assert s.step(30).status.drift.value is None
    s.drift = 0.3
    start = s.now + timedelta(seconds=30)
    for _ in range(4):  # 0, 30, 60, 90 s above
        assert s.step(30).create is None
    assert s.status.drift.above_since == start.strftime("%Y-%m-%dT%H:%M:%SZ")
    d = s.step(30)  # 120 s above
    assert d.create is not None and d.create.triggers == ["Drift"] and "drift 0.3 > 0.2" in d.create.message


def test_drift_query_errors_and_no_data_reset_the_trigger():
    s = Sim(spec(triggers={"drift": {"prometheus": PROM, "query": "q", "threshold": 0.2, "forSeconds": 0}}))
    st = s.step().status  # no data
    assert st.drift.value is None and st.drift.above_since is None
    obs = Observations(drift=DriftReading(0.9, error="Prometheus unreachable"))
    d = rt.decide("digits", s.spec, st, [], obs, T0 + timedelta(minutes=1))
    assert d.create is None and d.status.drift.error == "Prometheus unreachable"
    # Not evaluated this time (interval not over): the state is kept as it was.
    s.drift = 0.9
    assert s.step(60).create is not None


def test_drift_is_evaluated_every_interval():
    sp = spec(triggers={"drift": {"prometheus": PROM, "query": "q", "threshold": 1, "intervalSeconds": 60}})
    assert rt.drift_due(sp, None, T0)
    st = RetrainingStatus.model_validate({"drift": {"lastEvaluationTime": "2026-03-01T12:00:00Z"}})
    assert not rt.drift_due(sp, st, T0 + timedelta(seconds=30))
    assert rt.drift_due(sp, st, T0 + timedelta(seconds=60))
    assert not rt.drift_due(spec(), st, T0 + timedelta(hours=1))


def test_schedule_fires_once_per_passed_time_and_missed_times_collapse():
    s = Sim(spec(cooldownSeconds=0, triggers={"schedule": {"cron": "0 * * * *"}}))
    s.step()  # 12:00:00 baseline: 12:00 itself is not due
    assert s.step(3599).create is None
    d = s.step(1)  # 13:00
    assert d.create is not None and "at 2026-03-01T13:00:00Z" in d.create.message
    s.step(1)
    s.now += timedelta(hours=5)  # runs for 5 hours: 14:00 ... 18:00 pass
    s.finish(d.create.name, SUCCEEDED)
    d = s.step()
    assert d.create is not None and d.create.number == 2
    s.step(1)
    s.finish(d.create.name, SUCCEEDED)
    assert s.step(1).create is None  # the five missed times made one run


def test_a_job_that_disappears_counts_as_failed_unless_it_registered_a_version():
    s = Sim(spec(backoff={"initialSeconds": 0, "maxSeconds": 0}))
    s.step()
    s.request = "a"
    d = s.step(1)
    s.step(1)
    del s.runs[d.create.name]  # deleted (by a person, or a TTL before we saw the end)
    assert s.step(10, create=False).create == d.create  # within the grace: created again
    assert s.step(rt.CREATE_GRACE_SECONDS, create=False).status.last_run.reason == rt.JOB_MISSING
    assert s.last.status.consecutive_failures == 1
    s.request = "b"
    d = s.step(1)
    s.step(1)
    del s.runs[d.create.name]
    s.registered.add(d.create.name)  # ... but it registered a version: a success
    st = s.step(1).status
    assert st.last_run.result == "Succeeded" and st.consecutive_failures == 0


def test_rejected_template_counts_as_a_failure():
    s = Sim(spec())
    s.step()
    s.request = "a"
    d = s.step(1, create=False)
    st = rt.rejected(d.status, "spec.numNodes: Invalid value", s.now)
    assert st.last_run.reason == rt.TEMPLATE_REJECTED and st.consecutive_failures == 1
    assert "spec.numNodes" in st.last_run.message
    s.status = st
    assert s.step(rt.CREATE_GRACE_SECONDS * 2).create is None  # no loop: the request was consumed


def test_a_lost_status_adopts_the_live_run_and_never_starts_a_second():
    s = Sim(spec())
    live = Run("digits-retrain-4", 4, T0, ACTIVE, triggers=("Drift",))
    s.runs[live.name] = live
    s.request = "x"
    d = s.step()
    assert d.create is None and d.status.runs == 4 and d.status.last_run.name == "digits-retrain-4"
    assert d.status.last_run.triggers == ["Drift"] and d.state == "Running"


def test_suspend_holds_every_trigger():
    s = Sim(spec(suspend=True))
    s.step()
    s.request = "x"
    d = s.step(1)
    assert d.create is None and d.state == "Paused" and d.status.pending == ["Manual"]


@pytest.mark.parametrize(
    ("model", "nodes", "want"),
    [
        ("digits", 1, "digits-retrain-7"),
        ("digits.v2", 1, "digits-v2-retrain-7"),
        ("7up", 1, "m-7up-retrain-7"),
    ],
)
def test_run_names_are_training_job_names(model: str, nodes: int, want: str):
    assert rt.run_name(model, 7, nodes) == want


def test_long_model_names_are_cut_to_fit_pod_hostnames():
    name = rt.run_name("m" * 63, 12, 256)
    assert len(name) <= 54 and name != rt.run_name("m" * 63, 13, 256)


@pytest.mark.parametrize(
    "bad",
    [
        {"template": {"spec": {**TEMPLATE["spec"], "modelRef": {"name": "other"}}}},
        {"template": TEMPLATE, "triggers": {"schedule": {"cron": "61 * * * *"}}},
        {"template": TEMPLATE, "triggers": {"schedule": {"cron": "every day"}}},
        {"template": TEMPLATE, "maxConsecutiveFailures": 0},
        {"template": {"spec": {"image": "x"}}},  # no dataset
    ],
)
def test_invalid_retraining_is_refused(bad: dict[str, Any]):
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({"retraining": bad})
