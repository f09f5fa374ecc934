"""The Open Inference Protocol request parser and response encoder (no HTTP), fuzzed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")  # the serve extra (torch, numpy, aiohttp, safetensors)

import numpy as np

from kiln.server import protocol
from kiln.server.protocol import (
    PREDICTED_CLASS,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    encode_infer_response,
    parse_infer_request,
)

pytestmark = pytest.mark.torch

OUTPUTS = ("output-0", PREDICTED_CLASS)


def parse(
    body: bytes | str | dict[str, Any], header_length: str | None = None, size: int = 4
) -> InferRequest:
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    return parse_infer_request(
        body, header_length=header_length, input_name="input-0", input_size=size, output_names=OUTPUTS
    )


def request(**tensor: Any) -> dict[str, Any]:
    t = {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    t.update(tensor)
    return {"inputs": [t]}


def test_flat_and_nested_data_give_the_same_rows() -> None:
    flat = parse(request(shape=[2, 4], data=[1, 2, 3, 4, 5, 6, 7, 8]))
    nested = parse(request(shape=[2, 4], data=[[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert flat.rows.dtype == np.float32 and flat.rows.flags.c_contiguous
    np.testing.assert_array_equal(flat.rows, nested.rows)
    assert flat.rows.shape == (2, 4)
    assert flat.outputs == [RequestedOutput("output-0"), RequestedOutput(PREDICTED_CLASS)]


@pytest.mark.parametrize(
    "datatype", ["FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT64"]
)
def test_numeric_datatypes_are_converted_to_float32(datatype: str) -> None:
    r = parse(request(datatype=datatype, data=[0, 1, 2, 3]))
    assert r.rows.dtype == np.float32
    assert r.rows.tolist() == [[0, 1, 2, 3]]


def test_id_outputs_and_unknown_keys() -> None:
    body = request()
    body.update(
        id="abc",
        model_name="digits",  # KServe's client sends this; the spec has no such key: ignored
        parameters={"content_type": "np", "binary_data_output": True},
        outputs=[{"name": PREDICTED_CLASS}, {"name": "output-0", "parameters": {"binary_data": False}}],
    )
    r = parse(body)
    assert r.id == "abc"
    assert r.outputs == [RequestedOutput(PREDICTED_CLASS, True), RequestedOutput("output-0", False)]


def test_binary_tensor_data_extension() -> None:
    rows = np.arange(8, dtype="<f4").reshape(2, 4)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input-0",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ]
        }
    ).encode()
    r = parse(header + rows.tobytes(), header_length=str(len(header)))
    np.testing.assert_array_equal(r.rows, rows)
    doubles = rows.astype("<f8")
    header = header.replace(b"FP32", b"FP64").replace(str(rows.nbytes).encode(), str(doubles.nbytes).encode())
    np.testing.assert_array_equal(parse(header + doubles.tobytes(), str(len(header))).rows, rows)


BAD: list[tuple[str, Any, str | None, str]] = [
    ("not JSON", "{", None, "malformed JSON"),
    ("JSON array", "[1, 2]", None, "must be a JSON object"),
    ("invalid UTF-8", b"\xff\xfe\xfa", None, "malformed JSON"),
    (
        "NaN literal",
        '{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [NaN, 1, 2, 3]}]}',
        None,
        "NaN",
    ),
    ("no inputs", {"inputs": []}, None, "'inputs' must be a non-empty list"),
    ("unknown input", request(name="pixels"), None, "unknown input 'pixels'"),
    ("two inputs", {"inputs": request()["inputs"] * 2}, None, "exactly one input"),
    ("wrong width", request(shape=[1, 3], data=[1, 2, 3]), None, "wrong shape [1, 3]; expected [-1, 4]"),
    ("rank 1", request(shape=[4]), None, "wrong shape [4]"),
    ("zero rows", request(shape=[0, 4], data=[]), None, "at least one row"),
    ("negative dim", request(shape=[-1, 4]), None, "invalid shape"),
    ("bool dim", request(shape=[True, 4]), None, "invalid shape"),
    ("BYTES", request(datatype="BYTES", data=["a", "b", "c", "d"]), None, "datatype BYTES"),
    ("BOOL", request(datatype="BOOL", data=[True] * 4), None, "datatype BOOL"),
    ("unknown datatype", request(datatype="FP8"), None, "unknown datatype 'FP8'"),
    ("lower-case datatype", request(datatype="fp32"), None, "unknown datatype 'fp32'"),
    ("size mismatch", request(shape=[2, 4]), None, "has 4 values in 'data' but shape [2, 4] needs 8"),
    ("strings in data", request(data=["1", "2", "3", "4"]), None, "only numbers"),
    ("bools in data", request(data=[True, False, True, False]), None, "only numbers"),
    ("ragged data", request(shape=[2, 4], data=[[1, 2, 3, 4], [5, 6, 7]]), None, "ragged"),
    ("data not a list", request(data=5), None, "'data' must be a JSON array"),
    ("no data", {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32"}]}, None, "no 'data'"),
    ("overflows float32", request(data=[1e39, 0, 0, 0]), None, "not finite"),
    (
        "unknown output",
        {**request(), "outputs": [{"name": "probabilities"}]},
        None,
        "unknown output 'probabilities'",
    ),
    ("bad id", {**request(), "id": 7}, None, "'id' must be a string"),
    ("bad parameters", {**request(), "parameters": []}, None, "'parameters' must be a JSON object"),
    ("bad header length", request(), "abc", "must be a non-negative integer"),
    ("header length too long", request(), "100000", "body has only"),
    ("binary and data", request(parameters={"binary_data_size": 3}, data=None), "0", "both 'data'"),
]


@pytest.mark.parametrize(("body", "header", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_name_the_problem(body: Any, header: str | None, message: str) -> None:
    if header == "0":  # body for the binary case: a JSON header followed by nothing
        header = str(len(json.dumps(body)))
    with pytest.raises(ProtocolError) as e:
        parse(body, header_length=header)
    assert e.value.status == 400
    assert message in e.value.message


def test_binary_section_mismatches() -> None:
    good = {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    header = json.dumps({"inputs": [good]}).encode()
    with pytest.raises(ProtocolError, match="only 8 follow"):
        parse(header + b"\0" * 8, str(len(header)))
    with pytest.raises(ProtocolError, match="binary section has 20 bytes"):
        parse(header + b"\0" * 20, str(len(header)))
    bad = json.dumps({"inputs": [{**good, "parameters": {"binary_data_size": 12}}]}).encode()
    with pytest.raises(ProtocolError, match="needs 16"):
        parse(bad + b"\0" * 12, str(len(bad)))
    nan = json.dumps({"inputs": [good]}).encode()
    with pytest.raises(ProtocolError, match="not finite"):
        parse(nan + np.full(4, np.nan, dtype="<f4").tobytes(), str(len(nan)))


def test_encode_json_and_binary_responses() -> None:
    logits = np.array([[0.5, -1.25]], dtype=np.float32)
    cls = np.array([0], dtype=np.int64)
    body, n = encode_infer_response(
        model_name="m",
        model_version="1",
        request_id="r",
        outputs=[
            (RequestedOutput("output-0"), "FP32", logits),
            (RequestedOutput(PREDICTED_CLASS), "INT64", cls),
        ],
    )
    assert n is None
    assert json.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "outputs": [
            {"name": "output-0", "datatype": "FP32", "shape": [1, 2], "data": [0.5, -1.25]},
            {"name": PREDICTED_CLASS, "datatype": "INT64", "shape": [1], "data": [0]},
        ],
    }
    body, n = encode_infer_response(
        model_name="m",
        model_version="1",
        request_id="r",
        outputs=[
            (RequestedOutput("output-0", True), "FP32", logits),
            (RequestedOutput(PREDICTED_CLASS), "INT64", cls),
        ],
    )
    assert n is not None
    header = json.loads(body[:n])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert "data" not in header["outputs"][0]
    np.testing.assert_array_equal(np.frombuffer(body[n:], dtype="<f4"), logits.ravel())


# ----------------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=40,
)
numbers = st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
datatypes = (
    st.sampled_from(["FP32", "FP64", "FP16", "INT64", "UINT8", "BOOL", "BYTES", "fp32", "X"]) | json_values
)
shapes = st.lists(st.integers(-2, 6), max_size=3) | st.just([1, 4]) | st.just([2, 4]) | json_values
datas = (
    st.lists(numbers, max_size=12)
    | st.lists(st.lists(numbers, min_size=4, max_size=4), max_size=3)
    | st.lists(json_values, max_size=6)
    | json_values
)
tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["input-0", "x"]) | json_values,
        "shape": shapes,
        "datatype": datatypes,
        "data": datas,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-1, 40) | json_values}
        )
        | json_values,
    },
)
requests_ = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=2) | json_values},
    optional={
        "id": st.text(max_size=5) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from([*OUTPUTS, "nope"]) | json_values},
                optional={"parameters": st.dictionaries(st.sampled_from(["binary_data"]), json_values)},
            ),
            max_size=3,
        )
        | json_values,
        "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "x"]), json_values)
        | json_values,
    },
)


def check_outcome(body: bytes, header: str | None) -> None:
    try:
        r = parse(body, header_length=header)
    except ProtocolError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert r.rows.dtype == np.float32 and r.rows.ndim == 2 and r.rows.shape[1] == 4 and r.rows.shape[0] >= 1
    assert np.isfinite(r.rows).all()
    assert all(o.name in OUTPUTS for o in r.outputs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.none() | st.text(max_size=6))
def test_fuzz_any_bytes(body: bytes, header: str | None) -> None:
    check_outcome(body, header)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_any_json(doc: Any) -> None:
    check_outcome(json.dumps(doc).encode(), None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests_, st.none() | st.binary(max_size=40), st.none() | st.integers(-3, 400).map(str))
def test_fuzz_request_shaped_json(doc: dict[str, Any], tail: bytes | None, header: str | None) -> None:
    text = json.dumps(doc).encode()
    if tail is not None and header is None:
        header = str(len(text))
    check_outcome(text + (tail or b""), header)


@pytest.mark.parametrize("depth", [70, 1000, 100_000])
def test_deeply_nested_data_is_refused(depth: int) -> None:
    body = (
        '{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": '
        + "[" * depth
        + "]" * depth
    )
    check_outcome((body + "}]}").encode(), None)


# ----------------------------------------------------------------------------- JSON codec
def std_outcome(decode: Any, text: bytes) -> tuple[str, str]:
    """("ok", repr of the value) or ("error", exception type: message) of ``decode(text)``."""
    try:
        return "ok", repr(decode(text))
    except (ValueError, RecursionError) as e:
        return "error", f"{type(e).__name__}: {e}"


@pytest.mark.parametrize(
    "text",
    [
        b'{"data": [18446744073709551616, 1]}',  # beyond 64 bits: orjson alone reads a float
        b"-9223372036854775809",
        b"[9223372036854775807, 18446744073709551615, 12345678901234567890.5]",
        b"[1e400, -1e400, 1e-400, -0.0, 0.0047451349875974325]",
        b'{"a": 1, "a": 2}',
        b'"\\ud800"',
        b'"\xff"',
        b"[NaN]",
        b"[Infinity]",
        b"[1,]",
        b"\xef\xbb\xbf{}",
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_request_json_is_read_as_the_standard_library_reads_it(text: bytes) -> None:
    assert std_outcome(protocol._loads, text) == std_outcome(
        lambda t: protocol._DECODER.decode(t.decode()), text
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_request_json_is_read_as_the_standard_library_reads_it(doc: Any) -> None:
    text = json.dumps(doc).encode()
    assert std_outcome(protocol._loads, text) == std_outcome(
        lambda t: protocol._DECODER.decode(t.decode()), text
    )


def test_response_json_equals_the_standard_librarys() -> None:
    logits = np.array([[1e-7, 1e20, -0.0, 0.1]], dtype=np.float32)
    kw: dict[str, Any] = {
        "model_name": "m",
        "model_version": "1",
        "outputs": [(RequestedOutput("o"), "FP32", logits)],
    }
    for rid, params in (("é☃", None), ("null", None), ("x", {"big": 2**70, "ok": True})):
        body, n = encode_infer_response(request_id=rid, parameters=params, **kw)
        doc = {"model_name": "m", "model_version": "1", "id": rid}
        if params:
            doc["parameters"] = params
        doc["outputs"] = [{"name": "o", "datatype": "FP32", "shape": [1, 4], "data": logits.ravel().tolist()}]
        assert n is None and json.loads(body) == doc
    for bad in (np.nan, np.inf):  # JSON has neither: the response cannot be written (a 500), as before
        with pytest.raises(ValueError):
            encode_infer_response(
                request_id="x", **{**kw, "outputs": [(RequestedOutput("o"), "FP32", np.array([[bad]]))]}
            )
