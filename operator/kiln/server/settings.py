"""Command line and environment settings of ``kiln-serve``.

Every flag has an environment variable (the operator configures the server through the
Deployment's ``env``); a flag given on the command line wins over the variable, and the variable
over the default. This module imports neither torch nor aiohttp, so ``kiln-serve --help`` is fast.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from kiln.artifact import DIGEST_RE

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Validated configuration of one model server process."""

    artifact: str
    digest: str
    model_name: str
    model_version: str = "1"
    host: str = ""
    port: int = 8080
    grpc_port: int = 8081
    metrics_port: int = 9090
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    inline_forward_below_us: float = 1000.0
    cache_size: int = 0
    fail_rate: float = 0.0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    drain_timeout_seconds: float = 30.0
    shutdown_delay_seconds: float = 0.0
    torch_threads: int = 1
    log_level: str = "INFO"
    model_dir: str = "/tmp/kiln-model"
    model_hook: str = ""
    feature_groups: str = ""
    fetch_only: bool = False

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))


def validate(s: ServerSettings) -> list[str]:
    """Return human-readable problems with ``s`` (empty when valid)."""
    problems: list[str] = []
    if not s.artifact:
        problems.append("artifact is required (--artifact or KILN_ARTIFACT_URI)")
    if not DIGEST_RE.match(s.digest or ""):
        problems.append(
            "digest must look like 'sha256:<64 lowercase hex>' (--digest or KILN_ARTIFACT_DIGEST), "
            f"got {s.digest!r}"
        )
    if not s.model_name or "/" in s.model_name:
        problems.append(f"model name must be a non-empty string without '/', got {s.model_name!r}")
    if not s.model_version or "/" in s.model_version:
        problems.append(f"model version must be a non-empty string without '/', got {s.model_version!r}")
    ports = {"port": s.port, "grpc port": s.grpc_port, "metrics port": s.metrics_port}
    for name, v in ports.items():
        if not 0 <= v <= 65535:
            problems.append(f"{name.replace(' ', '_')} must be in 0..65535, got {v}")
    seen: dict[int, str] = {}
    for name, v in ports.items():
        if v != 0 and v in seen:
            problems.append(f"{seen[v]} and {name} must differ, both are {v}")
        seen.setdefault(v, name)
    if s.max_batch_size < 1:
        problems.append(f"max batch size must be >= 1, got {s.max_batch_size}")
    if s.max_batch_delay_ms < 0:
        problems.append(f"max batch delay must be >= 0 ms, got {s.max_batch_delay_ms}")
    if s.inline_forward_below_us < 0:
        problems.append(f"inline forward threshold must be >= 0 us, got {s.inline_forward_below_us}")
    if s.cache_size < 0:
        problems.append(f"cache size must be >= 0, got {s.cache_size}")
    if not 0.0 <= s.fail_rate <= 1.0:
        problems.append(f"fail rate must be in [0, 1], got {s.fail_rate}")
    if s.max_request_bytes < 1024:
        problems.append(f"max request bytes must be >= 1024, got {s.max_request_bytes}")
    if s.drain_timeout_seconds < 0 or s.shutdown_delay_seconds < 0:
        problems.append("drain timeout and shutdown delay must be >= 0 seconds")
    if s.torch_threads < 1:
        problems.append(f"torch threads must be >= 1, got {s.torch_threads}")
    if s.feature_groups:
        from kiln.server.features import FeatureConfigError, parse_feature_groups

        try:
            parse_feature_groups(s.feature_groups)
        except FeatureConfigError as e:
            problems.append(str(e))
    return problems


@dataclass(frozen=True)
class _Option:
    field: str
    flag: str
    env: str
    type: Callable[[str], Any]
    help: str


