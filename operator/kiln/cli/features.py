"""Feature store commands: ``kiln features materialize``, ``get-online``, ``get-historical``.

- ``materialize NAME``: sets the FeatureGroup's annotation ``kiln.dev/materialize-requested-at``
  to the current time; the operator answers with one run from the watermark to now (a backfill
  when there is none; see :mod:`kiln.featurestore`). ``--wait`` follows the run to its end and
  prints ``status.lastRun`` (exit 0 when it succeeded, 1 when it failed, 2 on timeout).
- ``get-online NAME --entity k=v[,k=v...] ...``: the online values of those entities from the
  group's Redis (``spec.online.store.address``, or ``--redis`` for a port-forward), with each
  feature's status (PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE: ``maxAgeSeconds`` is
  enforced at read time), as JSON.
- ``get-historical NAME --entities FILE``: point-in-time-correct training data for an entity
  table (Parquet or CSV with the entity columns and an event-timestamp column), computed here by
  :func:`kiln.features.offline.get_historical_features` from the group's source (which this
  machine must reach: a path, or s3:// with the AWS_* environment). Written to ``--output``
  (.parquet or .csv), else CSV on stdout.

The group comes from the API server of the current kubeconfig context, or ``-f FILE`` (a
manifest) without a cluster. ``get-online`` and ``get-historical`` need the ``features`` extra
(duckdb, pyarrow, redis), imported only when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from kiln import API_VERSION, kube
from kiln.cli.registry import CommandError, _client, _guard, _namespace
from kiln.resources.featuregroup import ANNOTATION_REQUEST

KIND = "FeatureGroup"


def add_parser(sub: Any) -> None:
    """Add ``kiln features ...`` to the ``kiln`` parser's sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the FeatureGroup")
    common.add_argument(
        "--namespace", "-n", help="namespace (default: the kubeconfig context's, else default)"
    )
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")
    local = argparse.ArgumentParser(add_help=False)
    local.add_argument(
        "--filename", "-f", help="read the FeatureGroup from this manifest instead of the API server"
    )

    top = sub.add_parser("features", help="feature store: materialize, online and historical retrieval")
    fsub = top.add_subparsers(dest="features_command", metavar="COMMAND", required=True)
    p = fsub.add_parser("materialize", parents=[common], help="request a materialization run")
    p.add_argument("--wait", action="store_true", help="wait for the run to end and print it")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits (default 600)")
    p.set_defaults(func=_guard(cmd_materialize))

    p = fsub.add_parser("get-online", parents=[common, local], help="online values of entities (JSON)")
    p.add_argument(
        "--entity",
        "-e",
        action="append",
        required=True,
        help="one entity's keys, k=v[,k=v...] (repeatable: one lookup round trip for all)",
    )
    p.add_argument("--redis", help="online store address (default: spec.online.store.address)")
    p.set_defaults(func=_guard(cmd_get_online))

    p = fsub.add_parser(
        "get-historical", parents=[common, local], help="point-in-time training data for an entity table"
    )
    p.add_argument("--entities", required=True, help="entity table: .parquet or .csv (path or s3:// URI)")
    p.add_argument("--output", "-o", help="write here (.parquet or .csv); default: CSV on stdout")
    p.add_argument("--timestamp-column", default="event_timestamp", help="the entity table's event time")
    p.add_argument("--full-feature-names", action="store_true", help="name columns <group>__<feature>")
    p.set_defaults(func=_guard(cmd_get_historical))


def _group(args: argparse.Namespace, api: Any | None = None) -> dict[str, Any]:
    """The FeatureGroup object: from ``--filename`` or the API server."""
    if getattr(args, "filename", None):
        import yaml

        with open(args.filename) as f:
            obj = yaml.safe_load(f)
        if not isinstance(obj, dict) or obj.get("kind") != KIND:
            raise CommandError(f"{args.filename} is not a FeatureGroup manifest")
        obj.setdefault("metadata", {}).setdefault("namespace", args.namespace or "default")
        return obj
    ns = _namespace(args)
    obj = kube.get(api or _client(args), API_VERSION, KIND, ns, args.name)
    if obj is None:
        raise CommandError(f"FeatureGroup {ns}/{args.name} not found")
    return obj


