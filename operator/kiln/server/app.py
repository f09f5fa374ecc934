"""The server: Open Inference Protocol v2 over REST (aiohttp) and gRPC, metrics, graceful shutdown.

The gRPC service (``inference.GRPCInferenceService`` on ``grpc_port``) lives in
:mod:`kiln.server.grpc_service`; both transports call one :class:`kiln.server.core.InferenceCore`.

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
accepting connections (REST) and calls (gRPC: UNAVAILABLE), lets in-flight requests and the batch queue finish (at most
``drain_timeout_seconds``), and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from kiln import __version__
from kiln.monitoring.monitor import DriftMonitor, DriftSettings
from kiln.server.core import (
    EXTENSIONS,
    SERVER_NAME,
    InferenceCore,
    OutputTensor,
    Predictor,
    request_id,
)
from kiln.server.features import FeatureConfigError
from kiln.server.grpc_service import GrpcServer
from kiln.server.metrics import CONTENT_TYPE, ServerMetrics
from kiln.server.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    encode_infer_response,
    error_body,
    json_body,
    parse_infer_request,
)
from kiln.server.settings import ServerSettings

__all__ = ["EXTENSIONS", "SERVER_NAME", "InferenceServer", "Predictor", "serve"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=json_body(doc), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.Response(body=error_body(message), status=status, content_type="application/json")


class InferenceServer:
    """One model served over REST (aiohttp) and gRPC; create, ``await start()``, then ``await shutdown()``.

    Both transports share one :class:`~kiln.server.core.InferenceCore` (model, batcher, cache,
    metrics, readiness).

    Args:
        model: the model (its ``name``/``version`` are those of the URLs).
        settings: ports, batching, cache, fault injection and shutdown timings.
        metrics: defaults to a new :class:`ServerMetrics` with its own registry.
    """

    def __init__(
        self,
        model: Predictor,
        settings: ServerSettings,
        *,
        metrics: ServerMetrics | None = None,
        profile_dir: str | Path | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.core = InferenceCore(model, settings, metrics)
        self.metrics = self.core.metrics
        if profile_dir is not None:
            # Drift against the artifact's reference profile (none: "no reference", a gauge).
            self.core.drift = DriftMonitor.from_artifact(
                profile_dir,
                model=model.name,
                version=model.version,
                settings=DriftSettings.from_env(),
                registry=self.metrics.registry,
            )
        self._stopped = False
        self.app = self._build_app()
        self.metrics_app = self._build_metrics_app()
        self._runners: list[web.AppRunner] = []
        self._grpc: GrpcServer | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.grpc_port: int | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        """True while the server accepts traffic (model loaded, not shutting down)."""
        return self.core.ready

    async def start(self) -> None:
        """Bind the three ports, start the batcher and turn ready.

        Raises:
            OSError: a port cannot be bound.
        """
        s = self.settings
        self.core.start()
        for app, port, attr in (
            (self.metrics_app, s.metrics_port, "metrics_port"),
            (self.app, s.port, "port"),
        ):
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
            await runner.setup()
            await web.TCPSite(runner, s.host or None, port).start()
            self._runners.append(runner)
            setattr(self, attr, runner.addresses[0][1] if runner.addresses else port)
        self._grpc = GrpcServer(self.core)
        self.grpc_port = await self._grpc.start(s.host, s.grpc_port)
        log.info(
            "serving model %s version %s on %s:%s (gRPC :%s, metrics :%s), max batch %d rows / %.1f ms, "
            "cache %d",
            self.model.name,
            self.model.version,
            s.host or "*",
            self.port,
            self.grpc_port,
            self.metrics_port,
            s.max_batch_size,
            s.max_batch_delay_ms,
            s.cache_size,
        )
        if self.core.fail_rate > 0:
            log.warning(
                "FAULT INJECTION ON: %.1f%% of inference requests will be answered 500 on purpose "
                "(%s); see kiln_inference_injected_failures_total",
                100 * self.core.fail_rate,
                self.core.fail_rate_source(),
            )

    def begin_shutdown(self) -> None:
        """Turn readiness false at once (safe to call from a signal handler on the loop)."""
        self.core.begin_shutdown()

    async def shutdown(self, *, delay: float | None = None) -> bool:
        """Drain and stop (idempotent).

        REST and gRPC alike keep serving (not ready) for ``delay``; then the REST listener closes
        and the gRPC server stops taking calls (GOAWAY: new calls get UNAVAILABLE, clients
        reconnect elsewhere) while in-flight requests and the batch queue finish.

        Args:
            delay: seconds to keep serving, not ready, before closing the listeners
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
        inference = self._runners[1] if len(self._runners) > 1 else None
        if inference is not None:
            for site in list(inference.sites):
                await site.stop()  # stop accepting connections; open ones go on
        grpc_stopped = (
            asyncio.create_task(self._grpc.stop(s.drain_timeout_seconds)) if self._grpc is not None else None
        )
        drained = await self.core.drain(s.drain_timeout_seconds)
        if not drained:
            log.warning(
                "drain timeout (%.1fs): %d request(s) still in flight are cut off",
                s.drain_timeout_seconds,
                self.core.active,
            )
        if grpc_stopped is not None:
            await grpc_stopped
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.core.stop()
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

        async def drift(_: web.Request) -> web.Response:
            if self.core.drift is None:
                return _error(404, "drift monitoring is off: no artifact directory was given")
            return _json(self.core.drift.snapshot())

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/debug/drift", drift)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        with self.core.track():
            try:
                response = await handler(request)
            except web.HTTPException as e:  # router 404/405, or raised by aiohttp itself
                response = _error(e.status, f"{e.reason}: {request.method} {request.path}")
                if e.status == 405:
                    response.headers["Allow"] = e.headers.get("Allow", "")
            except Exception as e:  # pragma: no cover - handlers catch their own; belt and braces
                log.exception("unhandled error for %s %s", request.method, request.path)
                response = _error(500, f"internal server error: {type(e).__name__}")
            if self.core.draining:
                response.force_close()  # make clients reconnect (to a pod that is not leaving)
            return response

    def _check_model(self, request: web.Request) -> None:
        self.core.check_model(request.match_info["name"], request.match_info.get("version"))

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
        meta = self.core.metadata()
        return _json(
            {
                "name": meta.name,
                "versions": meta.versions,
                "platform": meta.platform,
                "inputs": [t.to_json() for t in meta.inputs],
                "outputs": [t.to_json() for t in meta.outputs],
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
        try:
            return await self.core.infer("rest", lambda: self._decode(request), self._encode)
        except ProtocolError as e:
            return _error(e.status, e.message)

    async def _decode(self, request: web.Request) -> InferRequest:
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
        core = self.core
        return parse_infer_request(
            body,
            header_length=request.headers.get(HEADER_LENGTH),
            inputs=core.inputs,
            output_names=core.output_names,
            entity_inputs=core.entity_inputs,
        )

    def _encode(self, parsed: InferRequest, outputs: list[OutputTensor]) -> web.Response:
        body_out, json_length = encode_infer_response(
            model_name=self.model.name,
            model_version=self.model.version,
            request_id=request_id(parsed),
            outputs=[(o.requested, o.datatype, o.array) for o in outputs],
            parameters=parsed.parameters,
        )
        if json_length is None:
            return web.Response(body=body_out, content_type="application/json")
        return web.Response(
            body=body_out, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )


async def serve(model: Predictor, settings: ServerSettings, profile_dir: str | Path | None = None) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and stop. ``profile_dir``: the
    artifact directory, whose ``profile.json`` is the drift reference.

    Returns:
        The exit status: 0 after a shutdown, 1 when a port cannot be bound or the FeatureGroups
        do not fit the model (:class:`kiln.server.features.FeatureConfigError`).
    """
    try:
        server = InferenceServer(model, settings, profile_dir=profile_dir)
    except FeatureConfigError as e:
        log.error("refusing to serve: %s", e)
        print(f"kiln-serve: refusing to serve with KILN_FEATURE_GROUPS: {e}", file=sys.stderr)
        return 1
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
            "cannot listen on %s ports %d/%d/%d (REST/gRPC/metrics): %s",
            settings.host or "*",
            settings.port,
            settings.grpc_port,
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
