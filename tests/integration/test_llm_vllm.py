"""The LLM runtime for real: vLLM's OpenAI-compatible server on CPU, started exactly as Kiln's
builder renders the InferenceService's pod (issue 17).

No cluster: the pod's two containers run as local processes, in order, with the command, args
and environment of the Deployment :func:`kiln.resources.inferenceservice.deployment` builds for a
``file://`` version:

1. the storage-initializer, ``kiln-serve --fetch-only``: verifies every file of the
   ``hf-transformers`` artifact against its digest (the same fetch path as kiln-serve's own);
2. the engine, ``python3 -m vllm.entrypoints.openai.api_server ...`` with the vLLM peer venv's
   python (``hack/peer-venv vllm``, ``KILN_VLLM_PYTHON``); only ``--host``/``--port`` change, as
   a pod's own network namespace is not at hand here.

The model is a tiny Llama made by ``hack/tiny-llama`` (random weights, a BPE tokenizer trained
locally: nothing comes from a hub). The client is the ``openai`` package, as users have it.
Skipped when the venv is absent, except under CI (or with ``KILN_VLLM_PYTHON`` set), where a
missing venv fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.api.inferenceservice import InferenceServiceSpec
from kiln.artifact import path_to_uri, verify_artifact
from kiln.resources import inferenceservice as build
from tests.peers import peer_python

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama"
MAX_MODEL_LEN = 256
#: vLLM on 2 shared CPU cores: ~45 s alone, minutes when the machine is busy.
START_TIMEOUT = 600.0
ISVC = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "chat", "namespace": "llm", "uid": "u-1"},
}

pytestmark = pytest.mark.timeout(1200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spec() -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate(
        {
            "modelRef": {"name": MODEL, "stage": "Production"},
            "runtime": {
                "engine": "vllm",
                "image": "kiln/llm:dev",
                "llm": {"maxModelLen": MAX_MODEL_LEN, "dtype": "float32"},
                # vLLM's CPU backend: KV cache size in GiB (its default, 4, is more than needed)
                "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
            },
        }
    )


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


@dataclass
class Server:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path
    pod: dict[str, Any]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    python = peer_python("vllm")
    out = tmp_path_factory.mktemp("artifacts") / MODEL / "v1"
    done = subprocess.run(
        [str(python), str(ROOT / "hack" / "tiny-llama"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    digest = done.stdout.strip().splitlines()[-1]
    assert verify_artifact(out, digest).format == "hf-transformers"
    return out, digest


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"vLLM not healthy after {START_TIMEOUT} s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def server(tiny_llama: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    python = peer_python("vllm")
    directory, digest = tiny_llama
    dep = build.deployment(ISVC, spec(), build.STABLE, 1, path_to_uri(directory), digest, 1)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (engine,) = pod["containers"]
    tmp = tmp_path_factory.mktemp("pod-tmp")
    base_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT / "operator")}

    # 1. the storage-initializer: kiln-serve --fetch-only verifies the directory in place
    assert init["command"] == ["kiln-serve"]
    fetched = subprocess.run(
        [sys.executable, "-m", "kiln.server", *init["args"]],
        env=base_env | env_of(init) | {"TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stderr[-4000:]

    # 2. the engine, with the rendered command, args and environment
    assert engine["command"][0] == "python3"
    args = list(engine["args"])
    args[args.index("--host") + 1] = "127.0.0.1"
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    env = base_env | env_of(engine) | {"HOME": str(tmp), "XDG_CACHE_HOME": str(tmp / ".cache")}
    env |= {"VLLM_CACHE_ROOT": str(tmp / ".cache" / "vllm"), "HF_HOME": str(tmp / ".cache" / "hf")}
    log = tmp / "vllm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(python), *engine["command"][1:], *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        yield Server(base, proc, log, pod)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def openai_client(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server: Server, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        server.base + path, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_served_model_name(server: Server, openai_client: Any) -> None:
    models = openai_client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra.get("max_model_len") == MAX_MODEL_LEN


def test_chat_completion_streams(server: Server, openai_client: Any) -> None:
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello, how are you today?"}],
        max_tokens=16,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert chunks >= 3 and pieces, "tokens arrive as separate server-sent events"
    assert finish in ("stop", "length")
    assert usage is not None and 1 <= usage.completion_tokens <= 16


def test_completions_too(server: Server, openai_client: Any) -> None:
    out = openai_client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=4)
    assert out.choices[0].text is not None and out.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"messages": [{"role": "user", "content": "fox " * 400}]}, ("context", "length", "token")),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, ("temperature",)),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, ("top_p",)),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_MODEL_LEN * 4}, ("token",)),
    ],
)
def test_bad_requests_are_4xx_with_the_engine_message(
    server: Server, openai_client: Any, kwargs: dict[str, Any], words: tuple[str, ...]
) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=MODEL, stream=True, **kwargs)
    assert e.value.status_code == 400
    message = str(e.value).lower()
    assert any(w in message for w in words), message


def test_malformed_json_and_unknown_model_are_4xx(server: Server) -> None:
    status, body = post(server, "/v1/chat/completions", b'{"model": "tiny-llama", "messages": [')
    assert 400 <= status < 500, body
    status, body = post(
        server,
        "/v1/chat/completions",
        json.dumps({"model": "another", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    )
    assert status == 404 and "another" in json.dumps(body)


def test_metrics_carry_time_to_first_token(server: Server, openai_client: Any) -> None:
    openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    ).close()
    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ttft = families["vllm:time_to_first_token_seconds"]
    count = sum(s.value for s in ttft.samples if s.name.endswith("_count"))
    assert count >= 1 and all(s.labels.get("model_name") == MODEL for s in ttft.samples)
    assert "vllm:inter_token_latency_seconds" in families
    # the error ratio template's series: 4xx answers are counted, under the OpenAI handlers
    statuses = {
        (s.labels.get("handler"), s.labels.get("status"))
        for s in families["http_requests"].samples
        if s.name == "http_requests_total"
    }
    assert ("/v1/chat/completions", "2xx") in statuses
    assert ("/v1/chat/completions", "4xx") in statuses
    assert not any(status == "5xx" for _, status in statuses), statuses


def test_sigterm_drains_an_open_stream(server: Server, openai_client: Any) -> None:
    """What a pod gets when a canary step scales it away (after its preStop sleep): SIGTERM to
    the engine while a stream is open. With the rendered ``--shutdown-timeout`` the stream ends
    whole; the engine then exits. Runs last: it stops the module's server."""
    max_tokens = MAX_MODEL_LEN - 32
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    killed, after, usage, finish = False, 0, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            if choice.delta.content and not killed:
                os.kill(server.proc.pid, signal.SIGTERM)  # the kubelet signals the container's PID 1
                killed = True
            elif killed:
                after += 1
    assert killed and after > 0, "the stream was still open when SIGTERM arrived"
    assert finish == "length" and usage is not None and usage.completion_tokens == max_tokens
    assert server.proc.wait(timeout=120) is not None
