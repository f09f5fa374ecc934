"""Open Inference Protocol conformance of kiln-serve over real HTTP (server on a free port)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")  # the serve extra (torch, numpy, aiohttp, safetensors)

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from kiln import __version__

from .conftest import MODEL_NAME, MODEL_VERSION, DigitsArtifact, ThreadedServer

pytestmark = pytest.mark.torch

INFER = f"/v2/models/{MODEL_NAME}/infer"


def infer_body(rows: np.ndarray, **extra: Any) -> dict[str, Any]:
    body = {
        "inputs": [
            {"name": "input-0", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    body.update(extra)
    return body


def metric_samples(server: ThreadedServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(server.metrics_url, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model": MODEL_NAME, "version": MODEL_VERSION, **labels}.items())))
    return samples.get(key, 0.0)


# ----------------------------------------------------------------------------- health and metadata
def test_health_and_server_metadata(server: ThreadedServer) -> None:
    r = requests.get(server.url + "/v2/health/live", timeout=5)
    assert (r.status_code, r.json()) == (200, {"live": True})
    assert r.headers["Content-Type"].startswith("application/json")
    r = requests.get(server.url + "/v2/health/ready", timeout=5)
    assert (r.status_code, r.json()) == (200, {"ready": True})
    r = requests.get(server.url + "/v2", timeout=5)
    assert r.json() == {"name": "kiln-serve", "version": __version__, "extensions": ["binary_tensor_data"]}


@pytest.mark.parametrize(
    "path", [f"/v2/models/{MODEL_NAME}", f"/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}"]
)
def test_model_metadata(server: ThreadedServer, path: str) -> None:
    r = requests.get(server.url + path, timeout=5)
    assert r.status_code == 200
    assert r.json() == {
        "name": MODEL_NAME,
        "versions": [MODEL_VERSION],
        "platform": "pytorch_safetensors",
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "output-0", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "predicted_class", "datatype": "INT64", "shape": [-1]},
        ],
    }


@pytest.mark.parametrize(
    "path", [f"/v2/models/{MODEL_NAME}/ready", f"/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/ready"]
)
def test_model_ready(server: ThreadedServer, path: str) -> None:
    r = requests.get(server.url + path, timeout=5)
    assert (r.status_code, r.json()) == (200, {"name": MODEL_NAME, "ready": True})


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v2/models/mnist", 404, "unknown model 'mnist'"),
        ("GET", "/v2/models/mnist/ready", 404, "unknown model 'mnist'"),
        ("GET", f"/v2/models/{MODEL_NAME}/versions/9", 404, "unknown version '9'"),
        ("GET", f"/v2/models/{MODEL_NAME}/versions/9/ready", 404, "unknown version '9'"),
        ("POST", "/v2/models/mnist/infer", 404, "unknown model 'mnist'"),
        ("POST", f"/v2/models/{MODEL_NAME}/versions/2/infer", 404, "unknown version '2'"),
        ("GET", "/v1/models/digits", 404, "Not Found"),
        ("GET", INFER, 405, "Method Not Allowed"),
        ("DELETE", "/v2/health/ready", 405, "Method Not Allowed"),
    ],
)
def test_unknown_models_versions_and_routes(
    server: ThreadedServer, method: str, path: str, status: int, message: str
) -> None:
    r = requests.request(method, server.url + path, json=infer_body(np.zeros((1, 64))), timeout=5)
    assert r.status_code == status
    assert message in r.json()["error"]


# ----------------------------------------------------------------------------- inference
@pytest.mark.parametrize("path", [INFER, f"/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"])
def test_infer_json(
    server: ThreadedServer, digits_artifact: DigitsArtifact, loaded_model: Any, path: str
) -> None:
    rows = digits_artifact.x_test[:5]
    r = requests.post(server.url + path, json=infer_body(rows, id="req-1"), timeout=5)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model_name"] == MODEL_NAME and doc["model_version"] == MODEL_VERSION and doc["id"] == "req-1"
    logits, cls = doc["outputs"]
    assert {k: logits[k] for k in ("name", "datatype", "shape")} == {
        "name": "output-0",
        "datatype": "FP32",
        "shape": [5, 10],
    }
    assert {k: cls[k] for k in ("name", "datatype", "shape")} == {
        "name": "predicted_class",
        "datatype": "INT64",
        "shape": [5],
    }
    got = np.array(logits["data"], dtype=np.float32).reshape(5, 10)
    # Alone on the server, the request is one batch of exactly these rows: bit-identical results.
    np.testing.assert_array_equal(got, loaded_model.predict(rows))
    np.testing.assert_allclose(got, digits_artifact.logits_test[:5], rtol=1e-4, atol=1e-4)
    assert cls["data"] == digits_artifact.predictions[:5].tolist()


def test_infer_generates_an_id(server: ThreadedServer) -> None:
    r = requests.post(server.url + INFER, json=infer_body(np.zeros((1, 64))), timeout=5)
    assert isinstance(r.json()["id"], str) and r.json()["id"]


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "INT64", "UINT8"])
def test_infer_other_numeric_datatypes(
    server: ThreadedServer, digits_artifact: DigitsArtifact, datatype: str
) -> None:
    rows = digits_artifact.x_test[:3]  # pixel values are small integers: exact in every type
    body = {
        "inputs": [
            {"name": "input-0", "shape": [3, 64], "datatype": datatype, "data": rows.astype(int).tolist()}
        ]
    }
    r = requests.post(server.url + INFER, json=body, timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][1]["data"] == digits_artifact.predictions[:3].tolist()


def test_requested_outputs(server: ThreadedServer, digits_artifact: DigitsArtifact) -> None:
    rows = digits_artifact.x_test[:2]
    r = requests.post(
        server.url + INFER, json=infer_body(rows, outputs=[{"name": "predicted_class"}]), timeout=5
    )
    assert [o["name"] for o in r.json()["outputs"]] == ["predicted_class"]
    r = requests.post(server.url + INFER, json=infer_body(rows, outputs=[{"name": "output-0"}]), timeout=5)
    assert [(o["name"], o["shape"]) for o in r.json()["outputs"]] == [("output-0", [2, 10])]


def test_binary_tensor_extension_as_tritonclient_sends_it(
    server: ThreadedServer, digits_artifact: DigitsArtifact, loaded_model: Any
) -> None:
    """tritonclient.http's default: binary input, no outputs listed, binary_data_output=true."""
    rows = np.ascontiguousarray(digits_artifact.x_test[:4], dtype="<f4")
    header = json.dumps(
        {
            "id": "t1",
            "inputs": [
                {
                    "name": "input-0",
                    "shape": [4, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    r = requests.post(
        server.url + INFER,
        data=header + rows.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
        timeout=5,
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:n])
    assert doc["id"] == "t1"
    (lo, cl) = doc["outputs"]
    assert (
        lo["parameters"]["binary_data_size"] == 4 * 10 * 4 and cl["parameters"]["binary_data_size"] == 4 * 8
    )
    blob = r.content[n:]
    logits = np.frombuffer(blob[:160], dtype="<f4").reshape(4, 10)
    np.testing.assert_array_equal(logits, loaded_model.predict(rows))
    np.testing.assert_array_equal(np.frombuffer(blob[160:], dtype="<i8"), digits_artifact.predictions[:4])


def test_mixed_binary_and_json_outputs_as_kserve_client_sends_them(
    server: ThreadedServer, digits_artifact: DigitsArtifact
) -> None:
    """KServe's InferRequest.to_rest adds 'model_name'; MLServer's codecs add parameters.content_type."""
    rows = digits_artifact.x_test[:2]
    body = infer_body(
        rows,
        id="k1",
        model_name=MODEL_NAME,
        parameters={"content_type": "np"},
        outputs=[{"name": "output-0", "parameters": {"binary_data": True}}, {"name": "predicted_class"}],
    )
    body["inputs"][0]["parameters"] = {"content_type": "np"}
    r = requests.post(server.url + INFER, json=body, timeout=5)
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:n])
    assert doc["outputs"][1]["data"] == digits_artifact.predictions[:2].tolist()
    assert len(r.content) - n == doc["outputs"][0]["parameters"]["binary_data_size"] == 80


def test_held_out_accuracy_over_http_matches_in_process(
    server: ThreadedServer, digits_artifact: DigitsArtifact
) -> None:
    x, y = digits_artifact.x_test, digits_artifact.y_test

    async def predict_all() -> list[int]:
        import aiohttp

        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                async with session.post(server.url + INFER, json=infer_body(x[i : i + 1])) as resp:
                    assert resp.status == 200
                    doc = await resp.json()
                    return int(doc["outputs"][1]["data"][0])

            return list(await asyncio.gather(*(one(i) for i in range(len(x)))))

    predicted = np.array(asyncio.run(predict_all()))
    np.testing.assert_array_equal(predicted, digits_artifact.predictions)
    assert float((predicted == y).mean()) == digits_artifact.accuracy
    assert digits_artifact.accuracy > 0.9


# ----------------------------------------------------------------------------- bad input
def _raw(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def _tensor(**kw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    t.update(kw)
    return {"inputs": [t]}


BAD_REQUESTS: list[tuple[str, Any, dict[str, str], int, str]] = [
    (
        "wrong shape",
        _tensor(shape=[1, 32], data=[0.0] * 32),
        {},
        400,
        "wrong shape [1, 32]; expected [-1, 64]",
    ),
    ("transposed shape", _tensor(shape=[64, 1]), {}, 400, "expected [-1, 64]"),
    ("BYTES datatype", _tensor(datatype="BYTES", data=["x"] * 64), {}, 400, "datatype BYTES"),
    ("BOOL datatype", _tensor(datatype="BOOL", data=[True] * 64), {}, 400, "datatype BOOL"),
    ("unknown datatype", _tensor(datatype="FLOAT"), {}, 400, "unknown datatype 'FLOAT'"),
    ("size mismatch", _tensor(shape=[2, 64]), {}, 400, "has 64 values in 'data' but shape [2, 64] needs 128"),
    ("malformed JSON", b'{"inputs": [', {}, 400, "malformed JSON"),
    ("empty body", b"", {}, 400, "malformed JSON"),
    ("unknown input", _tensor(name="pixels"), {}, 400, "unknown input 'pixels'"),
    ("unknown output", {**_tensor(), "outputs": [{"name": "proba"}]}, {}, 400, "unknown output 'proba'"),
    ("text in data", _tensor(data=["a"] * 64), {}, 400, "only numbers"),
    ("bad binary header", _tensor(), {"Inference-Header-Content-Length": "x"}, 400, "non-negative integer"),
    (
        "too large",
        _tensor(data=[0.123456789] * 64, pad="x" * 300_000),
        {},
        413,
        "exceeds the limit of 262144",
    ),
]


@pytest.mark.parametrize(
    ("payload", "headers", "status", "message"),
    [b[1:] for b in BAD_REQUESTS],
    ids=[b[0] for b in BAD_REQUESTS],
)
def test_bad_requests_get_4xx_naming_the_problem(
    server: ThreadedServer, payload: Any, headers: dict[str, str], status: int, message: str
) -> None:
    r = requests.post(
        server.url + INFER,
        data=_raw(payload),
        headers={"Content-Type": "application/json", **headers},
        timeout=5,
    )
    assert r.status_code == status
    assert message in r.json()["error"]
    assert requests.get(server.url + "/v2/health/live", timeout=5).status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.binary(max_size=300)
    | st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["inputs", "name", "shape", "data"]), c)
        ),
        max_leaves=20,
    ).map(lambda d: json.dumps(d).encode()),
    header=st.none() | st.sampled_from(["0", "3", "-1", "x", "99999"]),
)
def test_fuzz_over_http_never_500(server: ThreadedServer, body: bytes, header: str | None) -> None:
    headers = {"Inference-Header-Content-Length": header} if header is not None else {}
    r = requests.post(server.url + INFER, data=body, headers=headers, timeout=5)
    assert r.status_code in (200, 400), r.text
    assert r.status_code == 200 or r.json()["error"]


