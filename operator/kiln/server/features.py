"""Entity-key requests: the server reads a request's features from the online store.

With ``KILN_FEATURE_GROUPS`` set (the operator writes it from an InferenceService's
``spec.featureGroups``: a JSON list of ``{name, namespace, spec, schemaDigest}``), a request may
carry, instead of the model's input, one ``[n]`` input per entity column of those FeatureGroups
(named as the entity; datatype INT64, INT32, FP32, FP64, BOOL or BYTES for an ``int64``,
``int32``, ``float32``, ``float64``, ``bool`` or ``string`` key; :data:`ENTITY_DATATYPES`). For
each FeatureGroup the server makes ONE online-store call for the request's ``n`` entities
(:func:`kiln.features.online.get_online_features`: one Redis round trip, ``maxAgeSeconds``
enforced at read time), in a thread pool so the event loop never waits on Redis (one thread
hop per request for all its FeatureGroups). It then builds the model's one input, ``[n, d]``: every
FeatureGroup's features in its declared order, the FeatureGroups in ``spec.featureGroups``
order, the order the trainer used (:func:`kiln.trainer.data.load_feature_group`).

Missing and stale values are served with a default and reported, never silently: a feature that
is not PRESENT (``NOT_FOUND``: the entity has no row; ``OUTSIDE_MAX_AGE``: its row is older than
``maxAgeSeconds``; ``NULL_VALUE``: the row has no value for it) takes the training mean of that
feature when the artifact carries one (a ``kiln-mlp`` artifact's ``inputMean``: the model then
sees an average value), else 0. Each response says which rows that happened to, in its
``parameters`` (strings holding JSON, so that REST and gRPC carry the same thing):

- ``kiln.dev/feature-statuses``: ``{"<group>": ["PRESENT", "NOT_FOUND", ...]}``, one status per
  row: PRESENT when all the group's features were, else NOT_FOUND, OUTSIDE_MAX_AGE or NULL_VALUE
  (the row was found and fresh but some features are null);
- ``kiln.dev/null-features`` (only when some row is NULL_VALUE): ``{"<group>": {"<row>":
  ["<feature>", ...]}}``;
- ``kiln.dev/incomplete-rows``: how many rows were served with some default value (an integer).

and in the metrics (:class:`kiln.server.metrics.ServerMetrics`): ``kiln_feature_lookups_total
{feature_group, status}`` (one per entity row and FeatureGroup, the row status above),
``kiln_feature_lookup_duration_seconds{feature_group}`` (one per online-store call) and
``kiln_feature_lookup_errors_total{feature_group}``. An online store that fails or does not
answer within :data:`SOCKET_TIMEOUT_SECONDS` fails the request with 503 (gRPC UNAVAILABLE)
naming the FeatureGroup and the cause; requests that carry the model's own input never touch
the store. A FeatureGroup's store password comes from the environment variable its entry names
(``passwordEnv``: the operator fills it from ``online.store.secretRef``), else from
``KILN_REDIS_PASSWORD`` (:func:`kiln.features.online.connect`).

At start-up (:class:`FeatureLookup`, else kiln-serve exits 1) the model must have ONE input of
shape ``[-1, d]`` (or ``[-1, -1]``) and a numeric datatype, ``d`` the number of features; no
feature may be a string; an entity may not be named like the model's input, nor declared with two
dtypes by two FeatureGroups; and an artifact trained on a FeatureGroup (its metadata's
``dataset.schemaDigest``) must be served with a FeatureGroup of that schema digest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.api.featuregroup import FeatureGroupSpec
from kiln.features.schema import FeatureView
from kiln.server.protocol import NUMERIC_DATATYPES, ProtocolError, TensorMetadata, convert_input

log = logging.getLogger(__name__)

#: Declared entity dtype -> the OIP datatype of its request input.
ENTITY_DATATYPES = {
    "int64": "INT64",
    "int32": "INT32",
    "float32": "FP32",
    "float64": "FP64",
    "bool": "BOOL",
    "string": "BYTES",
}
STATUSES_PARAMETER = "kiln.dev/feature-statuses"
NULL_FEATURES_PARAMETER = "kiln.dev/null-features"
INCOMPLETE_PARAMETER = "kiln.dev/incomplete-rows"
#: Longest wait for the online store (connect, then each reply), in seconds.
SOCKET_TIMEOUT_SECONDS = 2.0
#: Threads running online-store calls (each call holds one while it waits for Redis).
LOOKUP_THREADS = 8

PRESENT = "PRESENT"
NULL_VALUE = "NULL_VALUE"


class FeatureConfigError(ValueError):
    """``KILN_FEATURE_GROUPS`` is malformed, or does not fit the served model."""


@dataclass(frozen=True)
class ServedGroup:
    """One FeatureGroup of ``KILN_FEATURE_GROUPS``: its view and the environment variable holding
    its store's password (``passwordEnv``: the operator maps ``online.store.secretRef`` there;
    None: ``KILN_REDIS_PASSWORD``, if any)."""

    view: FeatureView
    password_env: str | None = None


def parse_feature_groups(text: str) -> list[ServedGroup]:
    """The FeatureGroups of ``KILN_FEATURE_GROUPS``: a JSON list of ``{name, namespace, spec,
    schemaDigest, passwordEnv}`` (``schemaDigest`` optional: when given, the spec's digest must
    equal it; ``passwordEnv`` optional).

    Raises:
        FeatureConfigError: not that shape, a spec that is invalid or has no online store, a
            digest that differs, a name given twice, or no FeatureGroup at all.
    """
    from pydantic import ValidationError

    try:
        doc = json.loads(text)
    except ValueError as e:
        raise FeatureConfigError(f"KILN_FEATURE_GROUPS is not JSON: {e}") from None
    if not isinstance(doc, list) or not doc or not all(isinstance(g, dict) for g in doc):
        raise FeatureConfigError("KILN_FEATURE_GROUPS must be a non-empty JSON list of objects")
    out: list[ServedGroup] = []
    for i, g in enumerate(doc):
        name, namespace = g.get("name"), g.get("namespace") or "default"
        if not isinstance(name, str) or not name or not isinstance(namespace, str):
            raise FeatureConfigError(f"KILN_FEATURE_GROUPS[{i}] needs a string name (and namespace)")
        try:
            view = FeatureView(namespace, name, FeatureGroupSpec.model_validate(g.get("spec") or {}))
        except ValidationError as e:
            raise FeatureConfigError(f"FeatureGroup {name}: invalid spec: {e}") from None
        want = g.get("schemaDigest")
        if want is not None and want != view.digest:
            raise FeatureConfigError(
                f"FeatureGroup {name}: schemaDigest {want} is not the digest of its spec, {view.digest}"
            )
        online = view.spec.online
        if not online.enabled or online.store is None:
            raise FeatureConfigError(
                f"FeatureGroup {name} has no online store (online.enabled, online.store)"
            )
        if any(s.view.name == name for s in out):
            raise FeatureConfigError(f"FeatureGroup {name} is given twice")
        password_env = g.get("passwordEnv")
        if password_env is not None and (not isinstance(password_env, str) or not password_env):
            raise FeatureConfigError(f"FeatureGroup {name}: passwordEnv must be a variable name")
        out.append(ServedGroup(view, password_env))
    return out


def entity_inputs(views: Sequence[FeatureView]) -> tuple[TensorMetadata, ...]:
    """The entity-key inputs of ``views``: each entity column once (first-seen order), ``[-1]``.

    Raises:
        FeatureConfigError: an entity declared with two dtypes.
    """
    seen: dict[str, str] = {}
    for v in views:
        for e in v.spec.entities:
            dtype = str(e.dtype)
            if seen.setdefault(e.name, dtype) != dtype:
                raise FeatureConfigError(
                    f"entity {e.name} is {seen[e.name]} in one FeatureGroup and {dtype} in {v.name}"
                )
    return tuple(TensorMetadata(n, ENTITY_DATATYPES[d], [-1]) for n, d in seen.items())


def check_model(
    views: Sequence[FeatureView], inputs: Sequence[TensorMetadata], trained_on: str | None
) -> int:
    """Check the served model fits ``views``; return the feature count ``d``.

    Args:
        inputs: the model's (or its hook's) input signature.
        trained_on: the artifact's ``dataset.schemaDigest`` (None when not trained on a FeatureGroup).
    Raises:
        FeatureConfigError: see the module docstring (what is checked at start-up).
    """
    names = [f"{v.name}.{f.name}" for v in views for f in v.spec.features]
    strings = [f"{v.name}.{f.name}" for v in views for f in v.spec.features if str(f.dtype) == "string"]
    if strings:
        raise FeatureConfigError(f"string features cannot be a model input: {', '.join(strings)}")
    if len(inputs) != 1:
        raise FeatureConfigError(
            f"the model has {len(inputs)} inputs; entity-key requests need a model with one input "
            f"of shape [-1, {len(names)}] (the FeatureGroups' features)"
        )
    spec = inputs[0]
    if (
        spec.datatype not in NUMERIC_DATATYPES
        or len(spec.shape) != 2
        or spec.shape[1] not in (-1, len(names))
    ):
        raise FeatureConfigError(
            f"the model's input {spec.name!r} is {spec.datatype} {spec.shape}; the FeatureGroups give "
            f"{len(names)} features ({', '.join(names[:20])}{' ...' if len(names) > 20 else ''}): "
            f"it must be a number type of shape [-1, {len(names)}]"
        )
    clash = [t.name for t in entity_inputs(views) if t.name == spec.name]
    if clash:
        raise FeatureConfigError(f"entity {clash[0]} has the name of the model's input; rename one")
    digests = {v.digest: v.name for v in views}
    if trained_on is not None and trained_on not in digests:
        served = ", ".join(f"{n} ({d})" for d, n in digests.items())
        raise FeatureConfigError(
            f"the model was trained on a FeatureGroup with schema digest {trained_on}; "
            f"the FeatureGroups served are {served}"
        )
    return len(names)


def fill_values(model: Any, width: int) -> np.ndarray:
    """Value served for each of the ``width`` features when missing: the artifact's training
    mean (``config.inputMean`` of a kiln-mlp artifact) when it has one of that length, else 0."""
    mean = getattr(getattr(model, "config", None), "inputMean", None)
    if isinstance(mean, list | tuple) and len(mean) == width:
        return np.asarray(mean, dtype=np.float64)
    return np.zeros(width, dtype=np.float64)


def trained_schema_digest(model: Any) -> str | None:
    """The artifact metadata's ``dataset.schemaDigest`` (None when absent)."""
    dataset = getattr(getattr(model, "metadata", None), "dataset", None)
    digest = getattr(dataset, "schemaDigest", None)
    return digest if isinstance(digest, str) else None


