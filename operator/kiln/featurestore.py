"""FeatureGroup materialization as a pure function of what the operator observes.

:func:`plan` takes the FeatureGroup, its parsed spec, its materialization Jobs (the operator's and
the CronJob's, all labelled ``kiln.dev/featuregroup``), their pods, its CronJobs and the time, and
returns a :class:`Plan`: the new status, the Jobs to create, the CronJob to apply, the children to
delete, the Events to post, when to look again. The controller only executes it, so every
decision here is unit-tested with a fixed clock and no cluster.

Rules (the Job design itself is in :mod:`kiln.resources.featuregroup`):

- **Results** come from each finished pod's termination message (the entry point's JSON line).
  A Complete Job whose every index left a result is a success; one that did not fails with
  reason ``ResultMissing``. A Failed Job's reason is the entry point's (``ColumnMissing``...,
  naming the column) when its last failed pod left one, else the Job's (``BackoffLimitExceeded``,
  ``DeadlineExceeded``).
- **The watermark** (``status.lastMaterializationTime``) belongs to the definitions it was written
  with (``materializedSchemaDigest``): new definitions (a new schema digest, hence new online keys)
  start from nothing. A successful run of the current definitions over ``[s, e)`` moves it to
  ``e`` when ``s`` is at or before it (or there is none yet) and ``e`` is later: only ever
  forward, never by a failed run, and folding the same run twice changes nothing.
- **Runs the operator starts**, one at a time (never while any run of the group is active):
  a backfill when the current definitions have no watermark and no run of this generation failed
  for good; a run on request (annotation ``kiln.dev/materialize-requested-at`` set to a value not
  yet in ``status.lastHandledMaterializeAt``), from the watermark to now; a transiently failed
  backfill again after :data:`RETRY_SECONDS`. With the online store disabled, a validation run
  (the source's columns and dtypes only) per generation and on request. A run still active for
  other definitions is deleted.
- **The CronJob** (``spec.schedule``) exists while the current definitions have a watermark, its
  job template starting at that watermark; it is re-applied only when what it should be changes
  (a hash annotation), i.e. when the watermark advances or the spec changes.
- **Ready** is True only when the spec is valid, and the latest finished run succeeded (with an
  online store: and the definitions have a watermark); a run in progress does not change it.
  ``Materialized`` mirrors the latest finished run. A permanent failure (a source or schema
  error, an invalid or too large spec, no image) also sets ``Stalled=True``: nothing changes
  until the spec, the source or a request does.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kiln.api.featuregroup import FeatureGroupSpec, RunPhase, RunTrigger
from kiln.conditions import FALSE, TRUE, UNKNOWN, parse_time, rfc3339, set_condition, set_stalled
from kiln.features.errors import EXIT_TRANSIENT
from kiln.features.schema import range_start, schema_digest
from kiln.resources import featuregroup as build

NORMAL, WARNING = "Normal", "Warning"
#: Delay before a backfill or validation that failed transiently (Redis down) runs again.
RETRY_SECONDS = 300.0
#: Annotation on the CronJob: a hash of what it should be, so an unchanged one is not re-applied.
ANNOTATION_SPEC_HASH = "kiln.dev/spec-hash"
LABEL_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
LABEL_JOB_NAME = "batch.kubernetes.io/job-name"


@dataclass(frozen=True)
class RunView:
    """What the plan needs from one materialization Job and its pods (see :func:`run_view`)."""

    name: str
    uid: str
    trigger: str
    created: str
    digest: str | None
    generation: int | None
    phase: RunPhase
    windows: int
    start: str | None = None
    end: str | None = None
    results: tuple[dict[str, Any], ...] = ()
    failed_pods: int = 0
    reason: str | None = None
    message: str | None = None
    column: str | None = None
    transient: bool = False
    start_time: str | None = None
    completion_time: str | None = None
    deleting: bool = False
    request: str | None = None

    @property
    def rows_written(self) -> int:
        return sum(int(r.get("rowsWritten") or 0) for r in self.results)

    @property
    def duration_seconds(self) -> float | None:
        a, b = parse_time(self.start_time), parse_time(self.completion_time)
        if a and b:
            return (b - a).total_seconds()
        return max((float(r.get("durationSeconds") or 0) for r in self.results), default=None)

    def to_status(self) -> dict[str, Any]:
        """The run as ``status.lastRun`` / ``status.activeRun`` (a MaterializationRun)."""
        out: dict[str, Any] = {
            "jobName": self.name,
            "trigger": self.trigger,
            "phase": str(self.phase),
            "generation": self.generation,
            "schemaDigest": self.digest,
            "start": self.start,
            "end": self.end,
            "windows": self.windows,
            "failedPods": self.failed_pods,
            "reason": self.reason,
            "message": self.message,
            "column": self.column,
            "transient": True if self.phase == RunPhase.FAILED and self.transient else None,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
        }
        if self.phase == RunPhase.SUCCEEDED:
            out["rowsWritten"] = self.rows_written
            d = self.duration_seconds
            out["durationSeconds"] = round(d, 3) if d is not None else None
        return {k: v for k, v in out.items() if v is not None}


def _json(text: str) -> dict[str, Any] | None:
    try:
        out = json.loads(text)
    except (ValueError, TypeError):
        return None
    return out if isinstance(out, dict) else None


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == build.CONTAINER:
            return (cs.get("state") or {}).get("terminated") or {}
    return {}


def _condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == TRUE:
            return dict(c)
    return None


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def run_view(job: dict[str, Any], pods: list[dict[str, Any]]) -> RunView:
    """A :class:`RunView` of a batch/v1 Job (dict) from its status and its pods' termination messages."""
    meta, status = job["metadata"], job.get("status") or {}
    ann, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    mine = [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_JOB_NAME) == meta["name"]]
    base = RunView(
        name=meta["name"],
        uid=meta.get("uid", ""),
        trigger=labels.get(build.LABEL_TRIGGER, str(RunTrigger.SCHEDULE)),
        created=meta.get("creationTimestamp", ""),
        digest=ann.get(build.ANNOTATION_DIGEST),
        generation=_int(ann.get(build.ANNOTATION_GENERATION)),
        phase=RunPhase.RUNNING,
        windows=int((job.get("spec") or {}).get("completions") or 1),
        start=ann.get(build.ANNOTATION_START),
        end=ann.get(build.ANNOTATION_END),
        failed_pods=int(status.get("failed") or 0),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        deleting=bool(meta.get("deletionTimestamp")),
        request=ann.get(build.ANNOTATION_ANSWERS),
    )
    if _condition(job, "Complete"):
        return _succeeded(base, mine)
    failed = _condition(job, "Failed")
    if failed:
        # a failed Job has no completionTime (only a successful one does): its condition's time
        when = base.completion_time or failed.get("lastTransitionTime")
        return _failed(_replace(base, completion_time=when), mine, failed)
    return base


