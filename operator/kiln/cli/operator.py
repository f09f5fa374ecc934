"""``kiln operator``: run the Kiln operator (kopf) with probes, Prometheus metrics and leader election."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

#: Where a pod finds its own namespace (the ServiceAccount token's projection).
SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


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
        "--standalone", action="store_true", help="no kopf peering (Kiln elects its leader with a Lease)"
    )
    p.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format")
    p.add_argument("--verbose", "-v", action="store_true")
    le = p.add_argument_group("leader election (a coordination.k8s.io Lease; see kiln.leaderelection)")
    le.add_argument(
        "--leader-elect", action="store_true", help="reconcile only while holding the Lease (for >1 replica)"
    )
    le.add_argument("--leader-elect-lease-name", default="kiln-operator", help="name of the Lease")
    le.add_argument(
        "--leader-elect-namespace",
        default=None,
        help="namespace of the Lease (default: $POD_NAMESPACE, else the pod's own namespace)",
    )
    le.add_argument("--leader-elect-lease-duration", type=float, default=15.0, metavar="SECONDS")
    le.add_argument("--leader-elect-renew-deadline", type=float, default=10.0, metavar="SECONDS")
    le.add_argument("--leader-elect-retry-period", type=float, default=2.0, metavar="SECONDS")
    p.set_defaults(func=run)


def leader_election_config(args: argparse.Namespace) -> Any:
    """The :class:`~kiln.leaderelection.LeaderElectionConfig` of ``args`` (None without --leader-elect).

    Identity: ``$POD_NAME`` (else the host name) plus a random suffix, as client-go users do, so
    a restarted container never mistakes its predecessor's Lease for its own.

    Raises:
        SystemExit: when the namespace cannot be determined or the durations are inconsistent.
    """
    from kiln.leaderelection import LeaderElectionConfig

    if not args.leader_elect:
        return None
    namespace = args.leader_elect_namespace or os.environ.get("POD_NAMESPACE")
    if not namespace and SERVICEACCOUNT_NAMESPACE.is_file():
        namespace = SERVICEACCOUNT_NAMESPACE.read_text().strip()
    if not namespace:
        raise SystemExit("kiln operator: --leader-elect needs --leader-elect-namespace (or $POD_NAMESPACE)")
    identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4()}"
    try:
        return LeaderElectionConfig(
            name=args.leader_elect_lease_name,
            namespace=namespace,
            identity=identity,
            lease_duration=args.leader_elect_lease_duration,
            renew_deadline=args.leader_elect_renew_deadline,
            retry_period=args.leader_elect_retry_period,
        )
    except ValueError as e:
        raise SystemExit(f"kiln operator: {e}") from None


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (0) or until leadership is lost (1: restart as a follower)."""
    from kiln import logs

    logs.configure(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    le_config = leader_election_config(args)

    import kopf
    from prometheus_client import start_http_server

    import kiln.controllers  # noqa: F401  (registers the handlers)
    from kiln.controllers.leadership import OperatorOptions

    if not args.verbose:
        # kopf logs every handler call at INFO; Kiln's own logs and Events tell the story.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    options = OperatorOptions(leader_election=le_config, namespaced=bool(args.namespace))
    start_http_server(args.metrics_port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=args.standalone,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
        stop_flag=options.stop,
        memo=kopf.Memo(kiln=options),
    )
    if options.lost.is_set():
        logging.getLogger("kiln.operator").error("exiting: leadership lost")
        return 1
    return 0
