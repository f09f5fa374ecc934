"""Log lines: JSON by default with the reconciled object, text on request, probes not at INFO."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from kiln import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("aiohttp.access")
    filters = list(access.filters)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    access.filters[:] = filters


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_the_bound_object(restore_logging):
    buf = io.StringIO()
    logs.configure("json", stream=buf)
    log = logging.getLogger("kiln.test")
    log.info("before")
    with logs.bind(logs.ObjectRef("TrainingJob", "team-a", "digits", "0f3e")):
        log.warning("restarting gang %d", 2, extra={"restarts": 2})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    before, during, failed = lines(buf)
    assert set(before) == {"time", "level", "logger", "message"}
    assert before["level"] == "INFO" and before["logger"] == "kiln.test" and before["message"] == "before"
    assert before["time"].endswith("Z") and before["time"][10] == "T"
    assert during == {
        "time": during["time"],
        "level": "WARNING",
        "logger": "kiln.test",
        "message": "restarting gang 2",
        "restarts": 2,
        "kind": "TrainingJob",
        "namespace": "team-a",
        "name": "digits",
        "uid": "0f3e",
    }
    assert failed["name"] == "digits" and "RuntimeError: boom" in failed["exc_info"]


def test_kopf_object_lines_get_the_same_fields(restore_logging):
    buf = io.StringIO()
    logs.configure("json", stream=buf)
    ref = {"apiVersion": "kiln.dev/v1alpha1", "kind": "Model", "namespace": "ns", "name": "m", "uid": "u"}
    logging.getLogger("kopf.objects").warning("handler failed", extra={"k8s_ref": ref, "k8s_skip": False})
    (line,) = lines(buf)
    assert {k: line[k] for k in ("kind", "namespace", "name", "uid")} == {
        "kind": "Model",
        "namespace": "ns",
        "name": "m",
        "uid": "u",
    }
    assert "k8s_ref" not in line and "k8s_skip" not in line


def test_text_format(restore_logging):
    buf = io.StringIO()
    logs.configure("text", stream=buf)
    log = logging.getLogger("kiln.test")
    with logs.bind(logs.ObjectRef("Model", "ns", "digits")):
        log.info("registered version %d", 3)
    log.info("plain")
    first, second = buf.getvalue().splitlines()
    assert first.endswith(" INFO kiln.test: registered version 3 [Model ns/digits]")
    assert second.endswith(" INFO kiln.test: plain")
    with pytest.raises(ValueError):
        logs.configure("yaml")


async def _serve_and_get(paths: list[str]) -> None:
    """An aiohttp server as kopf runs its /healthz (AppRunner, default access log)."""

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    for path in ("/healthz", "/v2/health/ready", "/work"):
        app.router.add_get(path, ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s:
            for path in paths:
                async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                    assert r.status == 200
    finally:
        await runner.cleanup()


def test_health_probes_are_debug_lines(restore_logging):
    buf = io.StringIO()
    logs.configure("json", logging.INFO, stream=buf)
    asyncio.run(_serve_and_get(["/healthz", "/healthz?verbose", "/v2/health/ready", "/work"]))
    access = [line for line in lines(buf) if line["logger"] == "aiohttp.access"]
    assert len(access) == 1 and "GET /work " in access[0]["message"]  # the other requests still log

    buf = io.StringIO()
    logs.configure("json", logging.DEBUG, stream=buf)  # --verbose: the probes appear, at DEBUG
    asyncio.run(_serve_and_get(["/healthz", "/work"]))
    access = [line for line in lines(buf) if line["logger"] == "aiohttp.access"]
    assert [(a["level"], a["first_request_line"].split()[1]) for a in access] == [
        ("DEBUG", "/healthz"),
        ("INFO", "/work"),
    ]