def test_compressed_bodies(server: ThreadedServer, digits_artifact: DigitsArtifact) -> None:
    import gzip

    good = gzip.compress(json.dumps(infer_body(digits_artifact.x_test[:1])).encode())
    r = requests.post(server.url + INFER, data=good, headers={"Content-Encoding": "gzip"}, timeout=5)
    assert r.status_code == 200 and r.json()["outputs"][1]["data"] == digits_artifact.predictions[:1].tolist()
    r = requests.post(server.url + INFER, data=b"not gzip", headers={"Content-Encoding": "gzip"}, timeout=5)
    assert r.status_code == 400 and "could not read the request body" in r.json()["error"]
    bomb = gzip.compress(b" " * (4 << 20))  # 4 KiB on the wire, 4 MiB decoded: over the limit
    r = requests.post(server.url + INFER, data=bomb, headers={"Content-Encoding": "gzip"}, timeout=5)
    assert r.status_code == 413


def test_too_large_chunked_body_without_content_length(server: ThreadedServer) -> None:
    def chunks() -> Any:
        for _ in range(40):
            yield b" " * 10_000

    r = requests.post(server.url + INFER, data=chunks(), timeout=5)
    assert r.status_code == 413
    assert "exceeds the limit" in r.json()["error"]


# ------------------------------------------------------------------- metrics, batching, cache, faults
def test_metrics(make_server: Any, digits_artifact: DigitsArtifact) -> None:
    s = make_server()
    for _ in range(3):
        requests.post(s.url + INFER, json=infer_body(digits_artifact.x_test[:2]), timeout=5)
    requests.post(s.url + INFER, data=b"nope", timeout=5)
    m = metric_samples(s)
    assert sample(m, "kiln_inference_requests_total", protocol="rest", code="200") == 3
    assert sample(m, "kiln_inference_requests_total", protocol="rest", code="400") == 1
    assert sample(m, "kiln_inference_request_duration_seconds_count", protocol="rest") == 4
    assert sample(m, "kiln_inference_batch_size_count") == 3
    assert sample(m, "kiln_inference_batch_size_sum") == 6
    assert sample(m, "kiln_inference_inflight_requests") == 0
    assert sample(m, "kiln_inference_fault_injection_rate") == 0
    assert sample(m, "kiln_model_info", digest=digits_artifact.digest) == 1
    assert any(name == "process_cpu_seconds_total" for name, _ in m)


