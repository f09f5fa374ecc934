"""The LLM part of hack/demo.py (``--only llm``, steps 12-14): versions made locally, and the
clients that stream chat completions through the Service with the ``openai`` package.

- :func:`make_version`: a tiny Llama in Hugging Face format (``hack/tiny-llama``, random weights
  from a seed, nothing downloaded), with Kiln's ``metadata.json``; returns its digest.
- :func:`stream_chat`: one streamed chat completion, timed: first chunk (the first server-sent
  event: what a streaming client waits for), first content token, end.
- :class:`StreamLoad`: closed-loop streaming clients, each stream on a new connection so that
  kube-proxy spreads them over the stable and canary pods (it balances connections).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: The Model and InferenceService names of the LLM steps.
MODEL = "tiny-llama"
ISVC = "chat"
PROMPT = "Hello, how are you today?"


def vllm_python() -> str:
    """The python of the vLLM peer venv (``KILN_VLLM_PYTHON``, else ``hack/peer-venv vllm``, which
    makes it from PyPI on first use): it has torch, transformers and tokenizers for
    hack/tiny-llama. Raises subprocess.CalledProcessError when the venv cannot be made."""
    given = os.environ.get("KILN_VLLM_PYTHON")
    if given:
        return given
    out = subprocess.run(
        [str(REPO / "hack" / "peer-venv"), "vllm"], check=True, capture_output=True, text=True
    ).stdout
    return out.strip().splitlines()[-1]


def make_version(python: str, out: Path, seed: int) -> str:
    """Write a tiny Llama (2 layers, hidden 128, vocabulary 512, float32) to ``out`` with weights
    from ``seed``; returns its digest (``sha256:...``, of model.safetensors).

    Raises:
        RuntimeError: hack/tiny-llama failed (its stderr in the message).
    """
    proc = subprocess.run(
        [python, str(REPO / "hack" / "tiny-llama"), str(out), "--seed", str(seed), "--name", MODEL],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hack/tiny-llama {out} failed: {proc.stderr.strip()[-1500:]}")
    return proc.stdout.strip().splitlines()[-1]


@dataclass
class Stream:
    """One streamed chat completion. Times in seconds from the request; ``t`` is monotonic."""

    t: float
    ok: bool
    first_chunk: float | None = None  # the first server-sent event (the role delta)
    ttft: float | None = None  # the first chunk that carries text
    seconds: float = 0.0
    text: str = ""
    chunks: int = 0
    error: str = ""


def stream_chat(base_url: str, model: str = MODEL, max_tokens: int = 16, timeout: float = 60.0) -> Stream:
    """Stream one chat completion from ``base_url`` (``http://host:port/v1``) with a new
    ``openai.OpenAI`` client (a new connection), ``temperature`` 0. Never raises: a failure is a
    Stream with ``ok=False`` and the error."""
    import openai

    t = time.monotonic()
    s = Stream(t, False)
    try:
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout) as client:
            events = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            )
            for event in events:
                now = time.monotonic() - t
                if s.first_chunk is None:
                    s.first_chunk = now
                delta = event.choices[0].delta.content if event.choices else None
                if delta:
                    if s.ttft is None:
                        s.ttft = now
                    s.text += delta
                    s.chunks += 1
    except Exception as e:  # openai.APIError, httpx's transport errors: all count as failed
        s.error = f"{type(e).__name__}: {e}"[:300]
        s.seconds = time.monotonic() - t
        return s
    s.seconds = time.monotonic() - t
    s.ok = s.chunks > 0
    if not s.ok:
        s.error = "the stream ended without any text"
    return s


@dataclass
class StreamLoad:
    """``workers`` threads, each streaming one chat completion after another from ``base_url``."""

    base_url: str
    workers: int = 2
    max_tokens: int = 16
    streams: list[Stream] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _worker(self) -> None:
        while not self._stop.is_set():
            s = stream_chat(self.base_url, max_tokens=self.max_tokens)
            with self._lock:
                self.streams.append(s)
            if not s.ok:  # e.g. no endpoint for a moment: do not spin
                self._stop.wait(0.5)

    def start(self) -> StreamLoad:
        for i in range(self.workers):
            th = threading.Thread(target=self._worker, daemon=True, name=f"streams-{i}")
            th.start()
            self._threads.append(th)
        return self

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=90)

    def window(self, t0: float, t1: float | None = None) -> list[Stream]:
        with self._lock:
            return [s for s in self.streams if s.t >= t0 and (t1 is None or s.t < t1)]

    def summary(self, t0: float) -> str:
        w = self.window(t0)
        failed = sum(not s.ok for s in w)
        return f"{len(w)} streams since promotion, {failed} failed"