OPTIONS: tuple[_Option, ...] = (
    _Option(
        "artifact",
        "--artifact",
        "KILN_ARTIFACT_URI",
        str,
        "artifact: s3://bucket/prefix (downloaded into --model-dir; AWS_* environment), file:// URI or path",
    ),
    _Option("digest", "--digest", "KILN_ARTIFACT_DIGEST", str, "expected weights digest, sha256:<hex>"),
    _Option("model_name", "--model-name", "KILN_MODEL_NAME", str, "model name in the /v2/models/{name} URLs"),
    _Option("model_version", "--model-version", "KILN_MODEL_VERSION", str, "model version served"),
    _Option(
        "host", "--host", "KILN_HOST", str, "address to listen on (empty: all interfaces, IPv4 and IPv6)"
    ),
    _Option("port", "--port", "KILN_PORT", int, "inference (Open Inference Protocol) port"),
    _Option(
        "grpc_port",
        "--grpc-port",
        "KILN_GRPC_PORT",
        int,
        "gRPC inference port (Open Inference Protocol's inference.GRPCInferenceService)",
    ),
    _Option("metrics_port", "--metrics-port", "KILN_METRICS_PORT", int, "Prometheus /metrics port"),
    _Option(
        "max_batch_size", "--max-batch-size", "KILN_MAX_BATCH_SIZE", int, "most rows in one forward pass"
    ),
    _Option(
        "max_batch_delay_ms",
        "--max-batch-delay-ms",
        "KILN_MAX_BATCH_DELAY_MS",
        float,
        "longest wait for more rows after the first queued one (only while more requests are arriving)",
    ),
    _Option(
        "inline_forward_below_us",
        "--inline-forward-below-us",
        "KILN_INLINE_FORWARD_BELOW_US",
        float,
        "run forward passes cheaper than this (microseconds of CPU, recent average) on the event loop "
        "instead of a thread; 0 = always a thread (as with a model hook, which may wait on I/O)",
    ),
    _Option("cache_size", "--cache-size", "KILN_CACHE_SIZE", int, "LRU response cache entries (0 = off)"),
    _Option(
        "fail_rate",
        "--fail-rate",
        "KILN_FAIL_RATE",
        float,
        "FAULT INJECTION for canary demos: fraction of infer requests answered 500 on purpose",
    ),
    _Option(
        "max_request_bytes", "--max-request-bytes", "KILN_MAX_REQUEST_BYTES", int, "larger bodies get 413"
    ),
    _Option(
        "drain_timeout_seconds",
        "--drain-timeout-seconds",
        "KILN_DRAIN_TIMEOUT_SECONDS",
        float,
        "on SIGTERM, longest wait for in-flight requests",
    ),
    _Option(
        "shutdown_delay_seconds",
        "--shutdown-delay-seconds",
        "KILN_SHUTDOWN_DELAY_SECONDS",
        float,
        "on SIGTERM, keep serving (not ready) this long before closing the listener",
    ),
    _Option("torch_threads", "--torch-threads", "KILN_TORCH_THREADS", int, "torch intra-op threads"),
    _Option("log_level", "--log-level", "KILN_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
    _Option(
        "model_dir",
        "--model-dir",
        "KILN_MODEL_DIR",
        str,
        "where an s3:// artifact is downloaded to (a copy verified there is reused at the next start)",
    ),
    _Option(
        "model_hook",
        "--model-hook",
        "KILN_MODEL_HOOK",
        str,
        "pre/post-processing hook: module:attr, or an entry point of group kiln.model_hooks "
        "(runs in the server process: no isolation)",
    ),
    _Option(
        "feature_groups",
        "--feature-groups",
        "KILN_FEATURE_GROUPS",
        str,
        "JSON list of FeatureGroups [{name, namespace, spec, schemaDigest}] whose entity keys a request "
        "may send instead of the model's input (features read from their online store; written by "
        "the operator from spec.featureGroups)",
    ),
)

ENV_VARS: dict[str, str] = {o.field: o.env for o in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    """The ``kiln-serve`` argument parser (all defaults None: resolution happens in ``parse_settings``)."""
    defaults = {f.name: f.default for f in fields(ServerSettings)}
    p = argparse.ArgumentParser(
        prog="kiln-serve",
        description=(
            "Serve a Kiln artifact over the Open Inference Protocol (v2 REST and gRPC), with dynamic batching "
            "and Prometheus metrics. Every flag can also be set by the environment variable shown."
        ),
    )
    for o in OPTIONS:
        d = defaults.get(o.field)
        shown = (
            "required"
            if d is None or o.field in ("artifact", "digest", "model_name")
            else f"default {d if d != '' else 'empty'}"
        )
        p.add_argument(
            o.flag, dest=o.field, type=o.type, default=None, help=f"{o.help} (env {o.env}; {shown})"
        )
    p.add_argument(
        "--fetch-only",
        action="store_true",
        help="download (s3://) and verify the artifact into --model-dir, then exit 0 (1 when it fails): "
        "the storage-initializer init container",
    )
    return p


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Resolve settings from ``argv`` (flags), then ``environ``, then defaults.

    Exits with status 2 and a usage message (argparse's convention) on invalid values.
    """
    environ = os.environ if environ is None else environ
    parser = build_parser()
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for o in OPTIONS:
        v = getattr(ns, o.field)
        if v is None and environ.get(o.env, "") != "":
            raw = environ[o.env]
            try:
                v = o.type(raw)
            except ValueError:
                parser.error(f"environment variable {o.env}={raw!r} is not a valid {o.type.__name__}")
        if v is not None:
            values[o.field] = v
    values["fetch_only"] = bool(ns.fetch_only)
    for required in ("artifact", "digest", "model_name"):
        if required not in values:
            opt = next(o for o in OPTIONS if o.field == required)
            parser.error(f"{opt.flag} (or {opt.env}) is required")
    try:
        return ServerSettings(**values)
    except ValueError as e:
        parser.error(str(e))
