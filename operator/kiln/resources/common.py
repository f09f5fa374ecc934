"""Helpers shared by the builders: owner references, standard labels, names, pod placement."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from kiln import API_VERSION
from kiln.api.common import Quantity, ResourceRequirements, Toleration

LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"
#: Taint key of GPU nodes (NVIDIA's device plugin and GPU operator convention).
GPU_TAINT_KEY = "nvidia.com/gpu"


def owner_reference(parent: dict[str, Any]) -> dict[str, Any]:
    """An ownerReference making ``parent`` (a kiln.dev object) the controller of a child.

    ``blockOwnerDeletion`` makes foreground deletion of the parent wait for the child.
    """
    meta = parent["metadata"]
    return {
        "apiVersion": parent.get("apiVersion", API_VERSION),
        "kind": parent["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def standard_labels(parent: dict[str, Any], component: str) -> dict[str, str]:
    """Recommended labels (app.kubernetes.io/*) for a child of ``parent``."""
    return {
        LABEL_NAME: parent["kind"].lower(),
        LABEL_INSTANCE: parent["metadata"]["name"],
        LABEL_COMPONENT: component,
        LABEL_PART_OF: "kiln",
        LABEL_MANAGED_BY: "kiln",
    }


def child_name(*parts: str, max_len: int = 63) -> str:
    """Join ``parts`` with '-' into a DNS-1123 label; over ``max_len`` it is cut and suffixed
    with 8 hex of a sha256 of the full name, so distinct long names stay distinct."""
    name = "-".join(parts)
    if len(name) <= max_len:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: max_len - 9].rstrip('-')}-{digest}"


def _quantity_to_int(q: Quantity) -> int:
    if isinstance(q, int):
        return q
    return int(float(q))


def gpu_count(resources: ResourceRequirements | None) -> int:
    """GPUs a container asks for: the limit (else request) of any resource whose name ends in 'gpu'.

    Returns 0 when none is requested. Fractional or non-numeric quantities count as 0.
    """
    if resources is None:
        return 0
    for source in (resources.limits or {}, resources.requests or {}):
        for name, q in source.items():
            if name.endswith("gpu"):
                try:
                    return _quantity_to_int(q)
                except ValueError:
                    return 0
    return 0


def pod_tolerations(
    tolerations: Sequence[Toleration] | None, resources: ResourceRequirements | None
) -> list[dict[str, Any]]:
    """The user's tolerations, plus one for the ``nvidia.com/gpu`` taint when GPUs are requested.

    The GPU toleration (``Exists``, ``NoSchedule``) is added only if no toleration already covers
    that key (a toleration with that key, or an empty key with ``Exists``, which tolerates all).
    """
    tols = [t.to_api() for t in tolerations or []]
    covered = any(
        t.get("key") == GPU_TAINT_KEY or (not t.get("key") and t.get("operator") == "Exists") for t in tols
    )
    if gpu_count(resources) > 0 and not covered:
        tols.append({"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
    return tols


def pod_placement(
    *,
    node_selector: Mapping[str, str] | None,
    tolerations: Sequence[Toleration] | None,
    resources: ResourceRequirements | None,
    priority_class_name: str | None,
    service_account_name: str | None,
) -> dict[str, Any]:
    """Pod spec fields that place a pod: ``nodeSelector``, ``tolerations`` (with the GPU one from
    :func:`pod_tolerations`), ``priorityClassName``, ``serviceAccountName``.

    Unset or empty values are left out, so the result can be merged into any pod spec.
    """
    out: dict[str, Any] = {}
    if node_selector:
        out["nodeSelector"] = dict(node_selector)
    tols = pod_tolerations(tolerations, resources)
    if tols:
        out["tolerations"] = tols
    if priority_class_name:
        out["priorityClassName"] = priority_class_name
    if service_account_name:
        out["serviceAccountName"] = service_account_name
    return out
