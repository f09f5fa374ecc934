"""Model registry commands: ``kiln models``, ``versions``, ``history``, ``promote``, ``rollback``,
``registry rebuild``.

They talk to the API server of the current kubeconfig context (``$KUBECONFIG`` or
``~/.kube/config``; ``--kubeconfig`` / ``--context`` override), like kubectl. ``promote`` and
``rollback`` change ``spec`` only (so a GitOps repository can make the same change as a
reviewed commit), then wait for the operator to reflect it in ``status`` and report what is in
force, or why the change was refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kiln import API_VERSION, kube, storage
from kiln.api.model import Lineage, ModelSpec, ModelStatus, ModelVersion, Stage, VersionSource
from kiln.artifact import METADATA_FILE, ArtifactError
from kiln.conditions import get_condition, parse_time, rfc3339
from kiln.registry import CHANGE_CAUSE_ANNOTATION, artifacts, merge_patch, record, rollback_annotation
from kiln.registry import rebuild as rebuild_status
from kiln.registry import register as register_step
from kiln.registry.stages import Problem, rollback_target, stage_field
from kiln.registry.versions import get_version
from kiln.status import write_status

KIND = "Model"
STAGE_CHOICES = ("Development", "Staging", "Production", "Archived")


class CommandError(Exception):
    """A user-facing failure: printed on stderr, exit code 1."""


def add_parser(sub: Any) -> None:
    """Add the registry sub-commands to the ``kiln`` parser's sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--namespace", "-n", help="namespace (default: the kubeconfig context's, else default)"
    )
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")

    p = sub.add_parser("models", parents=[common], help="list Models with their stages")
    p.add_argument("--all-namespaces", "-A", action="store_true", help="list Models in every namespace")
    p.set_defaults(func=_guard(cmd_models))

    p = sub.add_parser("versions", parents=[common], help="list the versions of a Model")
    p.add_argument("model")
    p.set_defaults(func=_guard(cmd_versions))

    p = sub.add_parser(
        "history", parents=[common], help="show the audit trail of a Model's stages and aliases"
    )
    p.add_argument("model")
    p.set_defaults(func=_guard(cmd_history))

    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the operator to reflect the change (default 30; 0: do not wait)",
    )

    p = sub.add_parser("promote", parents=[common, wait], help="declare a version's stage or alias in spec")
    p.add_argument("model")
    p.add_argument("version", type=int)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--stage", choices=STAGE_CHOICES, help="stage to put the version in")
    target.add_argument("--alias", help="alias to point at the version (e.g. champion)")
    p.add_argument(
        "--archive-previous", action="store_true", help="archive the version that held the stage until now"
    )
    p.set_defaults(func=_guard(cmd_promote))

    p = sub.add_parser(
        "rollback", parents=[common, wait], help="return a stage to its previous version (per status.history)"
    )
    p.add_argument("model")
    p.add_argument(
        "--stage", default="Production", choices=STAGE_CHOICES[:3], help="stage (default Production)"
    )
    p.set_defaults(func=_guard(cmd_rollback))

    reg = sub.add_parser("registry", help="registry maintenance")
    rsub = reg.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)
    p = rsub.add_parser(
        "rebuild",
        parents=[common],
        help="restore a Model's versions from the artifact store (after a restore without status)",
    )
    p.add_argument("model")
    p.add_argument(
        "--artifacts",
        action="append",
        required=True,
        help="artifact store root: s3://bucket/prefix (credentials from the AWS_* environment) or a "
        "directory as mounted here; scans <root>/<model>/*/ (repeatable)",
    )
    p.add_argument(
        "--include-unregistered",
        action="store_true",
        help="also register artifacts of this model that have metadata.json but no registration "
        "record, as new versions in createdAt order",
    )
    p.add_argument(
        "--store-uri",
        help="the store root as the operator sees it, for --include-unregistered "
        "(default: the --artifacts root itself; needed only for a volume mounted elsewhere here)",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be restored; change nothing")
    p.set_defaults(func=_guard(cmd_rebuild))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (CommandError, storage.StorageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except ApiException as e:
            causes = "; ".join(kube.iter_errors(e))
            print(
                f"error: API server answered {e.status} {e.reason}" + (f": {causes}" if causes else ""),
                file=sys.stderr,
            )
            return 1

    return run


# --- API access ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from kubernetes import config

    try:
        return config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
    except config.ConfigException as e:
        raise CommandError(f"no usable kubeconfig: {e}") from e


def _namespace(args: argparse.Namespace) -> str:
    if args.namespace:
        return str(args.namespace)
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=args.kubeconfig)
    except config.ConfigException:
        return "default"
    chosen = next((c for c in contexts if c["name"] == args.context), active) if args.context else active
    return str((chosen or {}).get("context", {}).get("namespace") or "default")


def _get(api: Any, namespace: str, name: str) -> dict[str, Any]:
    obj = kube.get(api, API_VERSION, KIND, namespace, name)
    if obj is None:
        raise CommandError(f"Model {namespace}/{name} not found")
    return obj


def _status(obj: dict[str, Any]) -> ModelStatus:
    return ModelStatus.model_validate(obj.get("status") or {})


# --- output -------------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Rows as a kubectl-style table: upper-case headers, columns left-aligned, 3 spaces apart."""
    cells = [[str(h) for h in headers]] + [["<none>" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's short age (``42s``, ``5m``, ``3h``, ``12d``) of an RFC 3339 timestamp."""
    t = parse_time(timestamp)
    if t is None:
        return "<unknown>"
    secs = max(0, int(((now or datetime.now(UTC)) - t).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _stage_of(status: ModelStatus, number: int) -> str:
    stage = status.stages.stage_of(number) if status.stages else Stage.NONE
    return str(stage.value if isinstance(stage, Stage) else stage)


def _metrics(v: ModelVersion, limit: int = 3) -> str:
    items = sorted(
        (v.metrics or {}).items(), key=lambda kv: (kv[0] not in ("accuracy", "val_accuracy", "loss"), kv[0])
    )
    return " ".join(f"{k}={val:.4g}" for k, val in items[:limit]) or "-"


def _source(v: ModelVersion) -> str:
    lin = v.lineage
    if lin is None:
        return "-"
    if lin.training_job:
        return f"{lin.source}/{lin.training_job}"
    return str(lin.source)


def versions_table(status: ModelStatus) -> str:
    """The versions of a parsed status, newest first."""
    aliases: dict[int, list[str]] = {}
    for a, n in sorted((status.aliases or {}).items()):
        aliases.setdefault(n, []).append(a)
    rows = [
        (
            v.version,
            _stage_of(status, v.version),
            ",".join(aliases.get(v.version, [])) or "-",
            v.digest[7:19],
            _metrics(v),
            _source(v),
            v.created_at,
        )
        for v in sorted(status.versions or [], key=lambda v: v.version, reverse=True)
    ]
    return table(rows, ("VERSION", "STAGE", "ALIASES", "DIGEST", "METRICS", "SOURCE", "CREATED"))


def _ready(obj: dict[str, Any]) -> tuple[str, str, str]:
    c = get_condition((obj.get("status") or {}).get("conditions"), "Ready") or {}
    return c.get("status", "Unknown"), c.get("reason", ""), c.get("message", "")


def _in_force(status: ModelStatus) -> str:
    st = status.stages
    parts = []
    for name, field in (("Production", "production"), ("Staging", "staging"), ("Development", "development")):
        v = getattr(st, field) if st else None
        parts.append(f"{name}={v if v is not None else '-'}")
    if st and st.archived:
        parts.append("Archived=" + ",".join(map(str, st.archived)))
    if status.aliases:
        parts.append("aliases: " + ",".join(f"{a}={n}" for a, n in sorted(status.aliases.items())))
    return " ".join(parts)


# --- read commands ------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    """``kiln models``: one line per Model: latest version, stages, aliases, readiness, age."""
    api = _client(args)
    ns = None if args.all_namespaces else _namespace(args)
    items = sorted(
        kube.list_objects(api, API_VERSION, KIND, ns),
        key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]),
    )
    rows = []
    for o in items:
        st = _status(o)
        stages = st.stages
        ready, reason, _ = _ready(o)
        row = [
            o["metadata"]["name"],
            st.latest_version or "-",
            stages.production if stages and stages.production else "-",
            stages.staging if stages and stages.staging else "-",
            stages.development if stages and stages.development else "-",
            ",".join(f"{a}={n}" for a, n in sorted((st.aliases or {}).items())) or "-",
            f"{ready}" + (f" ({reason})" if reason and ready != "True" else ""),
            age(o["metadata"].get("creationTimestamp")),
        ]
        rows.append([o["metadata"]["namespace"], *row] if ns is None else row)
    headers = ["NAME", "LATEST", "PRODUCTION", "STAGING", "DEVELOPMENT", "ALIASES", "READY", "AGE"]
    if not rows:
        print(f"No Models found in {ns or 'any namespace'}.")
        return 0
    print(table(rows, ["NAMESPACE", *headers] if ns is None else headers))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    """``kiln versions MODEL``: the kept versions, newest first, with stage, aliases, metrics, lineage."""
    obj = _get(_client(args), _namespace(args), args.model)
    st = _status(obj)
    if not st.versions:
        print(f"Model {args.model} has no versions (latest {st.latest_version}).")
        return 0
    print(versions_table(st))
    ready, reason, message = _ready(obj)
    if ready != "True":
        print(f"\nReady={ready} ({reason}): {message}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``kiln history MODEL``: the audit trail of stage and alias changes, oldest first."""
    st = _status(_get(_client(args), _namespace(args), args.model))
    rows = [
        (
            e.time,
            e.stage or f"alias:{e.alias}",
            e.from_version or "-",
            e.to_version or "-",
            e.cause,
            e.message or "",
        )
        for e in st.history or []
    ]
    if not rows:
        print(f"Model {args.model} has no stage or alias changes yet.")
        return 0
    print(table(rows, ("TIME", "STAGE/ALIAS", "FROM", "TO", "CAUSE", "MESSAGE")))
    return 0


# --- promote / rollback --------------------------------------------------------------------------


def declare(
    spec: dict[str, Any],
    version: int,
    *,
    stage: str | None = None,
    alias: str | None = None,
    archive: int | None = None,
) -> dict[str, Any]:
    """A copy of an API-shaped ``spec`` declaring ``version`` in ``stage`` or under ``alias``.

    A version holds one stage, so declaring it in a stage removes it from the others (and from
    ``archived``); ``archive`` (the previous holder) is appended to ``archived``.
    """
    new = dict(spec)
    if alias is not None:
        new["aliases"] = {**(spec.get("aliases") or {}), alias: version}
        return new
    stages = {k: v for k, v in (spec.get("stages") or {}).items() if k == "archived" or v != version}
    archived = [a for a in stages.pop("archived", None) or [] if a != version]
    if stage == Stage.ARCHIVED.value:
        archived.append(version)
    elif stage is not None:
        stages[stage_field(stage)] = version
    if archive is not None and archive != version and archive not in archived:
        stages = {k: v for k, v in stages.items() if v != archive}
        archived.append(archive)
    if archived:
        stages["archived"] = archived
    new["stages"] = stages or None
    if new["stages"] is None:
        del new["stages"]
    return new


def _patch_spec(
    api: Any, obj: dict[str, Any], new_spec: dict[str, Any], annotations: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}}
    spec_patch = merge_patch(obj.get("spec") or {}, new_spec)
    if spec_patch:
        body["spec"] = spec_patch
    if annotations:
        body["metadata"]["annotations"] = annotations
    meta = obj["metadata"]
    return kube.patch(api, API_VERSION, KIND, meta["namespace"], meta["name"], body)


def _wait_reflected(api: Any, ns: str, name: str, generation: int, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while True:
        obj = _get(api, ns, name)
        if (obj.get("status") or {}).get("observedGeneration", 0) >= generation:
            return obj
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.25)


def _conflict_retry(fn: Callable[[], int]) -> int:
    for _ in range(5):
        try:
            return fn()
        except ApiException as e:
            if e.status != 409:
                raise
    raise CommandError("the Model kept changing while we patched it; try again")


def _report(
    api: Any,
    ns: str,
    name: str,
    updated: dict[str, Any],
    timeout: float,
    in_force: Callable[[ModelStatus], bool],
    change: str,
    done: str,
) -> int:
    """Wait for the operator to observe ``updated``'s generation; print the outcome.

    Returns 0 when ``in_force`` holds, 1 when the change was refused, 2 on timeout.
    """
    gen = int(updated["metadata"].get("generation") or 0)
    if timeout <= 0:
        print(f"declared {change} in spec (generation {gen}); not waiting for the operator")
        return 0
    obj = _wait_reflected(api, ns, name, gen, timeout)
    if obj is None:
        print(
            f"declared {change} in spec (generation {gen}), but the operator has not reconciled it within "
            f"{timeout:g}s: is it running?",
            file=sys.stderr,
        )
        return 2
    st = _status(obj)
    ready, reason, message = _ready(obj)
    if in_force(st):
        print(f"Model {name}: {done}")
        print(f"in force: {_in_force(st)}")
        return 0
    print(f"Model {name}: {change} refused: Ready={ready} ({reason}): {message}", file=sys.stderr)
    print(f"in force: {_in_force(st)}", file=sys.stderr)
    return 1


def cmd_promote(args: argparse.Namespace) -> int:
    """``kiln promote MODEL VERSION --stage S | --alias A``: declare it in spec, wait, report."""
    api, ns = _client(args), _namespace(args)
    clear_cause = {CHANGE_CAUSE_ANNOTATION: None}  # a stale Rollback marker has no business here

    def attempt() -> int:
        obj = _get(api, ns, args.model)
        st = _status(obj)
        archive = None
        if args.archive_previous and args.stage in ("Development", "Staging", "Production"):
            field = stage_field(args.stage)
            archive = getattr(st.stages, field) if st.stages else None
        new_spec = declare(
            obj.get("spec") or {}, args.version, stage=args.stage, alias=args.alias, archive=archive
        )
        try:
            ModelSpec.model_validate(new_spec)  # the rules the API server applies, with a clearer message
        except ValidationError as e:
            raise CommandError(f"spec would be invalid: {e.errors()[0]['msg']}") from None
        annotations = (
            clear_cause if CHANGE_CAUSE_ANNOTATION in (obj["metadata"].get("annotations") or {}) else {}
        )
        updated = _patch_spec(api, obj, new_spec, annotations)
        if args.stage:
            change = f"version {args.version} in {args.stage}"
            done_line = f"version {args.version} is now in {args.stage}"
        else:
            change = f"alias {args.alias} -> version {args.version}"
            done_line = f"alias {args.alias} now points at version {args.version}"

        def done(s: ModelStatus) -> bool:
            if args.alias:
                return (s.aliases or {}).get(args.alias) == args.version
            return _stage_of(s, args.version) == args.stage

        return _report(api, ns, args.model, updated, args.timeout, done, change, done_line)

    return _conflict_retry(attempt)


def cmd_rollback(args: argparse.Namespace) -> int:
    """``kiln rollback MODEL``: declare the stage's previous version (per status.history) in spec,
    annotated so the controller records the change with cause Rollback."""
    api, ns = _client(args), _namespace(args)
    field = stage_field(args.stage)

    def attempt() -> int:
        obj = _get(api, ns, args.model)
        st = _status(obj)
        current = getattr(st.stages, field) if st.stages else None
        if current is None:
            raise CommandError(f"Model {args.model} has no version in {args.stage}")
        target = rollback_target(st.history, current, args.stage)
        if target is None:
            raise CommandError(
                f"status.history of Model {args.model} names no {args.stage} version before {current}"
            )
        if get_version(st, target) is None:
            raise CommandError(
                f"the previous {args.stage} version {target} was pruned from status; promote another"
            )
        spec = obj.get("spec") or {}
        if (spec.get("stages") or {}).get(field) == target:
            raise CommandError(
                f"spec already declares {field}: {target} but it is not in force; "
                f"see `kubectl describe kmodel {args.model}`"
            )
        gen = int(obj["metadata"].get("generation") or 0)
        new_spec = declare(spec, target, stage=args.stage)
        annotations = {CHANGE_CAUSE_ANNOTATION: rollback_annotation(gen + 1)}
        updated = _patch_spec(api, obj, new_spec, annotations)
        return _report(
            api,
            ns,
            args.model,
            updated,
            args.timeout,
            lambda s: getattr(s.stages, field, None) == target if s.stages else False,
            f"rollback of {args.stage} from version {current} to {target}",
            f"{args.stage} rolled back from version {current} to {target}",
        )

    return _conflict_retry(attempt)


# --- rebuild -------------------------------------------------------------------------------------


@dataclass
class Found:
    """An artifact of the model found in the store (its URI as seen from here), and what rebuild
    decided for it."""

    uri: str
    registration: record.Registration | None
    problem: Problem | None = None
    note: str = ""


def scan(roots: Iterable[str], namespace: str, model: str) -> tuple[list[Found], list[str]]:
    """Artifacts ``<root>/<model>/*/`` in buckets or directories (dot-names such as checkpoints
    skipped).

    Returns:
        ``(artifacts with a registration record for the model, URIs of those without one that
        have a metadata.json)``. A record for the same model in another namespace counts (a
        restore may move it).
    Raises:
        kiln.storage.StorageError: a root cannot be listed.
    """
    found: list[Found] = []
    unregistered: list[str] = []
    for root in roots:
        base = storage.parse(root).join(model)
        names: dict[str, set[str]] = {}
        for rel in storage.list_files(base):
            top, _, rest = rel.partition("/")
            if rest and not top.startswith("."):
                names.setdefault(top, set()).add(rest)
        for name in sorted(names):
            d = base.join(name)
            reg = None
            if record.RECORD_FILE in names[name]:
                try:
                    rec = record.parse(storage.read_bytes(d.join(record.RECORD_FILE)))
                except (storage.StorageError, record.RecordError) as e:
                    found.append(
                        Found(
                            d.uri, None, Problem("ArtifactInvalid", f"unreadable {record.RECORD_FILE}: {e}")
                        )
                    )
                    continue
                reg = rec.find(namespace, model) or rec.find(None, model)
            if reg is not None:
                found.append(Found(d.uri, reg))
            elif METADATA_FILE in names[name]:
                unregistered.append(d.uri)
    return found, unregistered


def _defer(_: ModelVersion) -> Problem:
    # Rebuild never brings a spec declaration into force itself: it may not see the artifacts
    # where the operator does. The operator's next reconcile verifies and applies them.
    return Problem("Deferred", "left to the operator's next reconcile")


def cmd_rebuild(args: argparse.Namespace) -> int:
    """``kiln registry rebuild MODEL --artifacts ROOT``: restore versions under their original numbers.

    Reads the registration records the operator wrote next to each artifact, verifies each
    artifact against its recorded digest (a mismatch is skipped and reported), and merges the
    versions into status (existing ones untouched; ``latestVersion`` never decreases). The
    operator's next reconcile brings the declared stages and aliases back into force.
    """
    api, ns = _client(args), _namespace(args)
    found, unregistered = scan(args.artifacts, ns, args.model)
    by_number: dict[int, Found] = {}
    for f in found:
        if f.registration is None:
            continue
        _, f.problem = artifacts.verify(f.uri, f.registration.version.digest)
        if f.problem is not None:
            continue
        n = f.registration.version.version
        other = by_number.get(n)
        if other is not None and other.registration is not None:
            newer, older = sorted(
                (other, f), key=lambda x: x.registration.registered_at if x.registration else "", reverse=True
            )
            older.problem = Problem(
                "Duplicate", f"version {n} is also recorded by {newer.uri}, registered later"
            )
            by_number[n] = newer
        else:
            by_number[n] = f
    restored = [f.registration.version for f in by_number.values() if f.registration is not None]
    reserved = max((f.registration.version.version for f in found if f.registration is not None), default=0)

    extra: list[tuple[str, Any]] = []
    if args.include_unregistered:
        for d in unregistered:
            try:
                meta = storage.read_artifact_metadata(d)
            except ArtifactError as e:
                found.append(Found(d, None, Problem("ArtifactInvalid", str(e))))
                continue
            if meta.modelName not in ("", args.model):
                continue
            _, problem = artifacts.verify(d, meta.weightsDigest)
            if problem is not None:
                found.append(Found(d, None, problem))
                continue
            extra.append((d, meta))
        extra.sort(key=lambda x: (x[1].createdAt, str(x[0])))
    store_uri = (args.store_uri or storage.parse(args.artifacts[0]).uri).rstrip("/")

    def attempt() -> tuple[ModelStatus, list[int], list[tuple[str, ModelVersion]]]:
        obj = _get(api, ns, args.model)
        spec = ModelSpec.model_validate(obj.get("spec") or {})
        out = rebuild_status(spec, _status(obj), restored, reserved=reserved)
        status, added = out.status, list(out.added)
        numbered: list[tuple[str, ModelVersion]] = []
        for d, meta in extra:
            uri = f"{store_uri}/{args.model}/{storage.parse(d).name}"
            if any(v.artifact_uri == uri and v.digest == meta.weightsDigest for v in status.versions or []):
                continue
            step = register_step(
                spec,
                status,
                _defer,
                artifact_uri=uri,
                digest=meta.weightsDigest,
                created_at=meta.createdAt or rfc3339(),
                lineage=Lineage(
                    source=VersionSource.REBUILD,
                    training_job=meta.trainingJob or None,
                    dataset=meta.dataset.name if meta.dataset else None,
                    dataset_digest=meta.dataset.digest if meta.dataset else None,
                    image=meta.image or None,
                ),
                metrics=meta.metrics,
                hyperparameters=meta.hyperparameters,
                now=rfc3339(),
                format=meta.format,
            )
            status = step.status
            assert step.registered is not None
            added.append(step.registered.version)
            numbered.append((d, step.registered))
        if not args.dry_run:
            write_status(api, obj, status)
        return status, added, numbered

    for _ in range(10):
        try:
            status, added, numbered = attempt()
            break
        except kube.Conflict:
            continue
    else:
        raise CommandError("the Model kept changing while we rebuilt it; try again")

    if not args.dry_run:
        obj = _get(api, ns, args.model)
        for d, entry in numbered:  # the store is reachable here: record the new numbers for next time
            artifacts.write_record(
                ns, args.model, entry, model_uid=obj["metadata"].get("uid"), registered_at=rfc3339(), at=d
            )
    rows = []
    for f in sorted(found, key=lambda f: (f.registration.version.version if f.registration else 0, f.uri)):
        number = f.registration.version.version if f.registration else None
        if f.problem is not None:
            state = f"skipped: {f.problem.reason}: {f.problem.message}"
        else:
            state = "restored" if number in added else "already present"
        rows.append(
            (
                number or "-",
                f.uri,
                f.registration.version.digest[7:19] if f.registration else "-",
                state,
            )
        )
    for d, entry in numbered:
        rows.append((entry.version, d, entry.digest[7:19], "registered (had no record)"))
    verb = "would restore" if args.dry_run else "restored"
    if rows:
        print(table(rows, ("VERSION", "ARTIFACT", "DIGEST", "RESULT")))
    if unregistered and not args.include_unregistered:
        print(
            f"{len(unregistered)} artifact(s) without a registration record left out "
            f"(--include-unregistered registers them as new versions)"
        )
    print(f"{verb} {len(added)} version(s) of Model {ns}/{args.model}; latestVersion {status.latest_version}")
    return 1 if any(f.problem for f in found) else 0


__all__ = ["add_parser", "age", "declare", "scan", "table", "versions_table"]
