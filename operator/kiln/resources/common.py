"""Helpers shared by the builders: owner references, standard labels, names."""

from __future__ import annotations

import hashlib
from typing import Any

from kiln import API_VERSION

LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"


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
