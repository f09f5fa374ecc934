"""``python -m kiln.features``: the feature store's Job entry point.

::

    python -m kiln.features materialize --feature-group FG --start T0 --end T1 \
        [--index $JOB_COMPLETION_INDEX --windows N] [--chunk-seconds S] [--batch-rows B] \
        [--key-ttl-seconds K] [--memory-limit 1GB] [--redis ADDRESS] [--termination-log PATH]
    python -m kiln.features validate --feature-group FG [--termination-log PATH]

``FG`` is the FeatureGroup object as JSON or YAML, inline or a file path (``metadata.name`` and
``metadata.namespace`` give the online keys' prefix); default: the environment variable
``KILN_FEATURE_GROUP`` (how the operator's Jobs pass it). ``T0``/``T1``: RFC 3339 (``...Z``), or
``now`` (the clock when the process starts: a CronJob's runs end at their start). With
``--windows N``, ``[T0, T1)`` is cut into N equal windows and this process writes window
``--index`` only (one Indexed Job completion per window; default ``$JOB_COMPLETION_INDEX``, which
the Job controller sets). ``--redis`` overrides ``spec.online.store.address``. An empty range
(``T1 <= T0``) writes nothing and succeeds with ``rowsWritten`` 0 and the watermark ``T0``.

``validate`` only checks that the source is readable with the declared columns and dtypes (for a
FeatureGroup without an online store); it prints ``{"columns": {name: DuckDB type}}``.

On success: one JSON line on stdout (:meth:`MaterializationResult.to_json`, plus the window) and
exit 0. On failure: one JSON line ``{"error": {"reason", "message", "column"}}`` on stdout and
exit 1 (source / schema error, or an invalid FeatureGroup: retrying will not help) or 3
(transient: online store or object store unavailable; the Job's backoff retries). No watermark is
ever printed for a failed run. The same line is written to ``--termination-log`` (default
``$KILN_TERMINATION_LOG``; the operator's Jobs set ``/dev/termination-log``), where the operator
reads it from the pod's status (at most 4096 bytes are kept: messages are cut to fit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from kiln.features.errors import EXIT_PERMANENT, EXIT_TRANSIENT

#: Environment variables the operator's Jobs set (see kiln.resources.featuregroup).
ENV_FEATURE_GROUP = "KILN_FEATURE_GROUP"
ENV_TERMINATION_LOG = "KILN_TERMINATION_LOG"
#: Set by the Job controller in every pod of an Indexed Job.
ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
#: The kubelet keeps at most this many bytes of a termination message.
TERMINATION_MESSAGE_MAX = 4096
_MESSAGE_MAX = 2000


def parse_time(text: str) -> dt.datetime:
    """RFC 3339 / ISO 8601 -> aware datetime (a naive one is UTC); ``now`` is the clock."""
    if text.strip().lower() == "now":
        return dt.datetime.now(dt.UTC)
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--feature-group",
        default=os.environ.get(ENV_FEATURE_GROUP),
        help=f"FeatureGroup JSON/YAML, inline or a file (default: ${ENV_FEATURE_GROUP})",
    )
    common.add_argument(
        "--termination-log",
        default=os.environ.get(ENV_TERMINATION_LOG),
        help=f"also write the result line here (default: ${ENV_TERMINATION_LOG})",
    )
    m = sub.add_parser(
        "materialize", parents=[common], help="write the latest values of [start, end) to the online store"
    )
    m.add_argument("--start", required=True, type=parse_time)
    m.add_argument("--end", required=True, type=parse_time)
    m.add_argument("--windows", type=int, default=1)
    m.add_argument("--index", type=int, default=int(os.environ.get(ENV_COMPLETION_INDEX) or 0))
    m.add_argument("--chunk-seconds", type=int, default=86400)
    m.add_argument("--batch-rows", type=int, default=5000)
    m.add_argument("--key-ttl-seconds", type=int, default=None)
    m.add_argument("--memory-limit", default="1GB")
    m.add_argument("--redis", default=None, help="online store address (default: the spec's)")
    sub.add_parser("validate", parents=[common], help="check the source's columns and dtypes")
    return p


def _emit(out: dict[str, Any], termination_log: str | None) -> None:
    line = json.dumps(out, separators=(",", ":"))
    print(line, flush=True)
    if termination_log:
        try:
            Path(termination_log).write_text(line[:TERMINATION_MESSAGE_MAX])
        except OSError as e:
            print(f"kiln.features: cannot write {termination_log}: {e}", file=sys.stderr)


def _fail(
    reason: str, message: str, column: str | None, code: int, termination_log: str | None = None
) -> int:
    error = {"reason": reason, "message": message[:_MESSAGE_MAX], "column": column}
    _emit({"error": error}, termination_log)
    print(f"kiln.features: {reason}: {message}", file=sys.stderr)
    return code


def _view(args: argparse.Namespace) -> Any:
    """The FeatureView of ``--feature-group``; raises ValueError (incl. pydantic's) when unusable."""
    from kiln.features import FeatureView

    if not args.feature_group:
        raise ValueError(f"--feature-group is not given and ${ENV_FEATURE_GROUP} is not set")
    return FeatureView.from_object(load_object(args.feature_group))


def materialize_command(args: argparse.Namespace) -> int:
    from kiln.features import FeatureError, materialization, online

    log = args.termination_log
    try:
        view = _view(args)
        address = args.redis or (view.spec.online.store.address if view.spec.online.store else None)
        if not address:
            return _fail(
                "NoOnlineStore",
                "spec.online.store is not set and --redis is not given",
                None,
                EXIT_PERMANENT,
                log,
            )
        client = online.connect(address)
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        return _fail("InvalidSpec", " ".join(str(e).split()), None, EXIT_PERMANENT, log)
    if args.end <= args.start:
        empty = materialization.MaterializationResult(args.start, args.start, 0, 0, 0, 0.0)
        _emit({**empty.to_json(), "index": args.index, "windowCount": args.windows}, log)
        return 0
    start, end = materialization.window_for_index(args.start, args.end, args.windows, args.index)
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
        return _fail(e.reason, str(e), e.column, EXIT_TRANSIENT if e.transient else EXIT_PERMANENT, log)
    finally:
        client.close()
    _emit({**result.to_json(), "index": args.index, "windowCount": args.windows}, log)
    return 0


def validate_command(args: argparse.Namespace) -> int:
    from kiln.features import FeatureError, offline

    log = args.termination_log
    try:
        view = _view(args)
    except ValueError as e:
        return _fail("InvalidSpec", " ".join(str(e).split()), None, EXIT_PERMANENT, log)
    try:
        columns = offline.validate_source(view)
    except FeatureError as e:
        return _fail(e.reason, str(e), e.column, EXIT_TRANSIENT if e.transient else EXIT_PERMANENT, log)
    _emit({"columns": columns}, log)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "materialize":
        return materialize_command(args)
    if args.command == "validate":
        return validate_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
