"""Model controller: the model registry, kept in the Model's status.

Two writers change a Model's status, and both use the same discipline, read -> pure step
(:mod:`kiln.registry`) -> :func:`kiln.status.write_status` (a merge patch of the status
subresource guarded by the ``resourceVersion`` that was read); on HTTP 409 they re-read and
recompute. So no write is ever based on a stale read, and two registrations can never get the
same number:

- :func:`register_version`, called by the TrainingJob controller when a job succeeds (and by
  this controller for ``spec.import`` entries), appends version ``latestVersion + 1``, applies
  ``promotionPolicy`` and brings into force any spec declaration naming the new number.
- :func:`reconcile` (level-based, on every watch event of the Model) registers pending
  imports, brings ``spec.stages`` / ``spec.aliases`` into force after verifying the artifacts
  they name, prunes old versions, and writes ``Ready``, ``Stalled`` (a refusal only a person
  can resolve, or an invalid spec) and ``observedGeneration``.

How spec and policy combine (also in docs/registry.md): ``spec.stages`` wins for every stage
it declares; any other stage holds the version ``promotionPolicy`` last promoted to it
(``status.policyStages``). A declaration naming a version that is not registered, whose artifact
is missing, or whose digest does not match is refused: ``Ready=False`` names it (reason
VersionNotFound / ArtifactMissing / DigestMismatch / ArtifactInvalid), a Warning event is
posted, and the previous version stays in force. The operator never writes spec.

Rollbacks: ``kiln rollback`` patches ``spec.stages`` like any promotion and sets the annotation
``kiln.dev/change-cause: Rollback:<generation>``; the controller records the changes of exactly
that generation with cause Rollback (a later edit of spec has another generation, so a stale
annotation never mislabels it).

Rebuildable status: after each registration the controller writes
``<artifact>/kiln-registration.json`` (:mod:`kiln.registry.record`) and it backfills missing
ones on reconcile, so ``kiln registry rebuild`` can restore every version under its original
number from the artifact store alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client as k8s
from pydantic import ValidationError

from kiln import API_VERSION, events, kube, registry
from kiln.api.common import spec_error
from kiln.api.model import (
    RETRAIN_REQUEST_ANNOTATION,
    HistoryCause,
    HistoryEntry,
    Lineage,
    ModelSpec,
    ModelStatus,
    ModelVersion,
    Retraining,
    RetrainingStatus,
    VersionSource,
)
from kiln.conditions import FALSE, TRUE, get_condition, parse_time, rfc3339, set_condition, set_stalled
from kiln.controllers.runtime import ReconcileFn, Result, watch, watch_children
from kiln.registration import (
    post_changes,
    spec_cause,
)
from kiln.registry import artifacts, history
from kiln.registry import retraining as retrain
from kiln.registry.stages import Refusal, permanent
from kiln.registry.versions import find_by_artifact
from kiln.resources import retraining as retrain_res
from kiln.rollout.analysis import render_query
from kiln.rollout.prometheus import PrometheusClient, PrometheusError
from kiln.status import write_status

KIND = "Model"
watch(KIND, API_VERSION, "models")
watch_children(KIND, API_VERSION, "trainingjobs", retrain_res.LABEL_MODEL)

log = logging.getLogger("kiln.model")

#: A refused declaration is re-checked this often (an artifact may be copied in later).
REFUSAL_RETRY_SECONDS = 60.0
#: Longest a drift trigger's Prometheus query may take, in seconds.
QUERY_TIMEOUT_SECONDS = 10.0
# --- reconcile ---------------------------------------------------------------------------------


def reconcile(api: k8s.ApiClient, namespace: str, name: str) -> Result | None:
    """Register pending imports, bring declared stages and aliases into force, prune, report.

    Writes ``status`` (guarded by ``resourceVersion``; a conflict requeues at once), posts
    events for stage/alias changes and new refusals, backfills registration records. Refused
    declarations are re-checked every :data:`REFUSAL_RETRY_SECONDS`.
    """
    obj = kube.get(api, API_VERSION, KIND, namespace, name)
    if obj is None:
        return None
    meta = obj["metadata"]
    gen = meta.get("generation")
    raw_status: dict[str, Any] = obj.get("status") or {}
    try:
        spec = ModelSpec.model_validate(obj.get("spec") or {})
    except ValidationError as e:  # what the CRD schema cannot see (e.g. a version in two stages)
        conds = set_condition(
            raw_status.get("conditions"), "Ready", FALSE, "InvalidSpec", spec_error(e), generation=gen
        )
        conds = set_stalled(conds, True, "InvalidSpec", spec_error(e), generation=gen)
        new = {**raw_status, "conditions": conds, "observedGeneration": gen}
        write_status(api, obj, ModelStatus.model_validate(new))  # a 409 re-runs the reconcile
        if _ready_message(new) != _ready_message(raw_status):
            events.record(api, obj, events.WARNING, "InvalidSpec", spec_error(e))
        return None

    status = ModelStatus.model_validate(raw_status)
    now = rfc3339()
    cause = spec_cause(obj)
    checker = artifacts.Checker()
    changes: list[HistoryEntry] = []
    refusals: list[Refusal] = []
    imported: list[ModelVersion] = []
    imports = spec.import_ or []
    while status.imported < len(imports):
        i, imp = status.imported, imports[status.imported]
        if find_by_artifact(status, imp.artifact_uri, imp.digest) is not None:
            status = status.model_copy(update={"imported": i + 1})
            continue
        artifact_meta, problem = checker.verify(imp.artifact_uri, imp.digest)
        if problem is not None:
            refusals.append(Refusal(f"import[{i}]", None, problem.reason, problem.message))
            break
        out = registry.register(
            spec,
            status,
            checker,
            artifact_uri=imp.artifact_uri,
            digest=imp.digest,
            created_at=artifact_meta.createdAt if artifact_meta else now,
            lineage=Lineage(source=VersionSource.IMPORT),
            metrics=imp.metrics,
            hyperparameters=imp.hyperparameters,
            now=now,
            spec_cause=cause,
            format=artifact_meta.format if artifact_meta else None,
        )
        assert out.registered is not None
        status = out.status.model_copy(update={"imported": i + 1})
        changes += out.changes
        imported.append(out.registered)

    out = registry.settle(spec, status, checker, now=now, spec_cause=cause)
    changes += out.changes
    refusals = out.refusals + refusals
    decision = _retraining(api, obj, spec.retraining, out.status, parse_time(now) or datetime.now(UTC))
    settled = _with_retraining(out.status, decision, now)
    new = settled.to_api()
    old_ready = get_condition(raw_status.get("conditions"), "Ready")
    new["conditions"] = _conditions(raw_status.get("conditions"), refusals, settled, gen, decision)
    new["observedGeneration"] = gen
    # A 409 propagates: nothing was written, and the work queue decides again from a fresh read
    # before any Event of this decision is posted (and before a retraining run is created: its
    # intent is in this status first).
    stored = write_status(api, obj, ModelStatus.model_validate(new))
    if decision is not None:
        assert spec.retraining is not None
        _run_retraining(api, stored, spec.retraining, decision)
    for v in imported:
        events.record(
            api,
            obj,
            events.NORMAL,
            "VersionRegistered",
            f"version {v.version} imported from {v.artifact_uri}",
        )
    post_changes(api, obj, changes)
    if refusals and _ready_message(new) != (old_ready or {}).get("message"):
        for r in refusals:
            events.record(
                api,
                obj,
                events.WARNING,
                "ImportFailed" if r.target.startswith("import") else "PromotionRefused",
                r.describe(),
            )
    artifacts.backfill_records(namespace, name, meta.get("uid"), out.status.versions or [], now=now)
    delays = [REFUSAL_RETRY_SECONDS] if refusals else []
    if decision is not None and decision.requeue_after is not None:
        delays.append(decision.requeue_after)
    return Result(requeue_after=min(delays)) if delays else None


# --- retraining ---------------------------------------------------------------------------------


def _run_of(job: Mapping[str, Any]) -> retrain.Run:
    """A retraining TrainingJob as :mod:`kiln.registry.retraining` sees it."""
    meta, st = job["metadata"], job.get("status") or {}
    phase = st.get("phase")
    failure = (st.get("lastFailure") or {}).get("message") or (
        get_condition(st.get("conditions"), "Ready") or {}
    ).get("message", "")
    trigger = (meta.get("annotations") or {}).get(retrain_res.ANNOTATION_TRIGGER, "")
    return retrain.Run(
        name=meta["name"],
        number=int((meta.get("labels") or {}).get(retrain_res.LABEL_RUN) or 0),
        created=parse_time(meta.get("creationTimestamp")) or datetime.now(UTC),
        phase=phase if phase in (retrain.SUCCEEDED, retrain.FAILED) else retrain.ACTIVE,
        finished=parse_time(st.get("completionTime")),
        triggers=tuple(t for t in trigger.split(",") if t),
        failure=str(failure)[:512],
    )


def _drift_reading(r: Retraining, namespace: str, name: str) -> retrain.DriftReading:
    """The drift query's largest sample (None: no data), or the error that stopped it."""
    d = r.triggers.drift
    assert d is not None
    prom = PrometheusClient(d.prometheus.address, timeout=min(QUERY_TIMEOUT_SECONDS, d.interval_seconds))
    try:
        values = prom.query(render_query(d.query, {"namespace": namespace, "model": name}))
    except (KeyError, PrometheusError) as e:
        return retrain.DriftReading(None, error=str(e).strip("'\"")[:1024])
    finite = [v for v in values if not math.isnan(v)]
    return retrain.DriftReading(max(finite) if finite else None)