def _succeeded(base: RunView, pods: list[dict[str, Any]]) -> RunView:
    """A Complete Job: one result per index, else ResultMissing."""
    by_index: dict[int, dict[str, Any]] = {}
    for p in pods:
        index = _int((p["metadata"].get("labels") or {}).get(LABEL_COMPLETION_INDEX))
        result = _json(_terminated(p).get("message") or "")
        succeeded = (p.get("status") or {}).get("phase") == "Succeeded"
        if succeeded and index is not None and result and "error" not in result:
            by_index[index] = result
    results = tuple(by_index[i] for i in sorted(by_index))
    if sorted(by_index) != list(range(base.windows)):
        missing = sorted(set(range(base.windows)) - set(by_index))
        return _replace(
            base,
            phase=RunPhase.FAILED,
            reason="ResultMissing",
            message=f"the Job completed but left no result for window(s) {missing[:10]}",
            transient=True,  # its pods went away before they were read: running again helps
        )
    starts = [parse_time(r["start"]) for r in results if r.get("start")]
    ends = [parse_time(r["watermark"]) for r in results if r.get("watermark")]
    start = rfc3339(min(t for t in starts if t)) if starts else base.start
    end = rfc3339(max(t for t in ends if t)) if ends else base.end
    return _replace(base, phase=RunPhase.SUCCEEDED, results=results, start=start, end=end)


