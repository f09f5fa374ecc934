"""InferenceService controller: serve a Model version, roll new versions out as canaries.

One level-based reconcile per InferenceService (see :mod:`kiln.controllers.runtime`):

1. read the InferenceService and its Model; resolve ``spec.modelRef`` (stage, version or alias)
   to a version with an artifact URI and digest. A missing Model or version is
   ``Ready=False`` (``ModelNotFound`` / ``VersionNotResolved``) and leaves running children alone;
   so are the FeatureGroups of ``spec.featureGroups`` (``FeatureGroupNotFound``,
   ``FeatureGroupInvalid``, ``FeatureGroupNotOnline``) and a version trained on another schema of
   one of them (``FeatureSchemaMismatch``: :func:`check_feature_schema`): the stable keeps serving;
2. observe the stable and canary Deployments (readiness, rolled-out version, progress deadline);
3. when :func:`kiln.rollout.machine.analysis_due`, run the analysis queries against Prometheus;
4. call the pure state machine :func:`kiln.rollout.machine.decide`;
5. apply the children it plans with server-side apply, delete children no longer wanted;
6. write status (:func:`kiln.status.write_status`: no write when nothing changed, a 409
   re-runs the reconcile), then post Events.

Watches: InferenceServices, their Deployments and Services (label
``kiln.dev/inferenceservice``), Models and FeatureGroups: a Model or FeatureGroup event enqueues
every InferenceService of that namespace that references it (in-memory indexes fed by
InferenceService events).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kiln import API_VERSION, GROUP, VERSION, events, failpoints, kube
from kiln.api.common import spec_error
from kiln.api.featuregroup import FeatureGroupSpec
from kiln.api.inferenceservice import (
    ENGINE_FORMATS,
    Engine,
    InferenceServiceSpec,
    InferenceServiceStatus,
    ModelSelector,
    TrafficRouting,
)
from kiln.conditions import FALSE, TRUE, get_condition, set_condition, set_stalled
from kiln.controllers.runtime import ReconcileFn, Result, enqueue, watch, watch_children
from kiln.features.schema import FeatureView
from kiln.resources import inferenceservice as res
from kiln.resources.storage import StorageDefaults
from kiln.rollout.analysis import ERROR, evaluate_metric, render_query
from kiln.rollout.machine import Action, Decision, Measurement, Observed, analysis_due, decide
from kiln.rollout.prometheus import PrometheusClient, PrometheusError
from kiln.rollout.templates import query_of
from kiln.status import write_status

log = logging.getLogger("kiln.inferenceservice")

KIND = "InferenceService"
PLURAL = "inferenceservices"
watch(KIND, API_VERSION, PLURAL)
watch_children(KIND, "apps/v1", "deployments", res.LABEL_ISVC)
watch_children(KIND, "v1", "services", res.LABEL_ISVC)

#: Longest a single Prometheus query may take, in seconds.
QUERY_TIMEOUT_SECONDS = 10.0


class ReferenceIndex:
    """Which InferenceServices reference which objects of one kind (their Model, or their
    FeatureGroups): ``(namespace, name) -> {isvc names}``.

    Fed by InferenceService watch events (kopf lists every object at start-up, so the index is
    complete once the operator has synced) and by each reconcile; thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[tuple[str, str], frozenset[str]] = {}

    def set(self, namespace: str, isvc: str, names: str | Iterable[str] | None) -> None:
        """Record what ``isvc`` references now (a name, names, or None/empty: nothing)."""
        refs = frozenset([names] if isinstance(names, str) else names or ())
        with self._lock:
            if refs:
                self._refs[(namespace, isvc)] = refs
            else:
                self._refs.pop((namespace, isvc), None)

    def users(self, namespace: str, name: str) -> list[str]:
        """Names of the InferenceServices in ``namespace`` that reference ``name``."""
        with self._lock:
            return sorted(n for (ns, n), refs in self._refs.items() if ns == namespace and name in refs)


#: InferenceServices by Model, and by FeatureGroup.
INDEX = ReferenceIndex()
FEATURE_GROUP_INDEX = ReferenceIndex()


def _model_name(spec: Mapping[str, Any] | None) -> str | None:
    ref = (spec or {}).get("modelRef") or {}
    name = ref.get("name")
    return str(name) if name else None