def _features(module: str) -> Any:
    """``kiln.features.<module>`` or a clear error when the ``features`` extra is missing."""
    import importlib

    try:
        return importlib.import_module(f"kiln.features.{module}")
    except ImportError as e:
        raise CommandError(
            f"this command needs the 'features' extra ({e.name} is missing): pip install 'kiln-operator[features]'"
        ) from e


def _view(obj: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from kiln.features.schema import FeatureView

    try:
        return FeatureView.from_object(obj)
    except (ValidationError, ValueError) as e:
        raise CommandError(f"the FeatureGroup is invalid: {' '.join(str(e).split())[:500]}") from e


def parse_entity(text: str) -> dict[str, str]:
    """``customer_id=42,store=7`` -> ``{"customer_id": "42", "store": "7"}``.

    Raises:
        CommandError: a part without ``=``.
    """
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--entity {text!r}: expected key=value[,key=value...]")
        out[key.strip()] = value.strip()
    return out


def cmd_get_online(args: argparse.Namespace) -> int:
    """Print one JSON object per entity: its keys, values, statuses and the stored event time."""
    view = _view(_group(args))
    online = _features("online")
    errors = _features("errors")
    address = args.redis or (view.spec.online.store.address if view.spec.online.store else None)
    if not address:
        raise CommandError("the FeatureGroup has no spec.online.store; give --redis")
    rows = [parse_entity(e) for e in args.entity]
    client = online.connect(address)
    try:
        found = online.get_online_features(client, view, rows)
    except errors.FeatureError as e:
        raise CommandError(f"{e.reason}: {e}") from e
    except (KeyError, ValueError) as e:
        raise CommandError(f"entity keys {view.entity_names}: {e}") from e
    finally:
        client.close()
    out = [
        {
            "entity": r.entity,
            "values": r.values,
            "statuses": r.statuses,
            "eventTimestamp": r.event_timestamp.isoformat().replace("+00:00", "Z")
            if r.event_timestamp
            else None,
        }
        for r in found
    ]
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_get_historical(args: argparse.Namespace) -> int:
    """Write the point-in-time join of ``--entities`` with the group's source."""
    view = _view(_group(args))
    offline = _features("offline")
    errors = _features("errors")
    try:
        entities = offline.read_table(args.entities)
        table = offline.get_historical_features(
            view,
            entities,
            timestamp_column=args.timestamp_column,
            full_feature_names=args.full_feature_names,
        )
    except errors.FeatureError as e:
        raise CommandError(f"{e.reason}: {e}") from e
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if not args.output:
        pcsv.write_csv(table, sys.stdout.buffer)
    elif args.output.lower().endswith(".csv"):
        pcsv.write_csv(table, args.output)
    else:
        pq.write_table(table, args.output)
    if args.output:
        print(f"wrote {table.num_rows} rows x {table.num_columns} columns to {args.output}", file=sys.stderr)
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    """Set the request annotation; with ``--wait``, follow the run it starts to its end."""
    api = _client(args)
    ns = _namespace(args)
    _group(args, api)  # a clear "not found"
    value = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    kube.patch(
        api, API_VERSION, KIND, ns, args.name, {"metadata": {"annotations": {ANNOTATION_REQUEST: value}}}
    )
    print(f"requested a materialization run of FeatureGroup {ns}/{args.name} ({ANNOTATION_REQUEST}={value})")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    job = None
    while time.monotonic() < deadline:
        status = _group(args, api).get("status") or {}
        if job is None and status.get("lastHandledMaterializeAt") == value:
            job = (status.get("activeRun") or status.get("lastRun") or {}).get("jobName")
            if job:
                print(f"run {job} started")
        last = status.get("lastRun") or {}
        if job and last.get("jobName") == job:
            print(
                json.dumps(
                    {"lastRun": last, "lastMaterializationTime": status.get("lastMaterializationTime")},
                    indent=2,
                )
            )
            return 0 if last.get("phase") == "Succeeded" else 1
        time.sleep(1.0)
    print(
        f"timed out after {args.timeout:.0f}s waiting for the run" + (f" {job}" if job else ""),
        file=sys.stderr,
    )
    return 2