def _failed(base: RunView, pods: list[dict[str, Any]], cond: dict[str, Any]) -> RunView:
    """A Failed Job: the entry point's error from its last failed pod, else the Job's reason."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: (_terminated(p).get("finishedAt") or "", p["metadata"].get("name", "")))
    last = _terminated(failed[-1]) if failed else {}
    error = (_json(last.get("message") or "") or {}).get("error")
    transient = last.get("exitCode") == EXIT_TRANSIENT
    job_reason = cond.get("reason") or "Failed"
    detail = (
        f"{base.failed_pods} pod(s) failed; the Job ended {job_reason}: {cond.get('message') or ''}".strip()
    )
    if isinstance(error, dict) and error.get("reason"):
        return _replace(
            base,
            phase=RunPhase.FAILED,
            reason=str(error["reason"]),
            message=f"{error.get('message') or ''} ({detail})"[:4096],
            column=error.get("column") or None,
            transient=transient and job_reason != "DeadlineExceeded",
        )
    tail = (last.get("message") or "").strip()[-1000:]
    message = detail + (f"; last output: {tail}" if tail else "")
    return _replace(
        base, phase=RunPhase.FAILED, reason=job_reason, message=message[:4096], transient=transient
    )


def _replace(v: RunView, **changes: Any) -> RunView:
    return RunView(**{**v.__dict__, **changes})


@dataclass
class Plan:
    """What the controller should do after :func:`plan`."""

    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)  # Jobs
    apply: list[dict[str, Any]] = field(default_factory=list)  # the CronJob
    delete: list[tuple[str, str, str, str]] = field(default_factory=list)  # apiVersion, kind, name, uid
    events: list[tuple[str, str, str]] = field(default_factory=list)  # type, reason, message
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        """Ask for another reconcile in ``seconds`` (the earliest request wins)."""
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass
class _Reconcile:
    """One :func:`plan` call: its inputs and the :class:`Plan` being built."""

    fg: dict[str, Any]
    spec: FeatureGroupSpec
    now: datetime
    defaults: build.MaterializationDefaults
    p: Plan
    gen: int | None
    digest: str
    runs: list[RunView]
    cronjobs: list[dict[str, Any]]
    watermark: datetime | None = None
    blocked: tuple[str, str] | None = None  # (reason, message): nothing can run

    @property
    def status(self) -> dict[str, Any]:
        return self.p.status

    def cond(self, type_: str, value: str, reason: str, message: str = "") -> None:
        self.status["conditions"] = set_condition(
            self.status.get("conditions"), type_, value, reason, message, generation=self.gen, now=self.now
        )


def plan(
    fg: dict[str, Any],
    spec: FeatureGroupSpec,
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    cronjobs: list[dict[str, Any]],
    now: datetime,
    defaults: build.MaterializationDefaults,
) -> Plan:
    """Decide the next step of a FeatureGroup (see the module docstring).

    ``jobs``, ``pods`` and ``cronjobs``: the group's children as listed (labelled
    ``kiln.dev/featuregroup``); ``now``: aware UTC; ``defaults``: the operator's configuration.
    """
    r = _observe(fg, spec, jobs, pods, cronjobs, now, defaults)
    _fold(r)
    _record_runs(r)
    _cancel_stale(r)
    _start_run(r)
    _schedule(r)
    _conditions(r)
    return r.p


def _observe(
    fg: dict[str, Any],
    spec: FeatureGroupSpec,
    jobs: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    cronjobs: list[dict[str, Any]],
    now: datetime,
    defaults: build.MaterializationDefaults,
) -> _Reconcile:
    """Start a plan: a copy of the status, the runs oldest first, and the current watermark (None
    when it was written for other definitions)."""
    status: dict[str, Any] = copy.deepcopy(fg.get("status") or {})
    gen = fg["metadata"].get("generation")
    digest = schema_digest(spec)
    status["observedGeneration"] = gen
    status["schemaDigest"] = digest
    runs = sorted((run_view(j, pods) for j in jobs), key=lambda v: (v.created, v.name))
    r = _Reconcile(fg, spec, now, defaults, Plan(status=status), gen, digest, runs, cronjobs)
    if status.get("materializedSchemaDigest") == digest:
        r.watermark = parse_time(status.get("lastMaterializationTime"))
    if not build.image(spec, defaults):
        r.blocked = ("NoMaterializationImage", "set spec.materialization.image (the kiln trainer image)")
    else:
        try:
            build.feature_group_json(fg, spec)
        except build.SpecTooLarge as e:
            r.blocked = ("SpecTooLarge", str(e))
    if r.watermark is None:
        for k in (
            "lastMaterializationTime",
            "materializedRows",
            "materializedDurationSeconds",
            "materializedSchemaDigest",
        ):
            status.pop(k, None)
    return r


def _fold(r: _Reconcile) -> None:
    """Advance the watermark over every successful run of the current definitions, oldest first."""
    for v in r.runs:
        if v.phase != RunPhase.SUCCEEDED or v.digest != r.digest or v.trigger == RunTrigger.VALIDATION:
            continue
        s, e = parse_time(v.start), parse_time(v.end)
        if s is None or e is None or (r.watermark is not None and (s > r.watermark or e <= r.watermark)):
            continue
        r.watermark = e
        r.status.update(
            lastMaterializationTime=rfc3339(e),
            materializedRows=v.rows_written,
            materializedSchemaDigest=r.digest,
        )
        d = v.duration_seconds
        if d is not None:
            r.status["materializedDurationSeconds"] = round(d, 3)
        r.p.events.append(
            (NORMAL, "Materialized", f"run {v.name}: {v.rows_written} rows; online values up to {v.end}")
        )


def _record_runs(r: _Reconcile) -> None:
    """``lastRun``: the newest finished run (kept when every Job is gone); ``activeRun``: the
    newest running one. A run newly seen failed posts a Warning Event."""
    finished = [v for v in r.runs if v.phase != RunPhase.RUNNING]
    if finished:
        last = finished[-1].to_status()
        before = r.status.get("lastRun") or {}
        if last.get("phase") == RunPhase.FAILED and (before.get("jobName"), before.get("phase")) != (
            last["jobName"],
            last["phase"],
        ):
            r.p.events.append((WARNING, last.get("reason", "Failed"), last.get("message", "")))
        r.status["lastRun"] = last
    active = [v for v in r.runs if v.phase == RunPhase.RUNNING and not v.deleting]
    if active:
        r.status["activeRun"] = active[-1].to_status()
    else:
        r.status.pop("activeRun", None)


def _cancel_stale(r: _Reconcile) -> None:
    """Delete active runs that write other definitions (their keys will never be read)."""
    for v in r.runs:
        if v.phase == RunPhase.RUNNING and not v.deleting and v.digest != r.digest:
            r.p.delete.append(("batch/v1", "Job", v.name, v.uid))


def _online(spec: FeatureGroupSpec) -> bool:
    return spec.online.enabled and spec.online.store is not None


def _trigger(r: _Reconcile) -> tuple[RunTrigger | None, str | None]:
    """Why to start a run now, if at all, and the request it answers: a new request, a missing
    backfill (or validation), or the retry of one that failed transiently (else a requeue for
    when it is due)."""
    online = _online(r.spec)
    kind = RunTrigger.BACKFILL if online else RunTrigger.VALIDATION
    request = _pending_request(r)
    if request:
        r.status["lastHandledMaterializeAt"] = request
        return (RunTrigger.REQUESTED if online else RunTrigger.VALIDATION), request
    if online and r.watermark is not None:
        return None, None  # incremental runs: the schedule's or requested ones
    last = r.status.get("lastRun")
    if last is None or last.get("generation") != r.gen:
        return kind, None
    if last.get("phase") == RunPhase.FAILED and last.get("transient") and last.get("trigger") == kind:
        due = (parse_time(last.get("completionTime")) or r.now) + timedelta(seconds=RETRY_SECONDS)
        if due <= r.now:
            return kind, None
        r.p.requeue((due - r.now).total_seconds())
    return None, None


def _pending_request(r: _Reconcile) -> str | None:
    """The request annotation's value when no run answered it yet (per status, or per a Job's
    annotation when the status write after creating it was lost)."""
    request = (r.fg["metadata"].get("annotations") or {}).get(build.ANNOTATION_REQUEST)
    if not request or request == r.status.get("lastHandledMaterializeAt"):
        return None
    if any(v.request == request for v in r.runs):
        r.status["lastHandledMaterializeAt"] = request
        return None
    return request


def _start_run(r: _Reconcile) -> None:
    """Create the Job of a run when :func:`_trigger` says so and no run of the group is active."""
    if r.blocked or any(
        v.phase == RunPhase.RUNNING and not v.deleting and v.digest == r.digest for v in r.runs
    ):
        return
    trigger, request = _trigger(r)
    if trigger is None:
        return
    start = end = None
    if trigger != RunTrigger.VALIDATION:
        end = r.now.replace(microsecond=0)
        start = range_start(r.spec, r.watermark, end)
    taken, t = {v.name for v in r.runs}, r.now
    while (name := build.run_name(r.fg["metadata"]["name"], t)) in taken:  # a Job of this second exists
        t += timedelta(seconds=1)
    job = build.run_job(
        r.fg,
        r.spec,
        name=name,
        trigger=trigger,
        start=start,
        end=end,
        defaults=r.defaults,
        request=request,
    )
    r.p.create.append(job)
    ann = job["metadata"]["annotations"]
    run = {
        "jobName": name,
        "trigger": str(trigger),
        "phase": str(RunPhase.RUNNING),
        "generation": r.gen,
        "schemaDigest": r.digest,
        "start": ann.get(build.ANNOTATION_START),
        "end": ann.get(build.ANNOTATION_END),
        "windows": job["spec"]["completions"],
    }
    r.status["activeRun"] = {k: v for k, v in run.items() if v is not None}
    what = f"[{run['start']}, {run['end']}) in {run['windows']} window(s)" if start else "source check"
    r.p.events.append((NORMAL, "MaterializationStarted", f"{trigger} run {name}: {what}"))


def _schedule(r: _Reconcile) -> None:
    """Apply the CronJob when it should exist and differs from what is there; delete it otherwise."""
    want: dict[str, Any] | None = None
    if not r.blocked and r.spec.schedule and _online(r.spec) and r.watermark is not None:
        want = build.cronjob(r.fg, r.spec, start=r.watermark, defaults=r.defaults)
        digest = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:16]
        want["metadata"]["annotations"][ANNOTATION_SPEC_HASH] = digest
        have = [c for c in r.cronjobs if c["metadata"]["name"] == want["metadata"]["name"]]
        if not have or (have[0]["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC_HASH) != digest:
            r.p.apply.append(want)
    for c in r.cronjobs:
        if want is None or c["metadata"]["name"] != want["metadata"]["name"]:
            r.p.delete.append(("batch/v1", "CronJob", c["metadata"]["name"], c["metadata"].get("uid", "")))


def _conditions(r: _Reconcile) -> None:
    """``Materialized`` (the latest finished run), ``Ready`` and ``Stalled`` (module docstring)."""
    last, active = r.status.get("lastRun"), r.status.get("activeRun")
    if r.blocked:
        reason, message = r.blocked
        r.cond("Ready", FALSE, reason, message)
        r.status["conditions"] = set_stalled(
            r.status.get("conditions"), True, reason, message, generation=r.gen, now=r.now
        )
        return
    if last is None:
        r.cond("Materialized", UNKNOWN, "Running" if active else "Pending", "no run has finished yet")
    elif last.get("phase") == RunPhase.SUCCEEDED:
        r.cond("Materialized", TRUE, "Succeeded", _describe(last))
    else:
        r.cond("Materialized", FALSE, last.get("reason") or "Failed", last.get("message") or "")
    reason, message, ok = _readiness(r, last, active)
    r.cond("Ready", TRUE if ok else FALSE, reason, message)
    failed = last or {}
    permanent = failed.get("phase") == RunPhase.FAILED and not failed.get("transient")
    stalled = permanent and not active
    r.status["conditions"] = set_stalled(
        r.status.get("conditions"), stalled, reason, message, generation=r.gen, now=r.now
    )


def _describe(run: dict[str, Any]) -> str:
    if run.get("trigger") == RunTrigger.VALIDATION:
        return f"run {run['jobName']}: the source has the declared columns and dtypes"
    return (
        f"run {run['jobName']} ({run.get('trigger')}): [{run.get('start')}, {run.get('end')}), "
        f"{run.get('rowsWritten', 0)} rows in {run.get('durationSeconds', '?')}s"
    )


def _readiness(
    r: _Reconcile, last: dict[str, Any] | None, active: dict[str, Any] | None
) -> tuple[str, str, bool]:
    """``(reason, message, ready)`` of the Ready condition."""
    online = _online(r.spec)
    kept = (
        f"; online values up to {rfc3339(r.watermark)} are still served"
        if online and r.watermark
        else ("; nothing is materialized yet" if online else "")
    )
    if last and last.get("phase") == RunPhase.FAILED:
        return (
            last.get("reason") or "Failed",
            f"run {last['jobName']} failed: {last.get('message')}{kept}",
            False,
        )
    if online and r.watermark is not None:
        return "Materialized", f"online values up to {rfc3339(r.watermark)}; {_describe(last or {})}", True
    if not online and last and last.get("generation") == r.gen:
        return "SourceValidated", _describe(last), True
    if active:
        what = "backfill" if online else "source check"
        return (
            "Materializing" if online else "Validating",
            f"{what} run {active['jobName']} in progress",
            False,
        )
    return "Pending", "no run yet", False
