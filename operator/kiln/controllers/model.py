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
import random
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s
from pydantic import ValidationError

from kiln import API_VERSION, kube, registry, storage
from kiln.api.common import spec_error
from kiln.api.model import (
    HistoryCause,
    HistoryEntry,
    Lineage,
    ModelSpec,
    ModelStatus,
    ModelVersion,
    VersionSource,
)
from kiln.conditions import FALSE, TRUE, get_condition, rfc3339, set_condition, set_stalled
from kiln.controllers import events
from kiln.controllers.runtime import ReconcileFn, Result, watch
from kiln.registry import artifacts, history
from kiln.registry.stages import Problem, Refusal, permanent
from kiln.registry.versions import find_by_artifact, find_by_training_job
from kiln.status import write_status

KIND = "Model"
watch(KIND, API_VERSION, "models")

log = logging.getLogger("kiln.model")

#: A refused declaration is re-checked this often (an artifact may be copied in later).
REFUSAL_RETRY_SECONDS = 60.0
#: Conflict retries of one registration before giving up (the caller retries later).
REGISTER_ATTEMPTS = 50


class ModelNotFound(LookupError):
    """The Model a registration names does not exist."""


class RegistrationConflict(RuntimeError):
    """The Model kept changing under a registration for :data:`REGISTER_ATTEMPTS` attempts."""


class ArtifactRefused(RuntimeError):
    """An object-store artifact did not verify, so nothing was registered.

    ``problem`` says why (reason ArtifactMissing / ArtifactInvalid / DigestMismatch /
    BucketNotFound / AccessDenied / StoreUnavailable; the last one is transient).
    """

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.reason}: {problem.message}")
        self.problem = problem


# --- shared helpers --------------------------------------------------------------------------


def load(obj: Mapping[str, Any]) -> tuple[ModelSpec, ModelStatus]:
    """Parse a Model object's spec and status.

    Raises:
        pydantic.ValidationError: the spec or status does not match the API types.
    """
    return ModelSpec.model_validate(obj.get("spec") or {}), ModelStatus.model_validate(
        obj.get("status") or {}
    )


def spec_cause(obj: Mapping[str, Any]) -> HistoryCause:
    """Rollback when the change-cause annotation names this generation, else SpecChange."""
    meta = obj.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(registry.CHANGE_CAUSE_ANNOTATION, "")
    if meta.get("generation") is not None and value == registry.rollback_annotation(int(meta["generation"])):
        return HistoryCause.ROLLBACK
    return HistoryCause.SPEC_CHANGE


def _lineage(lineage: Mapping[str, Any]) -> Lineage:
    known = set(Lineage.model_fields) | {f.alias for f in Lineage.model_fields.values() if f.alias}
    unknown = sorted(set(lineage) - known)
    if unknown:
        log.warning("ignoring unknown lineage fields %s", unknown)
    data = {k: v for k, v in lineage.items() if k in known}
    if "source" not in data:
        data["source"] = (
            VersionSource.TRAINING_JOB.value
            if (data.get("trainingJob") or data.get("training_job"))
            else VersionSource.IMPORT.value
        )
    return Lineage.model_validate(data)


def _post_changes(api: k8s.ApiClient, obj: dict[str, Any], changes: list[HistoryEntry]) -> None:
    for e in changes:
        reason = (
            "RolledBack"
            if e.cause == HistoryCause.ROLLBACK
            else ("AliasChanged" if e.alias is not None else "StageChanged")
        )
        events.record(api, obj, events.NORMAL, reason, history.describe(e))


def _conflict_backoff(attempt: int) -> None:
    """Sleep a random 0..min(0.5, 0.01 * 2^attempt) s before re-reading after a 409, so writers
    racing on one Model's resourceVersion spread out (full jitter)."""
    time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))


# --- serving rollbacks -------------------------------------------------------------------------


