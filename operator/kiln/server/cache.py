"""A bounded LRU cache of model outputs, keyed by model version and the exact input tensor.

Off by default (``--cache-size 0``). The key is the sha256 of the model version, the input's
shape and dtype and its bytes *after* conversion to float32, so a JSON request and a binary one
carrying the same values share an entry. The cached value is the model's outputs (an array, or name
-> array); the response (JSON or binary, which outputs) is built from it per request. Bounded by
entry count.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def _frozen(a: np.ndarray) -> np.ndarray:
    stored = np.array(a, copy=True)
    stored.setflags(write=False)
    return stored


class OutputCache:
    """Least-recently-used map from input digest to (read-only) output array."""

    def __init__(self, max_entries: int, model_version: str) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.max_entries = max_entries
        self._prefix = f"{model_version}\0".encode()
        self._entries: collections.OrderedDict[str, Any] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        """False when the cache holds nothing (size 0)."""
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, rows: np.ndarray | Mapping[str, np.ndarray]) -> str:
        """Cache key of an input array (or of every named input array, in order): sha256 over
        version, names, dtypes, shapes and bytes."""
        h = hashlib.sha256(self._prefix)
        items = [("", rows)] if isinstance(rows, np.ndarray) else list(rows.items())
        for name, arr in items:
            h.update(f"{name}\0{arr.dtype.str}{arr.shape}\0".encode())
            h.update(np.ascontiguousarray(arr).data)
        return h.hexdigest()

    def get(self, key: str) -> Any:
        """The cached output for ``key`` (marking it recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: np.ndarray | Mapping[str, np.ndarray]) -> None:
        """Store a (read-only) copy of ``value`` (an array or name -> array), evicting the least
        recently used entries beyond the bound."""
        if not self.enabled:
            return
        stored: Any
        if isinstance(value, np.ndarray):
            stored = _frozen(value)
        else:
            stored = {k: _frozen(v) for k, v in value.items()}
        self._entries[key] = stored
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
