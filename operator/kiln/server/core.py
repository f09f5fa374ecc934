"""The transport-neutral inference core shared by the REST (``app``) and gRPC (``grpc_service``) servers.

One :class:`InferenceCore` per server process holds the model, the dynamic batcher and its
executor thread, the output cache, the metrics, fault injection, and readiness and draining
state. A transport only decodes its request into a :class:`kiln.server.protocol.InferRequest` and
encodes the outputs; :meth:`InferenceCore.infer` runs the steps in between (decode, fault
injection, cache, batcher, outputs, encode) and records the metrics, so REST and gRPC answer the
same input with the same numbers and count in the same series.

Errors are :class:`kiln.server.protocol.ProtocolError` carrying an HTTP status (the REST answer);
the gRPC service maps it to a status code (:data:`kiln.server.grpc_service.GRPC_CODES`).
``kiln_inference_requests_total{code}`` is that HTTP status for both transports, labelled
``protocol="rest"|"grpc"``, so canary queries over ``code=~"5.."`` cover both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from kiln.monitoring.monitor import DriftMonitor
from kiln.server.batcher import BatcherClosedError, DynamicBatcher, Tensors
from kiln.server.cache import OutputCache
from kiln.server.features import FeatureLookup, parse_feature_groups
from kiln.server.metrics import ServerMetrics
from kiln.server.protocol import InferRequest, ProtocolError, RequestedOutput, TensorMetadata
from kiln.server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVER_NAME = "kiln-serve"
EXTENSIONS = ["binary_tensor_data"]

T = TypeVar("T")


class Predictor(Protocol):
    """What the server needs of a model (``kiln.server.model.ServedModel`` is one, and
    ``kiln.server.hooks.HookedModel``: a hook applies to both transports)."""

    name: str
    version: str
    digest: str
    #: The model's inputs and outputs (OIP names, datatypes, shapes; -1 free, first the batch).
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]
    #: FAULT INJECTION rate carried by the artifact (0.0 for a normal one).
    fault_injection_fail_rate: float

    @property
    def platform(self) -> str:
        """The model metadata's ``platform``."""
        ...

    def predict(self, x: Tensors) -> Tensors:
        """Output name -> array for input name -> array (rows first)."""
        ...


@dataclass(frozen=True)
class OutputTensor:
    """One output of an answered request: what was asked for, its OIP datatype and its values."""

    requested: RequestedOutput
    datatype: str
    array: np.ndarray