def record_canary_rollback(
    api: k8s.ApiClient,
    namespace: str,
    model_name: str,
    *,
    inference_service: str,
    canary_version: int,
    stable_version: int | None,
    message: str,
) -> None:
    """Append a ``CanaryRollback`` entry to the Model's ``status.history``.

    An InferenceService calls this when its analysis rolls a canary back, so the registry's
    audit trail says which version failed in serving, where and why, next to the stage changes
    that put it there. Stages are not changed: what to do about the version (demote it, fix it)
    stays a person's decision. Writes serialise on ``resourceVersion`` like registrations.

    Raises:
        ModelNotFound: the Model does not exist.
        RegistrationConflict: the Model kept changing under us for every attempt.
    """
    entry = history.entry(
        rfc3339(),
        HistoryCause.CANARY_ROLLBACK,
        inference_service=inference_service,
        from_version=canary_version,
        to_version=stable_version,
        message=message,
    )
    for attempt in range(REGISTER_ATTEMPTS):
        obj = kube.get(api, API_VERSION, KIND, namespace, model_name)
        if obj is None:
            raise ModelNotFound(f"Model {namespace}/{model_name} not found")
        _, status = load(obj)
        status.history = history.append(status.history, [entry])
        try:
            write_status(api, obj, status)
        except kube.Conflict:
            _conflict_backoff(attempt)
            continue
        events.record(api, obj, events.WARNING, "CanaryRolledBack", history.describe(entry))
        return
    raise RegistrationConflict(f"Model {namespace}/{model_name} kept changing; canary rollback not recorded")


# --- registration ------------------------------------------------------------------------------


