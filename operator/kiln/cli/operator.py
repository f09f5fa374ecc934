"""``kiln operator``: run the Kiln operator (kopf) with probes and Prometheus metrics."""

from __future__ import annotations

import argparse
import logging
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("operator", help="run the operator")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=None,
        help="watch only these namespaces (repeatable); all namespaces by default",
    )
    p.add_argument("--health-port", type=int, default=8080, help="port of /healthz (liveness and readiness)")
    p.add_argument("--metrics-port", type=int, default=9090, help="port of /metrics (Prometheus)")
    p.add_argument(
        "--standalone", action="store_true", help="no peering: do not coordinate with other replicas"
    )
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    import kiln.controllers  # noqa: F401  (registers the handlers)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler call at INFO; Kiln's own logs and Events tell the story.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    start_http_server(args.metrics_port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=args.standalone,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    return 0
