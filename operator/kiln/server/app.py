"""The aiohttp application: Open Inference Protocol v2 REST endpoints, metrics, graceful shutdown.

Routes (inference port)::

    GET  /v2/health/live                            {"live": true}
    GET  /v2/health/ready                           {"ready": true} | 503 {"ready": false}
    GET  /v2                                        server metadata
    GET  /v2/models/{name}[/versions/{v}]           model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready     {"name", "ready"} | 503
    POST /v2/models/{name}[/versions/{v}]/infer     inference

and ``GET /metrics`` on the metrics port. Errors are ``{"error": "..."}`` with 400 (bad request),
404 (unknown model, version or route), 405, 413 (body over ``max_request_bytes``), 500 (injected
failure, or a bug: the handler never lets an exception escape) and 503 (shutting down).

The model metadata and the requests follow the model's own signature (``Predictor.inputs`` /
``outputs``: every input by name, several if the model has several); by default a response holds
every output (for the built-in MLP: the logits, FP32 ``[n, numClasses]``, and
``predicted_class``, INT64 ``[n]``, the arg-max); a request may ask for some with ``outputs``.

Shutdown (:meth:`InferenceServer.shutdown`, on SIGTERM): readiness turns false at once; the server
keeps serving for ``shutdown_delay_seconds`` (time for endpoints to drop the pod), then stops
accepting connections, lets in-flight requests and the batch queue finish (at most
``drain_timeout_seconds``), and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from kiln import __version__
from kiln.server.batcher import BatcherClosedError, DynamicBatcher, Tensors
from kiln.server.cache import OutputCache
from kiln.server.metrics import CONTENT_TYPE, ServerMetrics
from kiln.server.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    RequestedOutput,
    TensorMetadata,
    encode_infer_response,
    error_body,
    json_body,
    parse_infer_request,
)
from kiln.server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVER_NAME = "kiln-serve"
EXTENSIONS = ["binary_tensor_data"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Predictor(Protocol):
    """What the server needs of a model (``kiln.server.model.ServedModel`` is one)."""

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


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=json_body(doc), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.Response(body=error_body(message), status=status, content_type="application/json")


class InferenceServer:
    """One model served over HTTP; create, ``await start()``, then ``await shutdown()``.

    Args:
        model: the model (its ``name``/``version`` are those of the URLs).
        settings: ports, batching, cache, fault injection and shutdown timings.
        metrics: defaults to a new :class:`ServerMetrics` with its own registry.
    """

    def __init__(
        self, model: Predictor, settings: ServerSettings, *, metrics: ServerMetrics | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self.inputs = tuple(model.inputs)
        self.outputs = tuple(model.outputs)
        self._output_names = tuple(t.name for t in self.outputs)
        #: FAULT INJECTION: fraction of infer requests answered 500 on purpose, the larger of
        #: ``--fail-rate`` and the artifact's ``servingFaultInjectionFailRate``.
        self.fail_rate = max(settings.fail_rate, model.fault_injection_fail_rate)
        self.metrics = metrics or ServerMetrics(
            model.name, model.version, digest=model.digest, fail_rate=self.fail_rate
        )
        self.cache = OutputCache(settings.cache_size, model.version)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-forward")
        self.batcher = DynamicBatcher(
            model.predict,
            max_batch_size=settings.max_batch_size,
            max_batch_delay=settings.max_batch_delay_ms / 1000.0,
            executor=self._executor,
            on_batch=self.metrics.batch_size.observe,
        )
        self._random = random.Random()
        self._ready = False
        self._draining = False
        self._stopped = False
        self._active = 0  # HTTP requests being handled, any route
        self._idle = asyncio.Event()
        self._idle.set()
        self.app = self._build_app()
        self.metrics_app = self._build_metrics_app()
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None
        self.metrics_port: int | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        """True while the server accepts traffic (model loaded, not shutting down)."""
        return self._ready and not self._draining

    async def start(self) -> None:
        """Bind both ports, start the batcher and turn ready."""
        self.batcher.start()
        s = self.settings
        for app, port, attr in (
            (self.metrics_app, s.metrics_port, "metrics_port"),
            (self.app, s.port, "port"),
        ):
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, s.host or None, port).start()
            self._runners.append(runner)
            setattr(self, attr, runner.addresses[0][1] if runner.addresses else port)
        self._ready = True
        log.info(
            "serving model %s version %s on %s:%s (metrics on :%s), max batch %d rows / %.1f ms, cache %d",
            self.model.name,
            self.model.version,
            s.host or "*",
            self.port,
            self.metrics_port,
            s.max_batch_size,
            s.max_batch_delay_ms,
            s.cache_size,
        )
        if self.fail_rate > 0:
            log.warning(
                "FAULT INJECTION ON: %.1f%% of inference requests will be answered 500 on purpose "
                "(%s); see kiln_inference_injected_failures_total",
                100 * self.fail_rate,
                self._fail_rate_source(),
            )

    def _fail_rate_source(self) -> str:
        """Where the fault-injection rate comes from, for logs and error messages."""
        parts = []
        if self.settings.fail_rate > 0:
            parts.append(f"--fail-rate {self.settings.fail_rate}")
        if self.model.fault_injection_fail_rate > 0:
            parts.append(f"artifact servingFaultInjectionFailRate {self.model.fault_injection_fail_rate}")
        return ", ".join(parts) + (" (the larger applies)" if len(parts) > 1 else "")

    def begin_shutdown(self) -> None:
        """Turn readiness false at once (safe to call from a signal handler on the loop)."""
        if not self._draining:
            self._draining = True
            log.info("shutting down: readiness is now false")

    async def shutdown(self, *, delay: float | None = None) -> bool:
        """Drain and stop (idempotent).

        Args:
            delay: seconds to keep serving, not ready, before closing the listener
                (default: ``settings.shutdown_delay_seconds``).
        Returns:
            True when every in-flight request finished within ``drain_timeout_seconds``.
        """
        self.begin_shutdown()
        if self._stopped:
            return True
        self._stopped = True
        s = self.settings
        delay = s.shutdown_delay_seconds if delay is None else delay
        if delay > 0:
            log.info("still serving for %.1fs so endpoints can drop this pod", delay)
            await asyncio.sleep(delay)
        inference = self._runners[-1] if self._runners else None
        if inference is not None:
            for site in list(inference.sites):
                await site.stop()  # stop accepting connections; open ones go on
        drained = True
        try:
            async with asyncio.timeout(s.drain_timeout_seconds):
                await self._idle.wait()
                while not self.batcher.idle:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            drained = False
            log.warning(
                "drain timeout (%.1fs): %d request(s) still in flight are cut off",
                s.drain_timeout_seconds,
                self._active,
            )
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.batcher.stop()
        self._executor.shutdown(wait=True)
        log.info("shut down%s", "" if drained else " (drain timed out)")
        return drained

    # ----------------------------------------------------------------- app
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_request_bytes, middlewares=[self._middleware])
        r = app.router
        # Inference first: the router tries resources sharing a prefix in registration order.
        r.add_post("/v2/models/{name}/infer", self._infer)
        r.add_post("/v2/models/{name}/versions/{version}/infer", self._infer)
        r.add_get("/v2/health/live", self._live)
        r.add_get("/v2/health/ready", self._server_ready)
        r.add_get("/v2", self._server_metadata)
        r.add_get("/v2/models/{name}", self._model_metadata)
        r.add_get("/v2/models/{name}/versions/{version}", self._model_metadata)
        r.add_get("/v2/models/{name}/ready", self._model_ready)
        r.add_get("/v2/models/{name}/versions/{version}/ready", self._model_ready)
        return app

    def _build_metrics_app(self) -> web.Application:
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

        app.router.add_get("/metrics", metrics)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._active += 1
        self._idle.clear()
        try:
            try:
                response = await handler(request)
            except web.HTTPException as e:  # router 404/405, or raised by aiohttp itself
                response = _error(e.status, f"{e.reason}: {request.method} {request.path}")
                if e.status == 405:
                    response.headers["Allow"] = e.headers.get("Allow", "")
            except Exception as e:  # pragma: no cover - handlers catch their own; belt and braces
                log.exception("unhandled error for %s %s", request.method, request.path)
                response = _error(500, f"internal server error: {type(e).__name__}")
            if self._draining:
                response.force_close()  # make clients reconnect (to a pod that is not leaving)
            return response
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _check_model(self, request: web.Request) -> None:
        name = request.match_info["name"]
        if name != self.model.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {self.model.name!r}", 404)
        version = request.match_info.get("version")
        if version is not None and version != self.model.version:
            raise ProtocolError(
                f"unknown version {version!r} of model {name!r}; "
                f"this server serves version {self.model.version!r}",
                404,
            )

    # ----------------------------------------------------------------- health and metadata
    async def _live(self, _: web.Request) -> web.Response:
        return _json({"live": True})

    async def _server_ready(self, _: web.Request) -> web.Response:
        ready = self.ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def _server_metadata(self, _: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def _model_metadata(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request)
        except ProtocolError as e:
            return _error(e.status, e.message)
        return _json(
            {
                "name": self.model.name,
                "versions": [self.model.version],
                "platform": self.model.platform,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
            }
        )

    async def _model_ready(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request)
        except ProtocolError as e:
            return _error(e.status, e.message)
        ready = self.ready
        return _json({"name": self.model.name, "ready": ready}, 200 if ready else 503)

    # ----------------------------------------------------------------- inference
    async def _infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        self.metrics.inflight.inc()
        code = 499  # client went away (handler cancelled) unless set below
        try:
            async with self.batcher.arrival() as arrival:
                try:
                    response = await self._infer_inner(request, arrival.submit)
                except ProtocolError as e:
                    response = _error(e.status, e.message)
                except BatcherClosedError as e:
                    response = _error(503, str(e))
                except Exception as e:
                    log.exception("inference failed")
                    response = _error(500, f"inference failed: {type(e).__name__}: {e}")
            code = response.status
            return response
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_done(code, time.perf_counter() - started)

    async def _infer_inner(
        self, request: web.Request, submit: Callable[[Tensors], Awaitable[Tensors]]
    ) -> web.Response:
        self._check_model(request)
        limit = self.settings.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ProtocolError(
                f"request body of {request.content_length} bytes exceeds the limit of {limit}", 413
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ProtocolError(f"request body exceeds the limit of {limit} bytes", 413) from None
        except RequestPayloadError as e:  # e.g. a body that does not decode per its Content-Encoding
            raise ProtocolError(f"could not read the request body: {' '.join(str(e).split())}") from None
        parsed = parse_infer_request(
            body,
            header_length=request.headers.get(HEADER_LENGTH),
            inputs=self.inputs,
            output_names=self._output_names,
        )
        if self.fail_rate > 0 and self._random.random() < self.fail_rate:
            self.metrics.injected_failures.inc()
            source = self._fail_rate_source()
            log.info("injected failure (fault injection, %s)", source)
            return _error(500, f"injected failure: fault injection is on ({source})")
        result: Mapping[str, np.ndarray] | None = None
        key = ""
        if self.cache.enabled:
            key = self.cache.key(parsed.inputs)
            result = self.cache.get(key)
            (self.metrics.cache_hits if result is not None else self.metrics.cache_misses).inc()
        if result is None:
            got = await submit(parsed.inputs)
            assert isinstance(got, Mapping)
            result = got
            if self.cache.enabled:
                self.cache.put(key, result)
        datatypes = {t.name: t.datatype for t in self.outputs}
        outputs: list[tuple[RequestedOutput, str, np.ndarray]] = [
            (requested, datatypes[requested.name], result[requested.name]) for requested in parsed.outputs
        ]
        body_out, json_length = encode_infer_response(
            model_name=self.model.name,
            model_version=self.model.version,
            request_id=parsed.id if parsed.id is not None else uuid.uuid4().hex,
            outputs=outputs,
        )
        if json_length is None:
            return web.Response(body=body_out, content_type="application/json")
        return web.Response(
            body=body_out, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )


async def serve(model: Predictor, settings: ServerSettings) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and stop.

    Returns:
        The exit status: 0 after a shutdown, 1 when a port cannot be bound.
    """
    server = InferenceServer(model, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        log.info("received %s", signum.name)
        server.begin_shutdown()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
    except OSError as e:
        log.error(
            "cannot listen on %s ports %d/%d: %s",
            settings.host or "*",
            settings.port,
            settings.metrics_port,
            e,
        )
        await server.shutdown(delay=0)
        return 1
    await stop.wait()
    await server.shutdown()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(sig)
    return 0
