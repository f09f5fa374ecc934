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
from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s
from pydantic import ValidationError

from kiln import API_VERSION, events, kube, registry
from kiln.api.common import spec_error
from kiln.api.model import (
    HistoryEntry,
    Lineage,
    ModelSpec,
    ModelStatus,
    ModelVersion,
    VersionSource,
)
from kiln.conditions import FALSE, TRUE, get_condition, rfc3339, set_condition, set_stalled
from kiln.controllers.runtime import ReconcileFn, Result, watch
from kiln.registration import (
    post_changes,
    spec_cause,
)
from kiln.registry import artifacts
from kiln.registry.stages import Refusal, permanent
from kiln.registry.versions import find_by_artifact
from kiln.status import write_status

KIND = "Model"
watch(KIND, API_VERSION, "models")

log = logging.getLogger("kiln.model")

#: A refused declaration is re-checked this often (an artifact may be copied in later).
REFUSAL_RETRY_SECONDS = 60.0
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
