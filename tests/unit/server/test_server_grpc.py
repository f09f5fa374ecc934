"""The Open Inference Protocol over gRPC, with the real client packages, next to REST in one server.

The server runs in this process (``ThreadedServer``: REST and gRPC on free ports); it is queried
with ``tritonclient.grpc`` and ``tritonclient.http`` (both import their own ``inference.*`` protos,
which kiln's generated modules, in a private descriptor pool, do not collide with), with kiln's own
stub for the typed ``contents`` representation, and with KServe's ``InferenceGRPCClient`` from a
separate virtualenv when one exists (KServe's dependencies are not in the project's venv).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("torch")  # the serve extra (torch, numpy, aiohttp, grpcio)
pytest.importorskip("tritonclient.grpc")  # the dev extra: Triton's clients
pytest.importorskip("tritonclient.http")

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln import __version__
from kiln.server.oip import grpc_predict_v2_pb2 as pb
from kiln.server.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.peers import peer_python

from .conftest import MODEL_NAME, MODEL_VERSION, DigitsArtifact, ThreadedServer

pytestmark = pytest.mark.torch


@pytest.fixture
def stub(server: ThreadedServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def triton_grpc_infer(target: str, rows: np.ndarray, **kw: Any) -> Any:
    client = grpcclient.InferenceServerClient(target)
    try:
        inp = grpcclient.InferInput("input-0", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        return client.infer(MODEL_NAME, [inp], **kw)
    finally:
        client.close()


def typed_request(rows: np.ndarray, **kw: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL_NAME, **kw)
    t = req.inputs.add(name="input-0", datatype="FP32", shape=list(rows.shape))
    t.contents.fp32_contents.extend(rows.ravel().tolist())
    return req


def grpc_samples(server: ThreadedServer, name: str, **labels: str) -> float:
    base = {"model": MODEL_NAME, "version": MODEL_VERSION}
    return server.server.metrics.registry.get_sample_value(name, {**base, **labels}) or 0.0


# ----------------------------------------------------------------------------- health and metadata
def test_health_and_metadata_with_tritonclient(server: ThreadedServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL_NAME) and client.is_model_ready(MODEL_NAME, MODEL_VERSION)
        meta = client.get_server_metadata(as_json=True)
        assert meta == {"name": "kiln-serve", "version": __version__, "extensions": ["binary_tensor_data"]}
        model = client.get_model_metadata(MODEL_NAME, as_json=True)
    finally:
        client.close()
    # The gRPC answer is the REST one (int64 shapes come back as JSON strings from protobuf's JSON).
    assert model == {
        "name": MODEL_NAME,
        "versions": [MODEL_VERSION],
        "platform": "pytorch_safetensors",
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": ["-1", "64"]}],
        "outputs": [
            {"name": "output-0", "datatype": "FP32", "shape": ["-1", "10"]},
            {"name": "predicted_class", "datatype": "INT64", "shape": ["-1"]},
        ],
    }
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        rest = http.get_model_metadata(MODEL_NAME)
    finally:
        http.close()
    assert [t["shape"] for t in rest["inputs"]] == [[int(d) for d in t["shape"]] for t in model["inputs"]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.is_model_ready("mnist"), "unknown model 'mnist'"),
        (lambda c: c.get_model_metadata("mnist"), "unknown model 'mnist'"),
        (lambda c: c.get_model_metadata(MODEL_NAME, "9"), "unknown version '9'"),
    ],
)
def test_unknown_model_is_not_found(server: ThreadedServer, call: Any, message: str) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_target)
    try:
        with pytest.raises(InferenceServerException) as e:
            call(client)
    finally:
        client.close()
    assert e.value.status() == "StatusCode.NOT_FOUND" and message in e.value.message()


# ----------------------------------------------------------------------------- inference
def test_triton_grpc_and_http_clients_get_the_same_answers(
    server: ThreadedServer, digits_artifact: DigitsArtifact
) -> None:
    rows = digits_artifact.x_test[:16]
    g = triton_grpc_infer(server.grpc_target, rows, request_id="g-1")
    http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput("input-0", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows)
        h = http.infer(MODEL_NAME, [inp])
    finally:
        http.close()
    resp = g.get_response()
    assert (resp.model_name, resp.model_version, resp.id) == (MODEL_NAME, MODEL_VERSION, "g-1")
    assert len(resp.raw_output_contents) == 2  # tritonclient's raw representation, both ways
    for name, dtype in (("output-0", np.float32), ("predicted_class", np.int64)):
        assert g.as_numpy(name).dtype == dtype
        np.testing.assert_array_equal(g.as_numpy(name), h.as_numpy(name))
    np.testing.assert_allclose(g.as_numpy("output-0"), digits_artifact.logits_test[:16], rtol=1e-5, atol=1e-5)
    assert g.as_numpy("predicted_class").tolist() == digits_artifact.predictions[:16].tolist()
    assert grpc_samples(server, "kiln_inference_requests_total", protocol="grpc", code="200") >= 1


def test_requested_output_only(server: ThreadedServer, digits_artifact: DigitsArtifact) -> None:
    rows = digits_artifact.x_test[:3]
    r = triton_grpc_infer(
        server.grpc_target, rows, outputs=[grpcclient.InferRequestedOutput("predicted_class")]
    )
    assert [o.name for o in r.get_response().outputs] == ["predicted_class"]
    assert r.as_numpy("predicted_class").tolist() == digits_artifact.predictions[:3].tolist()


def test_typed_contents_in_typed_contents_out(
    stub: pb_grpc.GRPCInferenceServiceStub, digits_artifact: DigitsArtifact, server: ThreadedServer
) -> None:
    rows = digits_artifact.x_test[:4]
    typed = stub.ModelInfer(typed_request(rows, id="t"), timeout=10)
    assert typed.id == "t" and not typed.raw_output_contents
    logits = np.array(typed.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(4, 10)
    assert list(typed.outputs[0].shape) == [4, 10] and typed.outputs[0].datatype == "FP32"
    assert list(typed.outputs[1].contents.int64_contents) == digits_artifact.predictions[:4].tolist()
    raw = triton_grpc_infer(server.grpc_target, rows)
    np.testing.assert_array_equal(logits, raw.as_numpy("output-0"))


def test_typed_integer_input(stub: pb_grpc.GRPCInferenceServiceStub, digits_artifact: DigitsArtifact) -> None:
    rows = digits_artifact.x_test[:2]  # the digits pixels are integers 0..16
    req = pb.ModelInferRequest(model_name=MODEL_NAME, model_version=MODEL_VERSION)
    req.inputs.add(name="input-0", datatype="INT64", shape=[2, 64]).contents.int64_contents.extend(
        rows.astype(np.int64).ravel().tolist()
    )
    out = stub.ModelInfer(req, timeout=10)
    assert list(out.outputs[1].contents.int64_contents) == digits_artifact.predictions[:2].tolist()
    assert out.id  # none given: one is generated, as over REST


def test_raw_contents_of_another_datatype(
    stub: pb_grpc.GRPCInferenceServiceStub, digits_artifact: DigitsArtifact
) -> None:
    rows = digits_artifact.x_test[:2]
    req = pb.ModelInferRequest(model_name=MODEL_NAME, raw_input_contents=[rows.astype("<f2").tobytes()])
    req.inputs.add(name="input-0", datatype="FP16", shape=[2, 64])
    out = stub.ModelInfer(req, timeout=10)
    assert (
        np.frombuffer(out.raw_output_contents[1], "<i8").tolist() == digits_artifact.predictions[:2].tolist()
    )


def _bad(rows: np.ndarray, **kw: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL_NAME, raw_input_contents=[rows.tobytes()], **kw)
    return req


@pytest.mark.parametrize(
    ("build", "code", "message"),
    [
        (
            lambda r: _with_input(_bad(r), "pixels", "FP32", [1, 64]),
            "INVALID_ARGUMENT",
            "unknown input 'pixels'",
        ),
        (
            lambda r: _with_input(_bad(r), "input-0", "FP32", [2, 32]),
            "INVALID_ARGUMENT",
            "input 'input-0' has wrong shape",
        ),
        (
            lambda r: _with_input(_bad(r), "input-0", "BYTES", [1, 64]),
            "INVALID_ARGUMENT",
            "input 'input-0' has datatype BYTES",
        ),
        (
            lambda r: _with_input(_bad(r), "input-0", "FP64", [1, 64]),
            "INVALID_ARGUMENT",
            "raw_input_contents[0] has 256 bytes",
        ),
        (
            lambda r: _with_input(pb.ModelInferRequest(model_name=MODEL_NAME), "input-0", "FP32", [1, 64]),
            "INVALID_ARGUMENT",
            "input 'input-0' has 0 values in contents.fp32_contents",
        ),
        (
            lambda r: _with_input(_bad(r, outputs=[{"name": "probs"}]), "input-0", "FP32", [1, 64]),
            "INVALID_ARGUMENT",
            "unknown output 'probs'",
        ),
        (
            lambda r: pb.ModelInferRequest(model_name=MODEL_NAME),
            "INVALID_ARGUMENT",
            "the request has no inputs; the model's inputs are 'input-0'",
        ),
        (
            lambda r: _with_input(
                _with_input(_bad(r), "input-0", "FP32", [1, 64]), "input-0", "FP32", [1, 64]
            ),
            "INVALID_ARGUMENT",
            "input 'input-0' is given more than once",
        ),
        (
            lambda r: _typed_int8(r, 300),
            "INVALID_ARGUMENT",
            "input 'input-0' has values outside the range of INT8",
        ),
        (
            lambda r: _with_input(pb.ModelInferRequest(model_name="mnist"), "input-0", "FP32", [1, 64]),
            "NOT_FOUND",
            "unknown model 'mnist'",
        ),
    ],
)
def test_bad_requests_map_to_status_codes(
    stub: pb_grpc.GRPCInferenceServiceStub, server: ThreadedServer, build: Any, code: str, message: str
) -> None:
    before = grpc_samples(server, "kiln_inference_requests_total", protocol="grpc", code="400")
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(build(np.zeros((1, 64), np.float32)), timeout=10)
    assert e.value.code() == getattr(grpc.StatusCode, code)
    assert message in e.value.details()
    if code == "INVALID_ARGUMENT":  # counted as the REST equivalent, labelled grpc
        assert (
            grpc_samples(server, "kiln_inference_requests_total", protocol="grpc", code="400") == before + 1
        )


def _with_input(
    req: pb.ModelInferRequest, name: str, datatype: str, shape: list[int]
) -> pb.ModelInferRequest:
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    return req


def _typed_int8(rows: np.ndarray, value: int) -> pb.ModelInferRequest:
    """INT8 typed contents (sent in the wider int_contents) all equal to ``value``."""
    req = _with_input(pb.ModelInferRequest(model_name=MODEL_NAME), "input-0", "INT8", list(rows.shape))
    req.inputs[0].contents.int_contents.extend([value] * rows.size)
    return req


def test_bad_input_via_tritonclient_names_the_input(server: ThreadedServer) -> None:
    with pytest.raises(InferenceServerException) as e:
        triton_grpc_infer(server.grpc_target, np.zeros((1, 63), np.float32))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'input-0' has wrong shape [1, 63]; expected [-1, 64]" in e.value.message()


def test_non_finite_input_is_invalid(server: ThreadedServer) -> None:
    rows = np.zeros((1, 64), np.float32)
    rows[0, 3] = np.nan
    with pytest.raises(InferenceServerException) as e:
        triton_grpc_infer(server.grpc_target, rows)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "not finite" in e.value.message()


def test_injected_failure_is_internal(make_server: Any) -> None:
    s = make_server(fail_rate=1.0)
    with pytest.raises(InferenceServerException) as e:
        triton_grpc_infer(s.grpc_target, np.zeros((1, 64), np.float32))
    assert e.value.status() == "StatusCode.INTERNAL" and "injected failure" in e.value.message()
    assert grpc_samples(s, "kiln_inference_requests_total", protocol="grpc", code="500") == 1


def test_rest_and_grpc_share_batcher_and_cache(make_server: Any, digits_artifact: DigitsArtifact) -> None:
    s = make_server(cache_size=8)
    rows = digits_artifact.x_test[:1]
    first = triton_grpc_infer(s.grpc_target, rows).as_numpy("output-0")
    http = httpclient.InferenceServerClient(s.url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput("input-0", [1, 64], "FP32")
        inp.set_data_from_numpy(rows)
        second = http.infer(MODEL_NAME, [inp]).as_numpy("output-0")
    finally:
        http.close()
    np.testing.assert_array_equal(first, second)
    assert grpc_samples(s, "kiln_inference_cache_requests_total", result="hit") == 1  # REST hit gRPC's entry
    assert grpc_samples(s, "kiln_inference_batch_size_count") == 1
    assert grpc_samples(s, "kiln_inference_request_duration_seconds_count", protocol="grpc") == 1
    assert grpc_samples(s, "kiln_inference_request_duration_seconds_count", protocol="rest") == 1


# ----------------------------------------------------------------------------- shutdown
class GatedModel:
    """The loaded model, whose forward pass waits for ``gate`` (to hold a request in flight)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(30), "gate never opened"
        return self._model.predict(rows)


