"""Registration: the registry's two writers outside the Model's own reconcile.

The TrainingJob controller registers a finished job's artifact (:func:`register_version`), the
InferenceService controller records a canary rollback in the Model's audit trail
(:func:`record_canary_rollback`), and the Model controller registers ``spec.import`` entries with
the same rules. This module holds them so that no controller imports another (and the ``kiln`` CLI
none at all). Both use the registry's discipline: read -> pure step (:mod:`kiln.registry`) ->
:func:`kiln.status.write_status` guarded by the ``resourceVersion`` that was read; on HTTP 409
they re-read and recompute with a jittered back-off, so two registrations never get the same
number.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s

from kiln import API_VERSION, events, kube, registry, storage
from kiln.api.model import (
    HistoryCause,
    HistoryEntry,
    Lineage,
    ModelSpec,
    ModelStatus,
    ModelVersion,
    VersionSource,
)
from kiln.conditions import rfc3339
from kiln.registry import artifacts, history
from kiln.registry.stages import Problem
from kiln.registry.versions import find_by_training_job
from kiln.status import write_status

KIND = "Model"
log = logging.getLogger("kiln.registration")

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


def post_changes(api: k8s.ApiClient, obj: dict[str, Any], changes: list[HistoryEntry]) -> None:
    """One Normal Event per stage/alias change (RolledBack, AliasChanged or StageChanged)."""
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
            format=meta.format if meta else None,
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
        post_changes(api, obj, out.changes)
        return n
    raise RegistrationConflict(
        f"Model {namespace}/{model_name} changed under {REGISTER_ATTEMPTS} registration attempts; retry later"
    )