def register_version(
    api: k8s.ApiClient,
    namespace: str,
    model_name: str,
    *,
    artifact_uri: str,
    digest: str,
    metrics: Mapping[str, float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    lineage: Mapping[str, Any],
    created_at: str | None = None,
) -> int:
    """Register an artifact as the next version of Model ``namespace/model_name``.

    Idempotent per ``lineage["trainingJob"]``: if that TrainingJob already registered a kept
    version, its number is returned and nothing is written. Otherwise the version gets number
    ``latestVersion + 1``; concurrent registrations serialise on the Model's
    ``resourceVersion`` (a 409 re-reads and renumbers), so they get distinct consecutive
    numbers. The artifact is verified first. An ``s3://`` artifact that does not verify (or a
    store that cannot be reached) is refused: nothing is registered and the caller retries. A
    ``file://`` artifact on a volume this operator does not mount is still registered, but
    ``promotionPolicy`` does not promote it.

    Args:
        lineage: Lineage fields, camelCase or snake_case (``source``, ``trainingJob``,
            ``dataset``, ``datasetDigest``, ``image``); ``source`` defaults to TrainingJob when
            ``trainingJob`` is given, else Import.
        created_at: RFC 3339 creation time of the artifact; default: its metadata.json, or now.
    Returns:
        The version number.
    Raises:
        ModelNotFound: the Model does not exist.
        ValueError (pydantic.ValidationError): a malformed digest or URI, or a Model whose
            spec or status does not parse.
        RegistrationConflict: the Model kept changing under us for every attempt.
        ArtifactRefused: an object-store artifact did not verify; nothing was registered.
        kubernetes.client.ApiException: other API errors.
    """
    lin = _lineage(lineage)
    checker = artifacts.Checker()
    meta, problem = checker.verify(artifact_uri, digest)
    if problem is not None and storage.is_remote(artifact_uri):
        raise ArtifactRefused(problem)
    created = created_at or (meta.createdAt if meta else None) or rfc3339()
    ModelVersion(
        version=1, artifact_uri=artifact_uri, digest=digest, created_at=created
    )  # fail fast on bad input
    for attempt in range(REGISTER_ATTEMPTS):
        obj = kube.get(api, API_VERSION, KIND, namespace, model_name)
        if obj is None:
            raise ModelNotFound(f"Model {namespace}/{model_name} not found")
        spec, status = load(obj)
        if lin.training_job and (done := find_by_training_job(status, lin.training_job)) is not None:
            artifacts.write_record(
                namespace, model_name, done, model_uid=obj["metadata"].get("uid"), registered_at=rfc3339()
            )
            return done.version
        out = registry.register(
            spec,
            status,
            checker,
            artifact_uri=artifact_uri,
            digest=digest,
            created_at=created,
            lineage=lin,
            metrics=metrics,
            hyperparameters=hyperparameters,
            artifact_problem=problem,
            now=rfc3339(),
            spec_cause=spec_cause(obj),
        )
        assert out.registered is not None
        try:
            write_status(api, obj, out.status)
        except kube.Conflict:
            _conflict_backoff(attempt)
            continue
        n = out.registered.version
        log.info(
            "registered %s/%s version %d (%s) after %d attempt(s)",
            namespace,
            model_name,
            n,
            digest,
            attempt + 1,
        )
        artifacts.write_record(
            namespace,
            model_name,
            out.registered,
            model_uid=obj["metadata"].get("uid"),
            registered_at=rfc3339(),
        )
        events.record(
            api,
            obj,
            events.NORMAL,
            "VersionRegistered",
            f"version {n} registered from {lin.training_job or artifact_uri} ({digest[:19]}...)",
        )
        if problem is not None and spec.promotion_policy:
            events.record(
                api,
                obj,
                events.WARNING,
                "PolicySkipped",
                f"version {n} not considered by promotionPolicy: {problem.reason}: {problem.message}",
            )
        _post_changes(api, obj, out.changes)
        return n
    raise RegistrationConflict(
        f"Model {namespace}/{model_name} changed under {REGISTER_ATTEMPTS} registration attempts; retry later"
    )


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
        )
        assert out.registered is not None
        status = out.status.model_copy(update={"imported": i + 1})
        changes += out.changes
        imported.append(out.registered)

    out = registry.settle(spec, status, checker, now=now, spec_cause=cause)
    changes += out.changes
    refusals = out.refusals + refusals
    new = out.status.to_api()
    old_ready = get_condition(raw_status.get("conditions"), "Ready")
    new["conditions"] = _conditions(raw_status.get("conditions"), refusals, out.status, gen)
    new["observedGeneration"] = gen
    # A 409 propagates: nothing was written, and the work queue decides again from a fresh read
    # before any Event of this decision is posted.
    write_status(api, obj, ModelStatus.model_validate(new))
    for v in imported:
        events.record(
            api,
            obj,
            events.NORMAL,
            "VersionRegistered",
            f"version {v.version} imported from {v.artifact_uri}",
        )
    _post_changes(api, obj, changes)
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
    return Result(requeue_after=REFUSAL_RETRY_SECONDS) if refusals else None


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
    conds: list[dict[str, Any]] | None, refusals: list[Refusal], status: ModelStatus, gen: int | None
) -> list[dict[str, Any]]:
    """``Ready`` (False naming every refusal, else True) and ``Stalled`` (True naming the
    refusals only a person can resolve, see :func:`kiln.registry.stages.permanent`)."""
    if not refusals:
        conds = set_condition(conds, "Ready", TRUE, "InForce", _summary(status), generation=gen)
        return set_stalled(conds, False)
    kept = "; the previous assignments stay in force"
    message = "; ".join(r.describe() for r in refusals) + kept
    conds = set_condition(conds, "Ready", FALSE, refusals[0].reason, message, generation=gen)
    stuck = [r for r in refusals if permanent(r, status.latest_version)]
    return set_stalled(
        conds,
        bool(stuck),
        stuck[0].reason if stuck else "",
        "; ".join(r.describe() for r in stuck) + kept,
        generation=gen,
    )


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    """The work-queue reconcile function of the Model kind."""
    return lambda ns, name: reconcile(api, ns, name)