def _feature_group_names(spec: Mapping[str, Any] | None) -> list[str]:
    refs = (spec or {}).get("featureGroups") or []
    return [str(r["name"]) for r in refs if isinstance(r, Mapping) and r.get("name")]


def _index(namespace: str, name: str, spec: Mapping[str, Any] | None) -> None:
    INDEX.set(namespace, name, _model_name(spec))
    FEATURE_GROUP_INDEX.set(namespace, name, _feature_group_names(spec))


@kopf.on.event(GROUP, VERSION, PLURAL, id="index-inferenceservices-by-model")
async def _index_isvc(body: kopf.Body, type: str | None, **_: Any) -> None:
    _index(
        body.metadata.namespace or "",
        body.metadata.name or "",
        None if type == "DELETED" else body.get("spec"),
    )


@kopf.on.event(GROUP, VERSION, "models", id="watch-models-for-inferenceservices")
async def _on_model_event(body: kopf.Body, **_: Any) -> None:
    ns = body.metadata.namespace or ""
    for isvc in INDEX.users(ns, body.metadata.name or ""):
        enqueue(KIND, ns, isvc)


@kopf.on.event(GROUP, VERSION, "featuregroups", id="watch-featuregroups-for-inferenceservices")
async def _on_feature_group_event(body: kopf.Body, **_: Any) -> None:
    ns = body.metadata.namespace or ""
    for isvc in FEATURE_GROUP_INDEX.users(ns, body.metadata.name or ""):
        enqueue(KIND, ns, isvc)