@dataclass(frozen=True)
class ModelMetadata:
    """The model metadata both transports answer (``GET /v2/models/{name}``, ``ModelMetadata``)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferenceCore:
    """Model, batcher, cache, metrics, fault injection and lifecycle state of one server.

    Call :meth:`start` on the event loop before the first request and :meth:`stop` after the last.

    With ``settings.feature_groups``, requests may carry entity keys (``entity_inputs``) instead
    of the model's inputs; their features are read from the online store before the cache and
    the batcher (:mod:`kiln.server.features`), so both see the model's input.

    Raises:
        kiln.server.features.FeatureConfigError: the FeatureGroups do not fit the model.
    """

    def __init__(
        self,
        model: Predictor,
        settings: ServerSettings,
        metrics: ServerMetrics | None = None,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.model = model
        #: Sees every answered request's inputs and outputs: a forward pass's whole batch at once,
        #: in the forward thread (:meth:`_forward`), and a cache hit on its own (drift is about the
        #: traffic, not the forward passes); computes in its own thread, never on the serving path.
        self.drift = drift
        self.settings = settings
        self.inputs = tuple(model.inputs)
        self.outputs = tuple(model.outputs)
        self.output_names = tuple(t.name for t in self.outputs)
        self._output_datatypes = {t.name: t.datatype for t in self.outputs}
        #: FAULT INJECTION: fraction of infer requests answered 500 on purpose, the larger of
        #: ``--fail-rate`` and the artifact's ``servingFaultInjectionFailRate``.
        self.fail_rate = max(settings.fail_rate, model.fault_injection_fail_rate)
        self.metrics = metrics or ServerMetrics(
            model.name, model.version, digest=model.digest, fail_rate=self.fail_rate
        )
        self.cache = OutputCache(settings.cache_size, model.version)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-forward")
        self.batcher = DynamicBatcher(
            self._forward,
            max_batch_size=settings.max_batch_size,
            max_batch_delay=settings.max_batch_delay_ms / 1000.0,
            executor=self._executor,
            on_batch=self.metrics.batch_size.observe,
            # a user's hook may wait (on I/O, a service): its passes never block the event loop
            inline_below=0.0 if settings.model_hook else settings.inline_forward_below_us / 1e6,
        )
        self.features = (
            FeatureLookup(parse_feature_groups(settings.feature_groups), model, metrics=self.metrics)
            if settings.feature_groups
            else None
        )
        #: The entity-key inputs a request may send instead of ``inputs`` (none without FeatureGroups).
        self.entity_inputs: tuple[TensorMetadata, ...] = self.features.entity_inputs if self.features else ()
        self._random = random.Random()
        self._ready = False
        self._draining = False
        self.active = 0  # requests being handled, any transport, any route
        self._idle = asyncio.Event()
        self._idle.set()

    # ----------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        """True while the server accepts traffic (started, not shutting down)."""
        return self._ready and not self._draining

    @property
    def draining(self) -> bool:
        """True once shutdown has begun."""
        return self._draining

    def start(self) -> None:
        """Start the batcher (on the running loop) and the drift monitor, and turn ready."""
        self.batcher.start()
        if self.drift is not None:
            self.drift.start()
        self._ready = True

    def begin_shutdown(self) -> None:
        """Turn readiness false at once (safe to call from a signal handler on the loop)."""
        if not self._draining:
            self._draining = True
            log.info("shutting down: readiness is now false")

    async def drain(self, timeout: float) -> bool:
        """Wait until no request is being handled and the batch queue is empty.

        Returns:
            False when ``timeout`` seconds passed first.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
                while not self.batcher.idle:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Finish the batch queue, stop the batcher, its executor thread and the drift monitor."""
        await self.batcher.stop()
        self._executor.shutdown(wait=True)
        if self.features is not None:
            self.features.close()
        if self.drift is not None:
            self.drift.stop()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a request (any route, any transport) as in flight while the block runs."""
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    def fail_rate_source(self) -> str:
        """Where the fault-injection rate comes from, for logs and error messages."""
        parts = []
        if self.settings.fail_rate > 0:
            parts.append(f"--fail-rate {self.settings.fail_rate}")
        if self.model.fault_injection_fail_rate > 0:
            parts.append(f"artifact servingFaultInjectionFailRate {self.model.fault_injection_fail_rate}")
        return ", ".join(parts) + (" (the larger applies)" if len(parts) > 1 else "")

    # ----------------------------------------------------------------- metadata
    def check_model(self, name: str, version: str | None) -> None:
        """Raise ProtocolError 404 unless ``name`` (and ``version``, if given) is the served model."""
        if name != self.model.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {self.model.name!r}", 404)
        if version is not None and version != self.model.version:
            raise ProtocolError(
                f"unknown version {version!r} of model {name!r}; "
                f"this server serves version {self.model.version!r}",
                404,
            )

    def metadata(self) -> ModelMetadata:
        """The served model's metadata."""
        return ModelMetadata(
            self.model.name, [self.model.version], self.model.platform, list(self.inputs), list(self.outputs)
        )

    # ----------------------------------------------------------------- inference
    def _forward(self, x: Tensors) -> Tensors:
        """The model's forward pass over a batch (``x``: input name -> array, rows first), then the
        batch's inputs and outputs to the drift monitor, in the forward thread.

        Recording a batch costs one :meth:`DriftMonitor.observe` (a copy into its ring buffers) per
        forward pass instead of one per request on the event loop, which serves every request:
        per request, the monitor cost kiln-serve 11% of its throughput at 32 concurrent clients
        (``hack/bench-server``, docs/monitoring.md section 4).
        """
        y = self.model.predict(x)
        drift = self.drift
        if drift is not None and isinstance(x, Mapping) and isinstance(y, Mapping):
            drift.observe(x, y)
        return y

    async def infer(
        self,
        protocol: str,
        decode: Callable[[], Awaitable[InferRequest]],
        encode: Callable[[InferRequest, list[OutputTensor]], T],
    ) -> T:
        """Run one inference request and record it in the metrics.

        Args:
            protocol: ``rest`` or ``grpc`` (the metrics' ``protocol`` label).
            decode: reads, parses and validates the request (raises ProtocolError); it runs while
                the batcher counts the request as arriving, so concurrent requests batch together.
            encode: builds the transport's answer from the request and its outputs.
        Returns:
            What ``encode`` returned.
        Raises:
            ProtocolError: with the HTTP status of the answer (4xx bad request, 500 injected failure
                or internal error, 503 shutting down); nothing else.
        """
        started = time.perf_counter()
        self.metrics.inflight.inc()
        code = 499  # client went away (handler cancelled) unless set below
        try:
            async with self.batcher.arrival() as arrival:
                try:
                    request = await decode()
                    outputs = await self._outputs(request, arrival.submit)
                    answer = encode(request, outputs)
                except ProtocolError as e:
                    code = e.status
                    raise
                except BatcherClosedError as e:
                    code = 503
                    raise ProtocolError(str(e), 503) from None
                except Exception as e:
                    log.exception("inference failed")
                    code = 500
                    raise ProtocolError(f"inference failed: {type(e).__name__}: {e}", 500) from None
            code = 200
            return answer
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_done(code, time.perf_counter() - started, protocol)

    async def _outputs(
        self, request: InferRequest, submit: Callable[[Tensors], Awaitable[Tensors]]
    ) -> list[OutputTensor]:
        if self.fail_rate > 0 and self._random.random() < self.fail_rate:
            self.metrics.injected_failures.inc()
            source = self.fail_rate_source()
            log.info("injected failure (fault injection, %s)", source)
            raise ProtocolError(f"injected failure: fault injection is on ({source})", 500)
        if request.entities is not None:
            assert self.features is not None  # entity keys are only accepted with FeatureGroups
            x, params = await self.features.lookup(request.entities)
            request.inputs = {self.features.model_input.name: x}
            request.parameters.update(params)
        result: Mapping[str, np.ndarray] | None = None
        key = ""
        if self.cache.enabled:
            key = self.cache.key(request.inputs)
            result = self.cache.get(key)
            (self.metrics.cache_hits if result is not None else self.metrics.cache_misses).inc()
        if result is None:
            got = await submit(request.inputs)  # the forward thread records it for drift
            assert isinstance(got, Mapping)  # inputs by name in, outputs by name out
            result = got
            if self.cache.enabled:
                self.cache.put(key, result)
        elif self.drift is not None:  # a cache hit: no forward pass saw these rows
            self.drift.observe(request.inputs, result)
        datatypes = self._output_datatypes
        return [OutputTensor(r, datatypes[r.name], result[r.name]) for r in request.outputs]


def request_id(request: InferRequest) -> str:
    """The request's id, or a new random one (both transports answer with an id)."""
    return request.id if request.id is not None else uuid.uuid4().hex
