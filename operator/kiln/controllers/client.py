"""The operator's Kubernetes API client (in-cluster config, or KUBECONFIG / ~/.kube/config)."""

from __future__ import annotations

import os

from kubernetes import client as k8s
from kubernetes import config as k8s_config


def api_client() -> k8s.ApiClient:
    """An ``ApiClient`` for the cluster the operator runs against.

    Uses the in-cluster ServiceAccount when running in a pod, else ``$KUBECONFIG``. The
    connection pool is sized for the reconcile workers (``KILN_WORKERS``).
    """
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        # Read $KUBECONFIG now: the client's own default is computed when it is imported.
        k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    cfg = k8s.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = max(8, int(os.environ.get("KILN_WORKERS", "16")) * 2)
    return k8s.ApiClient(cfg)