def _materialization_time(api: k8s.ApiClient, namespace: str, r: Retraining) -> datetime | None:
    """The FeatureGroup's ``status.lastMaterializationTime`` (None: no trigger, no group, never)."""
    if r.triggers.new_data is None:
        return None
    fg = kube.get(api, API_VERSION, "FeatureGroup", namespace, r.triggers.new_data.feature_group_ref.name)
    raw = ((fg or {}).get("status") or {}).get("lastMaterializationTime")
    try:
        return parse_time(raw)
    except ValueError:
        return None


def _retraining(
    api: k8s.ApiClient, obj: dict[str, Any], r: Retraining | None, status: ModelStatus, now: datetime
) -> retrain.Decision | None:
    """Read what retraining decides from (its TrainingJobs, the FeatureGroup, Prometheus), decide."""
    if r is None:
        return None
    meta = obj["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta.get("uid")
    jobs = kube.list_objects(api, API_VERSION, "TrainingJob", ns, retrain_res.run_selector(name))
    runs = [
        _run_of(j)
        for j in jobs
        if any(o.get("uid") == uid for o in j["metadata"].get("ownerReferences") or [])
    ]
    prev = status.retraining
    obs = retrain.Observations(
        request=(meta.get("annotations") or {}).get(RETRAIN_REQUEST_ANNOTATION),
        materialization_time=_materialization_time(api, ns, r),
        drift=_drift_reading(r, ns, name) if retrain.drift_due(r, prev, now) else None,
        registered_jobs=frozenset(
            v.lineage.training_job for v in status.versions or [] if v.lineage and v.lineage.training_job
        ),
        template_hash=retrain.template_hash(r),
    )
    return retrain.decide(name, r, prev, runs, obs, now)


def _with_retraining(status: ModelStatus, d: retrain.Decision | None, now: str) -> ModelStatus:
    """``status`` with the retraining state, and a history entry for a new run."""
    if d is None:
        return status.model_copy(update={"retraining": None})
    update: dict[str, Any] = {"retraining": d.status}
    if d.new_run and d.create is not None:
        e = history.entry(now, HistoryCause.RETRAINING, training_job=d.create.name, message=d.create.message)
        update["history"] = history.append(status.history, [e])
    return status.model_copy(update=update)


def _run_retraining(api: k8s.ApiClient, stored: dict[str, Any], r: Retraining, d: retrain.Decision) -> None:
    """Create the run's TrainingJob (its intent is already in ``stored``'s status), post events.

    A TrainingJob the API server refuses fails the run (a second status write), so the
    back-off and suspension stop a template that can never work from looping.
    """
    for type_, reason, message in d.events:
        events.record(api, stored, type_, reason, message)
    if d.create is None:
        return
    manifest = retrain_res.training_job(stored, r.template, d.create)
    try:
        if kube.create(api, manifest) is not None:
            log.info(
                "retraining: created TrainingJob %s/%s", manifest["metadata"]["namespace"], d.create.name
            )
    except kube.Rejected as e:
        message = kube.server_message(e)
        log.warning("retraining: TrainingJob %s refused: %s", d.create.name, message)
        status = ModelStatus.model_validate(stored.get("status") or {})
        assert status.retraining is not None
        failed = retrain.rejected(status.retraining, message, datetime.now(UTC))
        new = status.model_copy(update={"retraining": failed}).to_api()
        gen = stored["metadata"].get("generation")
        new["conditions"] = _retraining_conditions(new.get("conditions"), failed, None, gen)
        write_status(api, stored, ModelStatus.model_validate(new))
        events.record(api, stored, events.WARNING, "RetrainingTemplateRejected", message)


def _retraining_conditions(
    conds: list[dict[str, Any]] | None,
    st: RetrainingStatus | None,
    d: retrain.Decision | None,
    gen: int | None,
) -> list[dict[str, Any]]:
    """``RetrainingSuspended`` (absent without retraining) and, over a Ready=True, Ready=False
    with reason RetrainingSuspended (and Stalled) or RetrainingTemplateRejected."""
    if st is None:
        return [c for c in conds or [] if c.get("type") != "RetrainingSuspended"]
    suspended = d is not None and d.suspended
    state = (d.state, d.message) if d is not None else ("Failed", st.last_run.message if st.last_run else "")
    conds = set_condition(
        conds, "RetrainingSuspended", TRUE if suspended else FALSE, state[0], state[1], generation=gen
    )
    ready = get_condition(conds, "Ready") or {}
    if ready.get("status") == FALSE and ready.get("reason") not in (
        "RetrainingSuspended",
        "RetrainingTemplateRejected",
    ):
        return conds  # the registry's refusals come first
    last = st.last_run
    if suspended:
        conds = set_condition(conds, "Ready", FALSE, "RetrainingSuspended", state[1], generation=gen)
        return set_stalled(conds, True, "RetrainingSuspended", state[1], generation=gen)
    if last is not None and last.reason == retrain.TEMPLATE_REJECTED and last.result is not None:
        conds = set_condition(
            conds, "Ready", FALSE, "RetrainingTemplateRejected", last.message, generation=gen
        )
    return conds


def _ready_message(status: Mapping[str, Any]) -> str | None:
    c = get_condition(status.get("conditions"), "Ready")
    return c.get("message") if c else None


def _summary(status: ModelStatus) -> str:
    parts = [f"latest version {status.latest_version}"]
    st = status.stages
    if st is not None:
        parts += [
            f"{name}: {v}"
            for name, v in (
                ("Production", st.production),
                ("Staging", st.staging),
                ("Development", st.development),
            )
            if v is not None
        ]
    if status.aliases:
        parts.append("aliases: " + ", ".join(f"{a}={v}" for a, v in sorted(status.aliases.items())))
    return "; ".join(parts)


def _conditions(
    conds: list[dict[str, Any]] | None,
    refusals: list[Refusal],
    status: ModelStatus,
    gen: int | None,
    retraining: retrain.Decision | None = None,
) -> list[dict[str, Any]]:
    """``Ready`` (False naming every refusal, else True) and ``Stalled`` (True naming the
    refusals only a person can resolve, see :func:`kiln.registry.stages.permanent`), then the
    retraining conditions (:func:`_retraining_conditions`)."""
    if not refusals:
        conds = set_condition(conds, "Ready", TRUE, "InForce", _summary(status), generation=gen)
        conds = set_stalled(conds, False)
        return _retraining_conditions(conds, status.retraining, retraining, gen)
    kept = "; the previous assignments stay in force"
    message = "; ".join(r.describe() for r in refusals) + kept
    conds = set_condition(conds, "Ready", FALSE, refusals[0].reason, message, generation=gen)
    stuck = [r for r in refusals if permanent(r, status.latest_version)]
    conds = set_stalled(
        conds,
        bool(stuck),
        stuck[0].reason if stuck else "",
        "; ".join(r.describe() for r in stuck) + kept,
        generation=gen,
    )
    return _retraining_conditions(conds, status.retraining, retraining, gen)


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    """The work-queue reconcile function of the Model kind."""
    return lambda ns, name: reconcile(api, ns, name)
