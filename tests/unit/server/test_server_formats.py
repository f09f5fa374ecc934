"""Bring your own model: kiln.sdk exports, kiln-serve loads and serves torch-export and ONNX.

A small CNN on 1x8x8 "digits" (random weights: what is checked is that serving computes what
the module computes in-process), exported by ``kiln.sdk.save_model`` in both formats, loaded
by the server's own loader and served over real HTTP and gRPC (Triton's clients: both transports
give the same answers, the forward pass's). CPU, one thread, a few seconds per export.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import numpy as np
import torch
from torch import nn

from kiln.artifact import METADATA_FILE, ArtifactError, UnknownFormat, parse_termination_message, sha256_file

from .conftest import ThreadedServer

pytestmark = pytest.mark.torch

FORMATS = ["torch-export", "onnx"]


class CNN(nn.Module):
    """Conv on 1x8x8 images -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(image)).flatten(1))


class TwoInputs(nn.Module):
    """Two inputs (features FP32, a per-row INT64 offset) -> two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x) + offset.to(torch.float32).unsqueeze(1)
        return y, y.sum(dim=1)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return CNN().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, cnn: nn.Module) -> dict[str, Path]:
    """The CNN saved by the SDK in each format."""
    from kiln import sdk

    root = tmp_path_factory.mktemp("byom")
    example = torch.randn(1, 1, 8, 8)  # one row: the SDK keeps the batch dynamic anyway
    return {
        fmt: sdk.save_model(
            cnn, (example,), root / fmt, format=fmt, input_names=["image"], output_names=["logits"]
        )
        for fmt in FORMATS
    }


def load(path: Path, **kw: Any) -> Any:
    from kiln.server.model import load_model

    digest = json.loads((path / METADATA_FILE).read_text())["weightsDigest"]
    return load_model(path, kw.pop("digest", digest), name="cnn", version="1", threads=1)


def triton(transport: str) -> Any:
    """``tritonclient.grpc`` or ``tritonclient.http`` (the dev extra), or skip."""
    return pytest.importorskip(f"tritonclient.{transport}")


def infer_both(
    server: ThreadedServer, inputs: dict[str, np.ndarray], **kw: Any
) -> list[dict[str, np.ndarray]]:
    """The outputs of one request sent with ``tritonclient.grpc`` and with ``tritonclient.http``.

    Each input goes in the datatype of its numpy dtype (raw over gRPC, binary over REST).
    """
    from tritonclient.utils import np_to_triton_dtype

    answers = []
    for transport, url in (("grpc", server.grpc_target), ("http", server.url.removeprefix("http://"))):
        client_module = triton(transport)
        client = client_module.InferenceServerClient(url)
        try:
            tensors = []
            for name, x in inputs.items():
                t = client_module.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
                t.set_data_from_numpy(x)
                tensors.append(t)
            result = client.infer("cnn", tensors, **kw)
            names = [o.name if transport == "grpc" else o["name"] for o in _outputs(result, transport)]
            answers.append({n: result.as_numpy(n) for n in names})
        finally:
            client.close()
    return answers


def _outputs(result: Any, transport: str) -> list[Any]:
    return list(result.get_response().outputs) if transport == "grpc" else result.get_response()["outputs"]


def grpc_metadata(server: ThreadedServer) -> dict[str, Any]:
    """``ModelMetadata`` over gRPC in REST's JSON form (int shapes; protobuf's JSON quotes int64)."""
    client = triton("grpc").InferenceServerClient(server.grpc_target)
    try:
        meta: dict[str, Any] = client.get_model_metadata("cnn", as_json=True)
    finally:
        client.close()
    for t in meta["inputs"] + meta["outputs"]:
        t["shape"] = [int(d) for d in t["shape"]]
    return meta


def grpc_error(
    server: ThreadedServer, tensors: list[tuple[str, str, list[int], np.ndarray]]
) -> tuple[str, str]:
    """(status, message) of a gRPC request that fails; ``tensors``: (name, datatype, shape, raw values)."""
    import grpc

    from kiln.server.oip import grpc_predict_v2_pb2 as pb
    from kiln.server.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest(model_name="cnn")
    for name, datatype, shape, values in tensors:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(values.tobytes())
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    return e.value.code().name, e.value.details()


@pytest.mark.parametrize("fmt", FORMATS)
def test_sdk_artifact_loads_and_matches_the_forward_pass(
    exported: dict[str, Path], cnn: nn.Module, fmt: str
) -> None:
    meta = json.loads((exported[fmt] / METADATA_FILE).read_text())
    assert meta["format"] == fmt and meta["schemaVersion"] == 2
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["files"] == {
        p.name: sha256_file(p) for p in exported[fmt].iterdir() if p.name != METADATA_FILE
    }
    model = load(exported[fmt])
    assert model.platform == {"torch-export": "pytorch_torch_export", "onnx": "onnxruntime_onnx"}[fmt]
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, 1, 8, 8)).astype(np.float32)
        got = model.predict({"image": x})["logits"]
        with torch.no_grad():
            want = cnn(torch.from_numpy(x)).numpy()
        assert got.shape == (n, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def served(exported: dict[str, Path]) -> Iterator[ThreadedServer]:
    s = ThreadedServer(load(exported["torch-export"]))
    yield s
    s.close()


def test_metadata_reflects_the_real_signature(served: ThreadedServer) -> None:
    r = requests.get(served.url + "/v2/models/cnn", timeout=5)
    assert r.status_code == 200
    assert r.json() == {
        "name": "cnn",
        "versions": ["1"],
        "platform": "pytorch_torch_export",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }


def test_infer_a_batch(served: ThreadedServer, cnn: nn.Module) -> None:
    x = np.random.default_rng(7).integers(0, 16, (3, 1, 8, 8)).astype(np.float32)
    body = {
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [3, 1, 8, 8], "data": x.ravel().tolist()}]
    }
    r = requests.post(served.url + "/v2/models/cnn/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [3, 10])
    with torch.no_grad():
        want = cnn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(out["data"]).reshape(3, 10), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_grpc_serves_the_exported_cnn_as_rest_does(
    exported: dict[str, Path], cnn: nn.Module, fmt: str
) -> None:
    from kiln.server.oip import grpc_predict_v2_pb2 as pb
    from kiln.server.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    server = ThreadedServer(load(exported[fmt]))
    try:
        meta = requests.get(server.url + "/v2/models/cnn", timeout=5).json()
        assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert grpc_metadata(server) == meta
        x = np.random.default_rng(11).standard_normal((5, 1, 8, 8)).astype(np.float32)
        g, h = infer_both(server, {"image": x}, request_id="r")
        assert g["logits"].dtype == np.float32 and g["logits"].shape == (5, 10)
        np.testing.assert_array_equal(g["logits"], h["logits"])
        with torch.no_grad():
            want = cnn(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(g["logits"], want, rtol=1e-4, atol=1e-5)
        # Typed contents: UINT8 pixels in uint_contents, converted to the model's FP32 as over REST.
        pixels = np.random.default_rng(12).integers(0, 17, (2, 1, 8, 8)).astype(np.uint8)
        req = pb.ModelInferRequest(model_name="cnn")
        req.inputs.add(name="image", datatype="UINT8", shape=[2, 1, 8, 8]).contents.uint_contents.extend(
            pixels.ravel().tolist()
        )
        import grpc

        with grpc.insecure_channel(server.grpc_target) as channel:
            typed = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
        (out,) = typed.outputs
        assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [2, 10])
        _, rest = infer_both(server, {"image": pixels})
        np.testing.assert_array_equal(
            np.array(out.contents.fp32_contents, np.float32).reshape(2, 10), rest["logits"]
        )
        code, message = grpc_error(server, [("image", "FP32", [2, 64], np.zeros((2, 64), np.float32))])
        assert code == "INVALID_ARGUMENT"
        assert "input 'image' has wrong shape [2, 64]; expected [-1, 1, 8, 8]" in message
    finally:
        server.close()


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            {"shape": [2, 64], "data": [0] * 128},
            "input 'image' has wrong shape [2, 64]; expected [-1, 1, 8, 8]",
        ),
        ({"shape": [1, 1, 8, 7], "data": [0] * 56}, "input 'image' has wrong shape [1, 1, 8, 7]"),
        ({"datatype": "BYTES", "data": ["x"] * 64}, "input 'image' has datatype BYTES"),
        ({"data": ["x"] * 64}, "input 'image': 'data' must contain only numbers"),
        ({"name": "pixels"}, "unknown input 'pixels'"),
    ],
)
def test_bad_input_gets_400_naming_it(served: ThreadedServer, tensor: dict[str, Any], message: str) -> None:
    body = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64, **tensor}]
    }
    r = requests.post(served.url + "/v2/models/cnn/infer", json=body, timeout=5)
    assert r.status_code == 400 and message in r.json()["error"], r.text


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_inputs_two_outputs_batched(tmp_path: Path, fmt: str) -> None:
    from kiln import sdk

    torch.manual_seed(1)
    module = TwoInputs().eval()
    path = sdk.save_model(
        module,
        (torch.randn(2, 3), torch.tensor([1, 2])),
        tmp_path / "two",
        format=fmt,
        input_names=["x", "offset"],
        output_names=["y", "total"],
    )
    server = ThreadedServer(load(path))
    try:
        meta = requests.get(server.url + "/v2/models/cnn", timeout=5).json()
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            ("x", "FP32", [-1, 3]),
            ("offset", "INT64", [-1]),
        ]
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        body = {
            "inputs": [
                {"name": "offset", "datatype": "INT32", "shape": [2], "data": [10, 20]},
                {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": x.ravel().tolist()},
            ]
        }
        r = requests.post(server.url + "/v2/models/cnn/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        with torch.no_grad():
            y, total = module(torch.from_numpy(x), torch.tensor([10, 20]))
        out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
        np.testing.assert_allclose(out["y"], y.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["total"], total.numpy(), rtol=1e-5, atol=1e-5)
        bad = {"inputs": [body["inputs"][1]]}
        r = requests.post(server.url + "/v2/models/cnn/infer", json=bad, timeout=5)
        assert r.status_code == 400 and "missing input 'offset'" in r.json()["error"]
        frac = {"inputs": [{**body["inputs"][0], "datatype": "FP32", "data": [1.5, 2]}, body["inputs"][1]]}
        r = requests.post(server.url + "/v2/models/cnn/infer", json=frac, timeout=5)
        assert r.status_code == 400 and "input 'offset' must hold integers" in r.json()["error"]
        # gRPC: the same signature, several inputs of their own datatypes, the same answers and checks
        assert grpc_metadata(server) == meta
        g, h = infer_both(server, {"offset": np.array([10, 20], np.int64), "x": x})
        for name, want in (("y", y), ("total", total)):
            assert g[name].dtype == np.float32
            np.testing.assert_array_equal(g[name], h[name])
            np.testing.assert_allclose(g[name], want.numpy(), rtol=1e-5, atol=1e-5)
        offset = ("offset", "INT64", [2], np.array([10, 20], np.int64))
        for tensors, message in (
            ([("x", "FP32", [2, 3], x)], "missing input 'offset'"),
            (
                [("offset", "FP32", [2], np.array([1.5, 2], np.float32)), ("x", "FP32", [2, 3], x)],
                "must hold integers",
            ),
            ([offset, ("x", "FP32", [1, 3], x[:1])], "every input needs the same first (batch) dimension"),
            ([offset, ("x", "FP64", [2, 3], x)], "raw_input_contents[1] has 24 bytes"),
        ):
            code, got = grpc_error(server, tensors)
            assert code == "INVALID_ARGUMENT" and message in got, got
    finally:
        server.close()


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in src.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _rewrite_metadata(d: Path, **changes: Any) -> str:
    meta = json.loads((d / METADATA_FILE).read_text())
    meta.update(changes)
    meta["files"] = {p.name: sha256_file(p) for p in d.iterdir() if p.name != METADATA_FILE}
    meta["weightsDigest"] = meta["files"].get("model.pt2") or meta["files"].get("model.onnx")
    (d / METADATA_FILE).write_text(json.dumps(meta))
    return str(meta["weightsDigest"])


def test_digest_mismatch_and_unknown_format_are_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="expected"):
        load(exported["onnx"], digest="sha256:" + "0" * 64)
    d = _copy(exported["onnx"], tmp_path / "tampered")
    (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=r"weights digest of model\.onnx"):
        load(d)
    u = _copy(exported["torch-export"], tmp_path / "unknown")
    _rewrite_metadata(u, format="savedmodel")
    with pytest.raises(UnknownFormat, match="savedmodel"):
        load(u)


def test_pickled_payloads_and_broken_programs_are_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(exported["torch-export"], tmp_path / "pickled")
    src = zipfile.ZipFile(exported["torch-export"] / "model.pt2")
    with zipfile.ZipFile(d / "model.pt2", "w") as out:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("_weights_config.json"):
                cfg = json.loads(data)
                next(iter(cfg["config"].values()))["use_pickle"] = True
                data = json.dumps(cfg).encode()
            out.writestr(item, data)
    _rewrite_metadata(d)
    with pytest.raises(ArtifactError, match="stored with pickle"):
        load(d)
    (d / "model.pt2").write_bytes(b"not a zip")
    _rewrite_metadata(d)
    with pytest.raises(ArtifactError, match=r"not a torch\.export archive"):
        load(d)


def test_kiln_serve_exits_1_on_a_program_that_does_not_load(
    exported: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.server.__main__ import main

    d = _copy(exported["onnx"], tmp_path / "broken")
    (d / "model.onnx").write_bytes(b"\x08\x07garbage")
    digest = _rewrite_metadata(d)
    assert main(["--artifact", str(d), "--digest", digest, "--model-name", "cnn"], {}) == 1
    err = capsys.readouterr().err
    assert "refusing to serve" in err and "model.onnx does not load" in err


class Scale:
    """A hook: clients send 0..16 pixels as UINT8; the model gets them /16; answers get probabilities."""

    inputs = [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 8, 8]}]
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]

    def preprocess(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": inputs["image"].astype(np.float32) / 16}

    def postprocess(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        e = np.exp(outputs["logits"] - outputs["logits"].max(axis=1, keepdims=True))
        return {"probabilities": e / e.sum(axis=1, keepdims=True)}


def test_model_hook_pre_and_post_processing(exported: dict[str, Path], cnn: nn.Module) -> None:
    from kiln.server.hooks import HookedModel, load_hook

    hooked = HookedModel(load(exported["onnx"]), load_hook(f"{__name__}:Scale"))
    server = ThreadedServer(hooked)
    try:
        meta = requests.get(server.url + "/v2/models/cnn", timeout=5).json()
        assert meta["inputs"] == Scale.inputs and meta["outputs"] == Scale.outputs
        x = np.random.default_rng(3).integers(0, 17, (2, 1, 8, 8))
        body = {
            "inputs": [
                {"name": "image", "datatype": "UINT8", "shape": [2, 1, 8, 8], "data": x.ravel().tolist()}
            ]
        }
        r = requests.post(server.url + "/v2/models/cnn/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"]).reshape(2, 10)
        with torch.no_grad():
            want = torch.softmax(cnn(torch.from_numpy(x.astype(np.float32) / 16)), dim=1).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        r = requests.post(
            server.url + "/v2/models/cnn/infer",
            json={"inputs": [{**body["inputs"][0], "data": [300] * 128}]},
            timeout=5,
        )
        assert (
            r.status_code == 400
            and "input 'image' has values outside the range of UINT8" in r.json()["error"]
        )
        # The hook is the served model's, whatever the transport.
        assert grpc_metadata(server) == meta
        g, h = infer_both(server, {"image": x.astype(np.uint8)})
        np.testing.assert_array_equal(g["probabilities"], h["probabilities"])
        np.testing.assert_allclose(g["probabilities"], want, rtol=1e-4, atol=1e-6)
        code, message = grpc_error(server, [("image", "INT32", [1, 1, 8, 8], np.full(64, 300, np.int32))])
        assert code == "INVALID_ARGUMENT" and "input 'image' has values outside the range of UINT8" in message
    finally:
        server.close()
    with pytest.raises(ArtifactError, match="neither preprocess"):
        load_hook("json:JSONDecoder")


def test_publish_writes_the_result_the_operator_registers(
    exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln import sdk
    from kiln.registry import artifacts

    term = tmp_path / "termination-log"
    monkeypatch.setenv("KILN_OUTPUT_URI", (tmp_path / "out").as_uri())
    monkeypatch.setenv("KILN_MODEL_NAME", "cnn")
    monkeypatch.setenv("KILN_TRAININGJOB", "cnn-v1")
    monkeypatch.setenv("KILN_TERMINATION_LOG", str(term))
    monkeypatch.setenv("RANK", "1")
    assert sdk.publish(exported["onnx"]) is None and not term.exists()  # not rank 0: nothing
    monkeypatch.setenv("RANK", "0")
    assert sdk.output_dir() == tmp_path / "out" / "cnn" / "cnn-v1"
    staged = _copy(exported["onnx"], tmp_path / "staged")
    result = sdk.publish(staged, metrics={"accuracy": 0.5})
    assert result is not None and parse_termination_message(term.read_text()) == result
    assert result.artifactUri == (tmp_path / "out" / "cnn" / "cnn-v1").as_uri()
    assert result.metrics == {"accuracy": 0.5}
    meta, problem = artifacts.verify(result.artifactUri, result.digest)
    assert problem is None and meta is not None and meta.format == "onnx"