class Unresolved(Exception):
    """``spec.modelRef`` does not resolve to a served version; ``reason`` is CamelCase."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def resolve_version(model: Mapping[str, Any] | None, ref: ModelSelector) -> dict[str, Any]:
    """The Model status version entry (``version``, ``artifactUri``, ``digest``...) ``ref`` names.

    Reads the Model's status as plain data (lenient: fields this kind does not know are fine).

    Raises:
        Unresolved: ``ModelNotFound`` when the Model does not exist, ``VersionNotResolved`` when
            the stage/alias names no version, the version is not registered, or lacks an artifact.
    """
    if model is None:
        raise Unresolved("ModelNotFound", f"Model {ref.name!r} not found in this namespace")
    status = model.get("status") or {}
    if ref.stage:
        number = (status.get("stages") or {}).get(ref.stage.lower())
        what = f"stage {ref.stage}"
        if number is None:
            raise Unresolved(
                "VersionNotResolved", f"no version of Model {ref.name!r} holds stage {ref.stage}"
            )
    elif ref.alias:
        number = (status.get("aliases") or {}).get(ref.alias)
        what = f"alias {ref.alias!r}"
        if number is None:
            raise Unresolved("VersionNotResolved", f"Model {ref.name!r} has no alias {ref.alias!r}")
    else:
        number = ref.version
        what = f"version {ref.version}"
    for v in status.get("versions") or []:
        if v.get("version") == number:
            if not v.get("artifactUri") or not v.get("digest"):
                raise Unresolved(
                    "VersionNotResolved", f"version {number} of Model {ref.name!r} has no artifact"
                )
            return dict(v)
    raise Unresolved(
        "VersionNotResolved", f"{what} of Model {ref.name!r} names version {number}, which is not registered"
    )


def resolve_feature_groups(
    spec: InferenceServiceSpec, namespace: str, found: Mapping[str, Mapping[str, Any] | None]
) -> list[FeatureView]:
    """The FeatureGroups of ``spec.featureGroups`` as read (``found``: name -> object or None), in order.

    Raises:
        Unresolved: ``FeatureGroupNotFound`` (absent), ``FeatureGroupInvalid`` (its spec does not
            validate), ``FeatureGroupNotOnline`` (no ``online.enabled`` and ``online.store``:
            nothing to read features from), naming the FeatureGroup.
    """
    out = []
    for ref in spec.feature_groups or []:
        obj = found.get(ref.name)
        if obj is None:
            raise Unresolved(
                "FeatureGroupNotFound",
                f"FeatureGroup {ref.name} (spec.featureGroups) not found in this namespace",
            )
        try:
            fg_spec = FeatureGroupSpec.model_validate(obj.get("spec") or {})
        except ValidationError as e:
            raise Unresolved(
                "FeatureGroupInvalid", f"FeatureGroup {ref.name} is invalid: {spec_error(e)}"
            ) from None
        if not fg_spec.online.enabled or fg_spec.online.store is None:
            raise Unresolved(
                "FeatureGroupNotOnline",
                f"FeatureGroup {ref.name} has no online store (online.enabled and online.store): "
                "entity-key requests cannot read its features",
            )
        out.append(FeatureView(namespace, ref.name, fg_spec))
    return out


def check_feature_schema(version: Mapping[str, Any], groups: Sequence[FeatureView], model: str) -> None:
    """Refuse a version trained on FeatureGroup definitions other than those served.

    A version whose ``lineage.featureGroupSchemaDigest`` is set, served with ``groups`` (not
    empty), must have been trained on one of them (``lineage.featureGroup``, or any of them when
    the lineage names none) with that schema digest: the server would otherwise feed it features
    computed under other definitions. A version without that lineage, or an InferenceService
    without FeatureGroups, passes.

    Raises:
        Unresolved: ``FeatureSchemaMismatch`` naming the FeatureGroup and both digests.
    """
    lineage = version.get("lineage") or {}
    trained = lineage.get("featureGroupSchemaDigest")
    if not trained or not groups:
        return
    number, name = version.get("version"), lineage.get("featureGroup")
    served = {g.name: g.digest for g in groups}
    what = f"version {number} of Model {model!r} was trained on FeatureGroup {name or '(unnamed)'} with schema digest {trained}"
    if name is None:
        if trained not in served.values():
            raise Unresolved(
                "FeatureSchemaMismatch",
                f"{what}; the FeatureGroups served have {', '.join(f'{n}: {d}' for n, d in served.items())}",
            )
    elif name not in served:
        raise Unresolved(
            "FeatureSchemaMismatch", f"{what}, which spec.featureGroups does not name ({', '.join(served)})"
        )
    elif served[name] != trained:
        raise Unresolved(
            "FeatureSchemaMismatch",
            f"{what}; FeatureGroup {name} now has schema digest {served[name]}: retrain on it, or "
            "restore its features; the version served so far keeps serving",
        )


def check_runtime_format(version: Mapping[str, Any], engine: Engine | str, model: str) -> None:
    """Refuse a version whose artifact format the runtime's engine does not serve
    (:data:`ENGINE_FORMATS`): an LLM directory on kiln-serve, a tensor model on vLLM. A version
    whose format the registry could not read (``format`` unset: a ``file://`` artifact the
    operator does not mount) passes: the server's own check refuses it when it starts.

    Raises:
        Unresolved: ``RuntimeFormatMismatch`` naming the version, its format and the engine.
    """
    fmt, engine = version.get("format"), Engine(engine)
    if fmt is None or fmt in ENGINE_FORMATS[engine]:
        return
    fits = sorted(str(e) for e, formats in ENGINE_FORMATS.items() if fmt in formats)
    hint = f"; use runtime.engine {' or '.join(fits)}" if fits else ""
    raise Unresolved(
        "RuntimeFormatMismatch",
        f"version {version.get('version')} of Model {model!r} is a {fmt} artifact, which runtime.engine "
        f"{engine} does not serve (it serves {', '.join(ENGINE_FORMATS[engine])}){hint}",
    )


def _version_entry(model: Mapping[str, Any] | None, number: int) -> Mapping[str, Any] | None:
    for v in ((model or {}).get("status") or {}).get("versions") or []:
        if v.get("version") == number:
            return dict(v)
    return None


def _features_env(
    model: Mapping[str, Any] | None,
    number: int | None,
    dep: Mapping[str, Any] | None,
    groups: Sequence[FeatureView],
    name: str,
) -> str | None:
    """``KILN_FEATURE_GROUPS`` of the Deployment serving ``number``: the current FeatureGroups,
    unless that version was trained on other definitions of them (a stable version while a
    version trained on the new ones is the canary), which keeps what its live Deployment has."""
    if not groups or number is None:
        return None
    entry = _version_entry(model, number)
    try:
        if entry is not None:
            check_feature_schema(entry, groups, name)
        return res.feature_groups_env(groups)
    except Unresolved:
        env = {e.get("name"): e.get("value") for e in _container(dep or {}).get("env") or []}
        live = env.get(res.ENV_FEATURE_GROUPS)
        return str(live) if live else None


def _artifact_of(
    model: Mapping[str, Any] | None, number: int, dep: Mapping[str, Any] | None
) -> tuple[int, str, str] | None:
    """``(version, artifactUri, digest)`` of ``number``: from the Model, else from the live Deployment.

    The fallback covers a stable version pruned from the Model's status since it was deployed.
    """
    for v in ((model or {}).get("status") or {}).get("versions") or []:
        if v.get("version") == number and v.get("artifactUri") and v.get("digest"):
            return number, str(v["artifactUri"]), str(v["digest"])
    if dep is not None and _template_version(dep) == number:
        env = {e.get("name"): e.get("value") for e in _container(dep).get("env") or []}
        uri, digest = env.get(res.ENV_ARTIFACT_URI), env.get(res.ENV_ARTIFACT_DIGEST)
        if uri and digest:
            return number, str(uri), str(digest)
    return None


def _container(dep: Mapping[str, Any]) -> dict[str, Any]:
    for c in dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []:
        if c.get("name") == res.CONTAINER:
            return dict(c)
    return {}


def _template_version(dep: Mapping[str, Any] | None) -> int | None:
    if dep is None:
        return None
    raw = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}).get(res.LABEL_VERSION)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _current(dep: Mapping[str, Any]) -> bool:
    st = dep.get("status") or {}
    return int(st.get("observedGeneration") or 0) >= int(dep.get("metadata", {}).get("generation") or 0)


def ready_replicas(dep: Mapping[str, Any] | None, version: int | None) -> int:
    """Ready pods of ``dep`` that run ``version`` (0 while it runs another version or is mid-update)."""
    if dep is None or version is None or _template_version(dep) != version or not _current(dep):
        return 0
    st = dep.get("status") or {}
    if int(st.get("replicas") or 0) != int(st.get("updatedReplicas") or 0):
        return 0  # old pods still around: some Ready pods may run the previous version
    return int(st.get("readyReplicas") or 0)


def rolled_out_version(dep: Mapping[str, Any] | None) -> int | None:
    """The version every pod of ``dep`` runs and is available with, or None while rolling."""
    if dep is None or not _current(dep):
        return None
    want = int(dep.get("spec", {}).get("replicas") or 0)
    st = dep.get("status") or {}
    if (
        int(st.get("replicas") or 0) == want
        and int(st.get("updatedReplicas") or 0) == want
        and int(st.get("availableReplicas") or 0) >= want
    ):
        return _template_version(dep)
    return None


def progress_failure(dep: Mapping[str, Any] | None, version: int | None) -> str | None:
    """The Deployment's ``ProgressDeadlineExceeded`` message for ``version``, else None."""
    if dep is None or version is None or _template_version(dep) != version:
        return None
    for c in (dep.get("status") or {}).get("conditions") or []:
        if (
            c.get("type") == "Progressing"
            and c.get("status") == "False"
            and c.get("reason") == "ProgressDeadlineExceeded"
        ):
            return str(c.get("message") or "canary pods did not become Ready within the progress deadline")
    return None


