"""JSON merge patches (RFC 7386, https://www.rfc-editor.org/rfc/rfc7386) computed from two
documents: the smallest patch turning ``old`` into ``new``. Pure; used for status and spec
writes so only what changed is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning ``old`` into ``new``.

    Keys absent from ``new`` become ``null`` (deleted); nested objects are diffed recursively;
    lists and scalars are replaced whole (merge patches cannot address list items). Returns
    ``{}`` when the documents are equal.
    """
    old = old or {}
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for k, v in new.items():
        if k not in old:
            out[k] = v
        elif isinstance(v, Mapping) and isinstance(old[k], Mapping):
            sub = merge_patch(old[k], v)
            if sub:
                out[k] = sub
        elif old[k] != v:
            out[k] = v
    return out
