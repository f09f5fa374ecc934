"""The LLM runtime end to end on the real node: `make demo-llm` (hack/demo.py --only llm).

The image kiln-llm (vLLM for CPU) built from images/llm/Dockerfile and imported; two tiny Llama
versions made locally and uploaded to S3; Model `tiny-llama` imports version 1 (format
hf-transformers); InferenceService `chat` (runtime.engine vllm) serves it; a chat completion is
streamed through the Service with the `openai` client; version 2 is promoted and rolled out as a
canary guarded by the engines' time to first token, under streaming load, and promoted.

In CI (.ci/run makes the vLLM peer venv; a missing one fails there, see tests/peers.py). It took
1,146 s in a full run on 2 cores: the 7 GB image built and imported (567 s), an engine start-up
(91 s), the rollout of v2: the canary's engine, its analysis, the stable's new engine (428 s).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Cluster, run_demo
from tests.peers import peer_python

DEMO_TIMEOUT_S = 2400  # the 7 GB image built cold, then three engine start-ups on 2 shared cores


@pytest.fixture(scope="module")
def demo(real_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_demo(
        tmp_path_factory.mktemp("demo-llm") / "demo.json",
        "--only",
        "llm",
        timeout=DEMO_TIMEOUT_S,
        env={"KILN_VLLM_PYTHON": str(peer_python("vllm"))},  # the demo's hack/tiny-llama runs in it
    )


def test_every_llm_step_succeeded(demo: dict) -> None:
    failed = [s for s in demo["steps"] if not s["ok"]]
    assert not failed, failed
    assert demo["ok"] and demo["returncode"] == 0
    names = " ".join(s["name"] for s in demo["steps"])
    for n in ("12.", "13.", "14."):
        assert n in names


def test_streams_through_the_service_and_the_pod(demo: dict) -> None:
    f = demo["figures"]
    for where in ("service", "pod"):
        p50, p95 = (
            float(v) for v in f[f"llm: first event via the {where} p50/p95 ms (20 streams)"].split(" / ")
        )
        assert 0 < p50 <= p95


def test_canary_lost_no_stream_and_both_versions_answered(demo: dict) -> None:
    f = demo["figures"]
    streams, failed = (
        int(v) for v in f["llm v2: streams during the rollout / failed (target 0)"].split(" / ")
    )
    assert streams > 10 and failed == 0
    ok, bad, _ = (int(v) for v in f["llm v2: analysis measurements ok/failed/inconclusive"].split("/"))
    assert ok >= 1 and bad == 0
    served = f["llm: requests per version (Prometheus)"]
    assert served.get("1", 0) > 0 and served.get("2", 0) > 0