def test_concurrent_requests_are_batched(make_server: Any, digits_artifact: DigitsArtifact) -> None:
    s = make_server(max_batch_size=16, max_batch_delay_ms=20)
    x = digits_artifact.x_test
    n = 96

    async def burst() -> list[int]:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:

            async def one(i: int) -> int:
                async with session.post(s.url + INFER, json=infer_body(x[i : i + 1])) as resp:
                    assert resp.status == 200
                    return int((await resp.json())["outputs"][1]["data"][0])

            return list(await asyncio.gather(*(one(i) for i in range(n))))

    assert asyncio.run(burst()) == digits_artifact.predictions[:n].tolist()
    m = metric_samples(s)
    batches = sample(m, "kiln_inference_batch_size_count")
    assert sample(m, "kiln_inference_batch_size_sum") == n
    assert batches < n, "no two requests shared a forward pass"
    assert sample(m, "kiln_inference_batch_size_bucket", le="1.0") < batches  # some batch has > 1 row
    assert sample(m, "kiln_inference_batch_size_bucket", le="16.0") == batches  # none over the maximum


def test_cache_hit_skips_the_forward_pass(make_server: Any, digits_artifact: DigitsArtifact) -> None:
    s = make_server(cache_size=8)
    rows = digits_artifact.x_test[:3]
    first = requests.post(s.url + INFER, json=infer_body(rows, id="a"), timeout=5).json()
    binary_rows = np.ascontiguousarray(rows, dtype="<f4")
    header = json.dumps(
        {
            "id": "b",
            "inputs": [
                {
                    "name": "input-0",
                    "shape": [3, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": binary_rows.nbytes},
                }
            ],
        }
    ).encode()
    second = requests.post(
        s.url + INFER,
        data=header + binary_rows.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=5,
    ).json()
    assert first["outputs"] == second["outputs"] and second["id"] == "b"
    m = metric_samples(s)
    assert sample(m, "kiln_inference_cache_requests_total", result="miss") == 1
    assert sample(m, "kiln_inference_cache_requests_total", result="hit") == 1
    assert sample(m, "kiln_inference_batch_size_count") == 1  # the hit ran no forward pass


def test_fault_injection_is_explicit(make_server: Any) -> None:
    s = make_server(fail_rate=1.0)
    r = requests.post(s.url + INFER, json=infer_body(np.zeros((1, 64))), timeout=5)
    assert r.status_code == 500
    assert "injected failure" in r.json()["error"]
    bad = requests.post(s.url + INFER, data=b"{", timeout=5)
    assert bad.status_code == 400  # invalid requests are still refused as such
    m = metric_samples(s)
    assert sample(m, "kiln_inference_requests_total", protocol="rest", code="500") == 1
    assert sample(m, "kiln_inference_injected_failures_total") == 1
    assert sample(m, "kiln_inference_fault_injection_rate") == 1.0
    assert requests.get(s.url + "/v2/health/ready", timeout=5).status_code == 200


def test_readiness_turns_false_when_shutdown_begins(make_server: Any) -> None:
    s = make_server(shutdown_delay_seconds=30)
    s.loop.call_soon_threadsafe(s.server.begin_shutdown)
    r = requests.get(s.url + "/v2/health/ready", timeout=5)
    assert (r.status_code, r.json()) == (503, {"ready": False})
    assert r.headers.get("Connection", "").lower() == "close"
    assert requests.get(s.url + f"/v2/models/{MODEL_NAME}/ready", timeout=5).status_code == 503
    # Still serving while endpoints catch up:
    assert requests.post(s.url + INFER, json=infer_body(np.zeros((1, 64))), timeout=5).status_code == 200
    assert s.run(s.server.shutdown(delay=0.0)) is True
    with pytest.raises(requests.ConnectionError):
        requests.get(s.url + "/v2/health/live", timeout=5)


def test_health_probes_write_no_log_line_at_info(
    server: ThreadedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The kubelet probes every few seconds: kiln-serve keeps no access log of them at INFO."""
    import logging

    with caplog.at_level(logging.INFO):
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert requests.get(server.url + path, timeout=5).status_code == 200
    assert [r for r in caplog.records if "/v2/health" in r.getMessage()] == []