def replica_failure(dep: Mapping[str, Any] | None) -> str | None:
    """The Deployment's ``ReplicaFailure=True`` message, else None: its ReplicaSet cannot create
    pods (PodSecurity admission, a ResourceQuota, a webhook), so no pod of it will ever start
    until that changes. The API server accepted the Deployment; only this condition says so."""
    for c in ((dep or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return str(c.get("message") or c.get("reason") or "ReplicaFailure")
    return None


def measure(
    spec: InferenceServiceSpec, status: InferenceServiceStatus, namespace: str, name: str
) -> Measurement:
    """Run every analysis query for the running canary; errors become ``Error`` results."""
    analysis = spec.rollout.analysis
    assert analysis is not None and status.canary_version is not None
    prom = PrometheusClient(
        analysis.prometheus.address, timeout=min(QUERY_TIMEOUT_SECONDS, analysis.interval_seconds)
    )
    variables = {
        "version": str(status.canary_version),
        "namespace": namespace,
        "service": res.service_name(name),
        "model": spec.model_ref.name,
        "inferenceservice": name,
    }
    results = []
    for metric in analysis.metrics:
        try:
            values = prom.query(render_query(query_of(metric), variables))
        except (KeyError, PrometheusError) as e:
            results.append(evaluate_metric(metric, None, analysis.no_data_policy, error=str(e).strip("'\"")))
            continue
        results.append(evaluate_metric(metric, values, analysis.no_data_policy))
    errors = [r for r in results if r.phase == ERROR]
    if errors:
        log.warning(
            "analysis of %s/%s: %s", namespace, name, "; ".join(f"{r.name}: {r.message}" for r in errors)
        )
    return Measurement(version=status.canary_version, results=tuple(results))


def _children(api: k8s.ApiClient, obj: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """This InferenceService's children by (kind, name): one LIST per child kind, owned ones only.

    A kind whose CRD is not installed (404) has none.
    """
    ns, name, uid = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["metadata"]["uid"]
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for api_version, kind in res.CHILD_KINDS:
        try:
            items = kube.list_objects(api, api_version, kind, ns, f"{res.LABEL_ISVC}={name}")
        except ApiException as e:
            if e.status == 404:
                continue
            raise
        for it in items:
            if any(r.get("uid") == uid for r in it["metadata"].get("ownerReferences") or []):
                it.setdefault("apiVersion", api_version)
                out[(kind, it["metadata"]["name"])] = it
    return out


def _apply_children(
    api: k8s.ApiClient,
    obj: dict[str, Any],
    manifests: list[dict[str, Any]],
    keep: set[tuple[str, str]],
    children: dict[tuple[str, str], dict[str, Any]],
) -> list[str]:
    """Apply the ``manifests`` that ``children`` (as listed) do not already match; delete
    children neither among them nor in ``keep``. Nothing is written for a child at rest
    (:func:`kiln.kube.covers`).

    Returns problems for the Ready condition (a kind whose CRD is not installed: 404).
    """
    problems: list[str] = []
    wanted = {(m["kind"], m["metadata"]["name"]) for m in manifests} | keep
    for m in manifests:
        live = children.get((m["kind"], m["metadata"]["name"]))
        if live is not None and kube.covers(live, m):
            continue
        try:
            kube.apply(api, m)
        except ApiException as e:
            if e.status == 404:
                group = m["apiVersion"].split("/")[0]
                problems.append(f"{m['kind']} not created: the {group} CRDs are not installed")
                continue
            raise
    ns = obj["metadata"]["namespace"]
    for (kind, child), it in children.items():
        if (kind, child) not in wanted:
            log.info("deleting %s %s/%s (no longer wanted)", kind, ns, child)
            kube.delete(api, it["apiVersion"], kind, ns, child, uid=it["metadata"].get("uid"))
    return problems


def _record_model_rollback(
    api: k8s.ApiClient, action: Action, namespace: str, model: str, inference_service: str
) -> None:
    """Record a canary rollback in the Model's audit trail (``status.history``), best effort.

    The rollback itself is already done and recorded in this InferenceService's status and
    Events; a Model that is gone or keeps changing only costs the registry entry (logged).
    """
    from kiln.registration import RegistrationConflict, record_canary_rollback

    assert action.version is not None
    try:
        record_canary_rollback(
            api,
            namespace,
            model,
            inference_service=inference_service,
            canary_version=action.version,
            stable_version=action.stable_version,
            message=f"{action.reason}: {action.message}",
        )
    except (LookupError, RegistrationConflict, ApiException) as e:
        log.warning(
            "canary rollback of %s/%s version %s not recorded in the Model: %s",
            namespace,
            model,
            action.version,
            e,
        )


def _set(
    conds: list[dict[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    gen: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    return set_condition(conds, type_, status, reason, message, generation=gen, now=now)


def reconcile(api: k8s.ApiClient, namespace: str, name: str) -> Result | None:
    """Reconcile one InferenceService (see the module docstring for the steps)."""
    obj = kube.get(api, API_VERSION, KIND, namespace, name)
    if obj is None:
        _index(namespace, name, None)
        return None
    meta = obj["metadata"]
    gen = meta.get("generation")
    old_status: dict[str, Any] = dict(obj.get("status") or {})
    now = datetime.now(UTC)
    _index(namespace, name, obj.get("spec"))
    try:
        spec = InferenceServiceSpec.model_validate(obj.get("spec") or {})
    except ValidationError as e:
        return _not_ready(api, obj, old_status, "InvalidSpec", spec_error(e), now)
    try:
        status = InferenceServiceStatus.model_validate(old_status)
    except ValidationError as e:  # a hand-edited status: start over rather than crash-loop
        log.warning("status of %s/%s is invalid (%s); starting from an empty status", namespace, name, e)
        status = InferenceServiceStatus(conditions=None)
    model = kube.get(api, API_VERSION, "Model", namespace, spec.model_ref.name)
    try:
        resolved = resolve_version(model, spec.model_ref)
    except Unresolved as u:
        return _not_ready(api, obj, old_status, u.reason, u.message, now, model_loaded=False)
    found = {
        r.name: kube.get(api, API_VERSION, "FeatureGroup", namespace, r.name)
        for r in spec.feature_groups or []
    }
    try:
        check_runtime_format(resolved, spec.runtime.engine, spec.model_ref.name)
        groups = resolve_feature_groups(spec, namespace, found)
        check_feature_schema(resolved, groups, spec.model_ref.name)
    except Unresolved as u:
        return _not_ready(api, obj, old_status, u.reason, u.message, now)

    children = _children(api, obj)
    deps = {t: children.get(("Deployment", res.deployment_name(name, t))) for t in (res.STABLE, res.CANARY)}
    total = spec.replicas
    if spec.autoscaling is not None:
        current = int(((deps[res.STABLE] or {}).get("spec") or {}).get("replicas") or 0)
        total = max(spec.autoscaling.min_replicas, current)
    observed = Observed(
        resolved_version=int(resolved["version"]),
        total_replicas=total,
        canary_ready_replicas=ready_replicas(deps[res.CANARY], status.canary_version),
        canary_failure=progress_failure(deps[res.CANARY], status.canary_version),
        stable_rolled_out_version=rolled_out_version(deps[res.STABLE]),
    )
    measurement = measure(spec, status, namespace, name) if analysis_due(spec, status, now) else None
    d = decide(spec, status, observed, measurement, now)

    plan = d.plan
    stable = _artifact_of(model, plan.stable_version, deps[res.STABLE])
    canary = (
        _artifact_of(model, plan.canary_version, deps[res.CANARY])
        if plan.canary_version is not None
        else None
    )
    manifests = res.children(
        obj,
        spec,
        stable=stable,
        stable_replicas=plan.stable_replicas,
        canary=canary,
        canary_replicas=plan.canary_replicas,
        canary_weight=plan.canary_weight,
        defaults=StorageDefaults.from_environ(os.environ),
        stable_features=_features_env(
            model, plan.stable_version, deps[res.STABLE], groups, spec.model_ref.name
        ),
        canary_features=_features_env(
            model, plan.canary_version, deps[res.CANARY], groups, spec.model_ref.name
        ),
    )
    keep = set() if stable is not None else {("Deployment", res.deployment_name(name, res.STABLE))}
    problems = _apply_children(api, obj, manifests, keep, children)
    if status.canary_version is not None and plan.canary_weight != status.canary_weight:
        failpoints.hit("inferenceservice-step-applied")
    if stable is None:
        problems.append(
            f"artifact of stable version {plan.stable_version} is unknown (pruned from the Model?)"
        )

    # A 409 (the object changed since it was read) propagates: the work queue decides again at
    # once, before any Event or Model history entry of this decision is posted.
    write_status(
        api, obj, InferenceServiceStatus.model_validate(_status(obj, spec, d, deps, problems, gen, now))
    )
    for a in d.actions:
        if a.kind == "Event":
            events.record(api, obj, a.type, a.reason, a.message)
        elif a.kind == "ModelRollback":
            _record_model_rollback(api, a, namespace, spec.model_ref.name, meta["name"])
    return Result(requeue_after=d.requeue_after) if d.requeue_after is not None else None


def _status(
    obj: dict[str, Any],
    spec: InferenceServiceSpec,
    d: Decision,
    deps: dict[str, dict[str, Any] | None],
    problems: list[str],
    gen: int | None,
    now: datetime,
) -> dict[str, Any]:
    """The whole new status: the machine's rollout fields plus url, conditions, observedGeneration."""
    st = d.status
    name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
    conds = (obj.get("status") or {}).get("conditions")
    stable_dep = deps[res.STABLE]
    stable_ok = st.stable_version is not None and rolled_out_version(stable_dep) == st.stable_version
    if stable_ok:
        conds = _set(conds, "ModelLoaded", TRUE, "Loaded", f"version {st.stable_version} is served", gen, now)
    else:
        ready = int(((stable_dep or {}).get("status") or {}).get("readyReplicas") or 0)
        conds = _set(
            conds,
            "ModelLoaded",
            FALSE,
            "Loading",
            f"stable Deployment rolling out version {d.plan.stable_version} ({ready} pods Ready)",
            gen,
            now,
        )
    conds = _set(
        conds, "CanaryReady", d.canary_ready.status, d.canary_ready.reason, d.canary_ready.message, gen, now
    )
    conds = _set(
        conds,
        "RolloutHealthy",
        d.rollout_healthy.status,
        d.rollout_healthy.reason,
        d.rollout_healthy.message,
        gen,
        now,
    )
    gateway_missing = spec.rollout.traffic_routing == TrafficRouting.GATEWAY_API and any(
        "HTTPRoute" in p for p in problems
    )
    failures = [
        f"{track} Deployment cannot create pods: {m}"
        for track in (res.STABLE, res.CANARY)
        if (m := replica_failure(deps[track]))
    ]
    pool_missing = any("InferencePool" in p for p in problems)
    if gateway_missing:
        verdict = (FALSE, "GatewayAPINotInstalled", "; ".join(problems))
    elif pool_missing:
        verdict = (FALSE, "InferencePoolNotInstalled", "; ".join(problems))
    elif failures:
        verdict = (FALSE, "ReplicaFailure", "; ".join(failures))
    elif not stable_ok:
        verdict = (
            FALSE,
            "Loading",
            f"waiting for the stable Deployment to serve version {d.plan.stable_version}",
        )
    elif st.canary_version is not None:
        reason = "RolloutPaused" if st.rollout_phase == "Paused" else "RolloutInProgress"
        verdict = (FALSE, reason, f"canary version {st.canary_version}: {d.rollout_healthy.message}")
    elif st.rolled_back_version is not None:
        verdict = (
            FALSE,
            "RolledBack",
            f"serving stable version {st.stable_version}; {d.rollout_healthy.message}",
        )
    else:
        verdict = (TRUE, "Serving", f"serving version {st.stable_version}")
    message = verdict[2] + (
        "" if gateway_missing or pool_missing or not problems else " (" + "; ".join(problems) + ")"
    )
    conds = _set(conds, "Ready", verdict[0], verdict[1], message, gen, now)
    # A rolled-back canary is terminal for that version: nothing is retried until the model
    # resolves to another version (a new promotion, or a spec.modelRef change).
    rolled_back = st.rollout_phase == "RolledBack" and st.canary_version is None
    why = (st.history or [])[-1].message if st.history else None  # the rollback's own entry
    conds = set_stalled(
        conds,
        rolled_back,
        "RolledBack",
        f"canary version {st.rolled_back_version} was rolled back ({why or 'no details'}); serving "
        f"stable version {st.stable_version}; promote another version to roll out again",
        generation=gen,
        now=now,
    )
    out = st.to_api()
    out["conditions"] = conds
    out["observedGeneration"] = gen
    out["url"] = res.url(name, ns, spec.model_ref.name, openai=spec.runtime.is_llm)
    return out


def _not_ready(
    api: k8s.ApiClient,
    obj: dict[str, Any],
    old_status: dict[str, Any],
    reason: str,
    message: str,
    now: datetime,
    *,
    model_loaded: bool | None = None,
) -> Result | None:
    """Write ``Ready=False`` (and ``ModelLoaded=False``) with ``reason``; children are left as they are."""
    gen = obj["metadata"].get("generation")
    before = get_condition(old_status.get("conditions"), "Ready")
    conds = _set(old_status.get("conditions"), "Ready", FALSE, reason, message, gen, now)
    if model_loaded is False:
        conds = _set(conds, "ModelLoaded", FALSE, reason, message, gen, now)
    # Only an invalid spec is terminal: a missing Model or version may appear at any time.
    conds = set_stalled(conds, reason == "InvalidSpec", reason, message, generation=gen, now=now)
    write_status(api, obj, {**old_status, "conditions": conds, "observedGeneration": gen})
    if not before or before.get("reason") != reason:
        events.record(api, obj, "Warning", reason, message)
    return None


def reconciler(api: k8s.ApiClient) -> ReconcileFn:
    """The work-queue reconcile function of the InferenceService kind."""
    return lambda ns, name: reconcile(api, ns, name)
