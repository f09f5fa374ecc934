"""``python -m kiln.features``: the feature store's Job entry point.

::

    python -m kiln.features materialize --feature-group FG --start T0 --end T1 \
        [--index $JOB_COMPLETION_INDEX --windows N] [--chunk-seconds S] [--batch-rows B] \
        [--key-ttl-seconds K] [--memory-limit 1GB] [--redis ADDRESS]

``FG`` is the FeatureGroup object as JSON or YAML, inline or a file path (``metadata.name`` and
``metadata.namespace`` give the online keys' prefix). ``T0``/``T1``: RFC 3339 (``...Z``).
With ``--windows N``, ``[T0, T1)`` is cut into N equal windows and this process writes window
``--index`` only (one Indexed Job completion per window). ``--redis`` overrides
``spec.online.store.address``.

On success: one JSON line on stdout (:meth:`MaterializationResult.to_json`, plus the window) and
exit 0. On failure: one JSON line ``{"error": {"reason", "message", "column"}}`` on stdout and
exit 1 (source / schema error: retrying will not help) or 3 (transient: online store or object
store unavailable; the Job's backoff retries). No watermark is ever printed for a failed run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import yaml

EXIT_PERMANENT = 1
EXIT_TRANSIENT = 3


def parse_time(text: str) -> dt.datetime:
    """RFC 3339 / ISO 8601 -> aware datetime (a naive one is UTC)."""
    t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def load_object(text: str) -> dict[str, Any]:
    """A FeatureGroup object from inline JSON/YAML or a file holding it."""
    path = Path(text)
    if not text.lstrip().startswith(("{", "apiVersion", "kind", "metadata")) and path.is_file():
        text = path.read_text()
    obj = yaml.safe_load(text)
    if not isinstance(obj, dict):
        raise ValueError("--feature-group is not a FeatureGroup object")
    return obj


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kiln.features", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("materialize", help="write the latest values of [start, end) to the online store")
    m.add_argument("--feature-group", required=True, help="FeatureGroup JSON/YAML, inline or a file")
    m.add_argument("--start", required=True, type=parse_time)
    m.add_argument("--end", required=True, type=parse_time)
    m.add_argument("--windows", type=int, default=1)
    m.add_argument("--index", type=int, default=0)
    m.add_argument("--chunk-seconds", type=int, default=86400)
    m.add_argument("--batch-rows", type=int, default=5000)
    m.add_argument("--key-ttl-seconds", type=int, default=None)
    m.add_argument("--memory-limit", default="1GB")
    m.add_argument("--redis", default=None, help="online store address (default: the spec's)")
    return p


def _fail(reason: str, message: str, column: str | None, code: int) -> int:
    print(json.dumps({"error": {"reason": reason, "message": message, "column": column}}), flush=True)
    print(f"materialize: {reason}: {message}", file=sys.stderr)
    return code


def materialize_command(args: argparse.Namespace) -> int:
    from kiln.features import FeatureError, FeatureView, materialization, online

    view = FeatureView.from_object(load_object(args.feature_group))
    address = args.redis or (view.spec.online.store.address if view.spec.online.store else None)
    if not address:
        return _fail("NoOnlineStore", "spec.online.store is not set and --redis is not given", None, 1)
    start, end = materialization.window_for_index(args.start, args.end, args.windows, args.index)
    client = online.connect(address)
    try:
        result = materialization.materialize(
            view,
            client,
            start,
            end,
            chunk_seconds=args.chunk_seconds,
            batch_rows=args.batch_rows,
            key_ttl_seconds=args.key_ttl_seconds,
            superseded_before=args.end,
            memory_limit=args.memory_limit,
        )
    except FeatureError as e:
        return _fail(e.reason, str(e), e.column, EXIT_TRANSIENT if e.transient else EXIT_PERMANENT)
    finally:
        client.close()
    out = {**result.to_json(), "index": args.index, "windowCount": args.windows}
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "materialize":
        return materialize_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