@dataclass(frozen=True)
class GroupResult:
    """One FeatureGroup's values for a request: ``values`` ``[n, k]`` float64 (missing ones
    filled), the row statuses and, by row, the null features."""

    values: np.ndarray
    statuses: list[str]
    nulls: dict[int, list[str]]


class FeatureLookup:
    """The online-store side of entity-key requests for one server (see the module docstring).

    Args:
        groups: the FeatureGroups, in ``spec.featureGroups`` order.
        model: the served predictor (its ``inputs``, and its artifact's ``config`` and
            ``metadata`` for the fill values and the schema check).
        metrics: a :class:`kiln.server.metrics.ServerMetrics` (None: nothing recorded).
        connect: ``(address, password or None) -> redis client`` (default
            :func:`kiln.features.online.connect`).
    Raises:
        FeatureConfigError: the model does not fit (:func:`check_model`).
    """

    def __init__(
        self,
        groups: Sequence[ServedGroup],
        model: Any,
        *,
        metrics: Any = None,
        connect: Callable[[str, str | None], Any] | None = None,
    ) -> None:
        self.views = [g.view for g in groups]
        width = check_model(self.views, tuple(model.inputs), trained_schema_digest(model))
        self.model_input: TensorMetadata = model.inputs[0]
        self.entity_inputs = entity_inputs(self.views)
        self.fill = fill_values(model, width)
        self.metrics = metrics
        if connect is None:
            from kiln.features.online import connect as redis_connect

            def connect(address: str, password: str | None) -> Any:
                return redis_connect(address, socket_timeout=SOCKET_TIMEOUT_SECONDS, password=password)

        # a client per store and password: redis-py clients are thread-safe (a connection pool each)
        clients: dict[tuple[str, str | None], Any] = {}
        self._clients: list[Any] = []
        self._offsets: list[int] = []
        offset = 0
        for g in groups:
            v, store = g.view, g.view.spec.online.store
            if store is None:
                raise FeatureConfigError(f"FeatureGroup {v.name} has no online store (online.store)")
            where = (store.address, g.password_env)
            if where not in clients:
                clients[where] = connect(store.address, os.environ.get(g.password_env or "") or None)
            self._clients.append(clients[where])
            self._offsets.append(offset)
            offset += len(v.spec.features)
        self._executor = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="kiln-features")

    def close(self) -> None:
        """Stop the lookup threads and close the store clients."""
        self._executor.shutdown(wait=True)
        for c in {id(c): c for c in self._clients}.values():  # each client once
            close = getattr(c, "close", None)
            if callable(close):
                close()

    async def lookup(
        self, entities: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, str | int | bool]]:
        """The model input ``[n, d]`` for a request's entity keys, and the response parameters.

        Args:
            entities: entity input name -> ``[n]`` array (every entity input, as validated).
        Raises:
            ProtocolError: 503 when an online store fails or times out (naming the
                FeatureGroup), 400 when a key does not fit its entity's dtype.
        """
        columns = {k: v.tolist() for k, v in entities.items()}
        n = len(next(iter(columns.values())))
        # One thread hop for all FeatureGroups, one after the other: decoding the replies holds
        # the GIL, so threads per FeatureGroup only added contention (p50 of a 1-row lookup of two
        # FeatureGroups: 7.3 ms with a thread each, 1.0 ms with one, on a loaded 2-core machine).
        results = await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: [self._fetch(i, columns, n) for i in range(len(self.views))]
        )
        x = np.concatenate([r.values for r in results], axis=1)
        params: dict[str, str | int | bool] = {
            STATUSES_PARAMETER: json.dumps(
                {v.name: r.statuses for v, r in zip(self.views, results, strict=True)}, separators=(",", ":")
            ),
            INCOMPLETE_PARAMETER: sum(1 for i in range(n) if any(r.statuses[i] != PRESENT for r in results)),
        }
        nulls = {
            v.name: {str(i): f for i, f in r.nulls.items()}
            for v, r in zip(self.views, results, strict=True)
            if r.nulls
        }
        if nulls:
            params[NULL_FEATURES_PARAMETER] = json.dumps(nulls, separators=(",", ":"))
        return convert_input(self.model_input.name, x, self.model_input.datatype), params

    def _fetch(self, index: int, columns: Mapping[str, list[Any]], n: int) -> GroupResult:
        """One online-store call for the ``n`` entities of FeatureGroup ``index`` (runs in a
        lookup thread). The keys already have their entities' types (the request's datatypes
        are checked against :data:`ENTITY_DATATYPES`)."""
        from kiln.features.errors import OnlineStoreError
        from kiln.features.online import get_online_features

        view, offset = self.views[index], self._offsets[index]
        names = view.entity_names
        rows = [{e: columns[e][i] for e in names} for i in range(n)]
        started = time.perf_counter()
        try:
            found = get_online_features(self._clients[index], view, rows)
        except OnlineStoreError as e:
            if self.metrics is not None:
                self.metrics.feature_lookup_failed(view.name)
            raise ProtocolError(
                f"online store of FeatureGroup {view.name} is unavailable: {e}", 503
            ) from None
        features = view.feature_names
        fill = self.fill[offset : offset + len(features)].tolist()
        rows_out: list[list[Any]] = []
        statuses: list[str] = []
        nulls: dict[int, list[str]] = {}
        for i, row in enumerate(found):
            got, status = row.values, row.statuses
            bad = [f for f in features if status[f] != PRESENT]
            if not bad:
                rows_out.append([got[f] for f in features])
                statuses.append(PRESENT)
                continue
            rows_out.append(
                [got[f] if status[f] == PRESENT else d for f, d in zip(features, fill, strict=True)]
            )
            if status[bad[0]] == NULL_VALUE:
                statuses.append(NULL_VALUE)
                nulls[i] = bad
            else:
                statuses.append(status[bad[0]])  # NOT_FOUND / OUTSIDE_MAX_AGE: the whole row
        values = np.asarray(rows_out, dtype=np.float64).reshape(n, len(features))  # bools: 0.0/1.0
        if self.metrics is not None:
            self.metrics.feature_lookup_done(view.name, time.perf_counter() - started, statuses)
        return GroupResult(values, statuses, nulls)
