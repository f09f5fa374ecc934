"""The operator's Kubernetes API client (in-cluster config, or KUBECONFIG / ~/.kube/config)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from kiln.leaderelection import NotLeader

#: HTTP methods that never change anything on the API server.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class FencedApiClient(k8s.ApiClient):
    """An ``ApiClient`` that refuses every write while ``may_write()`` is false.

    Every request of the generated API classes and of :mod:`kiln.kube` goes through
    ``call_api``, so this is the one place where a replica that is not the leader (or a leader
    whose Lease ran out) is stopped from writing. Reads always pass.

    Raises:
        NotLeader: from ``call_api`` for a POST, PUT, PATCH or DELETE while ``may_write()`` is false.
    """

    def __init__(self, configuration: k8s.Configuration, may_write: Callable[[], bool]) -> None:
        super().__init__(configuration)
        self._may_write = may_write

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if method.upper() not in READ_METHODS and not self._may_write():
            raise NotLeader(f"{method} {url.split('?', 1)[0]} refused: this replica is not the leader")
        return super().call_api(method, url, *args, **kwargs)


def api_client(may_write: Callable[[], bool] | None = None, *, threads: int = 8) -> k8s.ApiClient:
    """An ``ApiClient`` for the cluster the operator runs against.

    Uses the in-cluster ServiceAccount when running in a pod, else ``$KUBECONFIG``. The
    connection pool holds ``threads`` connections, one per thread that may call at once (fewer
    and urllib3 drops the connections it cannot keep, "Connection pool is full", and opens new
    ones: a TLS handshake each). With ``may_write``, writes are fenced by it
    (:class:`FencedApiClient`).
    """
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        # Read $KUBECONFIG now: the client's own default is computed when it is imported.
        k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    cfg = k8s.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = max(8, threads)
    return k8s.ApiClient(cfg) if may_write is None else FencedApiClient(cfg, may_write)