def test_not_ready_while_draining_yet_serving_then_unavailable(
    loaded_model: Any, digits_artifact: DigitsArtifact
) -> None:
    gated = GatedModel(loaded_model)
    s = ThreadedServer(gated, drain_timeout_seconds=20)
    channel = grpc.insecure_channel(s.grpc_target)
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        rows = digits_artifact.x_test[:2]
        held = stub.ModelInfer.future(typed_request(rows, id="held"), timeout=30)
        assert gated.entered.wait(10)
        s.loop.call_soon_threadsafe(s.server.begin_shutdown)
        deadline = time.monotonic() + 5
        while stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
            assert time.monotonic() < deadline, "readiness did not turn false"
            time.sleep(0.01)
        assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=5).ready
        shutdown = asyncio.run_coroutine_threadsafe(s.server.shutdown(delay=0), s.loop)
        deadline = time.monotonic() + 10
        while True:  # the server stops taking calls (GOAWAY) while the held one is still in flight
            try:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
            except grpc.RpcError as e:
                # A call racing the GOAWAY may be CANCELLED by grpc core; then UNAVAILABLE for good.
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), e
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    break
            assert time.monotonic() < deadline, "the gRPC server kept taking calls"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(typed_request(rows), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not held.done() and not shutdown.done()
        gated.gate.set()
        out = held.result(timeout=10)
        assert out.id == "held"
        assert list(out.outputs[1].contents.int64_contents) == digits_artifact.predictions[:2].tolist()
        assert shutdown.result(timeout=20) is True  # drained: the held call finished
    finally:
        gated.gate.set()
        channel.close()
        s.close()


# ----------------------------------------------------------------------------- KServe's client
KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(target, rows):
    out = {}
    async with InferenceGRPCClient(url=target, timeout=20) as client:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_model_ready("digits")
        for binary in (True, False):  # raw_input_contents, then typed contents
            inp = InferInput(name="input-0", shape=list(rows.shape), datatype="FP32")
            inp.set_data_from_numpy(rows, binary_data=binary)
            res = await client.infer(InferRequest(model_name="digits", infer_inputs=[inp], request_id="k"))
            out[str(binary)] = {o.name: o.as_numpy().tolist() for o in res.outputs}
            out["id"] = res.id
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], np.array(json.loads(sys.argv[2]), dtype=np.float32)))
"""


def test_kserve_grpc_client(server: ThreadedServer, digits_artifact: DigitsArtifact) -> None:
    kserve_python = peer_python("kserve")
    rows = digits_artifact.x_test[:3]
    p = subprocess.run(
        [str(kserve_python), "-c", KSERVE_CLIENT, server.grpc_target, json.dumps(rows.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["live"] is True and out["ready"] is True and out["id"] == "k"
    for binary in ("True", "False"):
        assert out[binary]["predicted_class"] == digits_artifact.predictions[:3].tolist()
        np.testing.assert_allclose(
            np.array(out[binary]["output-0"], np.float32),
            digits_artifact.logits_test[:3],
            rtol=1e-5,
            atol=1e-5,
        )
