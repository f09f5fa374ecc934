"""Open Inference Protocol (KServe "V2 inference protocol") REST request parsing and encoding.

Pure functions over bytes and numpy arrays: no torch, no aiohttp. Every malformed request is
turned into a :class:`ProtocolError` carrying the HTTP status (4xx) and a message naming the
problem; :func:`parse_infer_request` raises nothing else (this is fuzzed with hypothesis).

Supported:

- JSON tensors, ``data`` flat (row-major) or nested, as in the spec.
- The *binary tensor data* extension (Triton's ``binary_tensor_data``, used by default by
  ``tritonclient.http`` and optionally by KServe's ``InferenceRESTClient``): the body is a JSON
  header of ``Inference-Header-Content-Length`` bytes followed by raw little-endian tensors; an input
  names its byte count in ``parameters.binary_data_size``. Outputs are returned in binary when the
  request asks with ``outputs[].parameters.binary_data`` or ``parameters.binary_data_output``.
- Any number of named inputs, each checked against the model's signature
  (:class:`TensorMetadata`: ``-1`` dimensions free, the first one the batch of at least one row,
  the same for every input). Input datatypes ``FP16/FP32/FP64/INT8..64/UINT8..64`` are
  converted to the datatype the model declares (to an integer one only when every value is an
  integer in its range); ``BOOL`` and ``BYTES`` are rejected with 400, except for an input
  declared ``BOOL`` or ``BYTES`` itself (only the entity-key inputs of
  :mod:`kiln.server.features` are): it takes exactly that datatype, ``BYTES`` as JSON strings or,
  in binary, Triton's serialization (each element a 4-byte little-endian length, then its bytes),
  decoded as UTF-8 text. Messages name the input.
- A second signature, ``entity_inputs`` (the entity keys of the served FeatureGroups): a request
  names either the model's inputs or those (:func:`choose_signature`); the parsed request then
  carries ``entities`` and no ``inputs`` (the core fills them from the online store).

Unknown top-level and ``parameters`` keys are ignored (KServe's client sends ``model_name``,
MLServer's codecs send ``parameters.content_type``).

The checks of a request against the signature (:func:`match_inputs`, :func:`input_dtype`,
:func:`check_shape`, :func:`convert_input`, :func:`check_batch`, :func:`check_output_name`) are
public: the gRPC service (:mod:`kiln.server.grpc_service`) runs the same ones, so both transports
accept the same tensors and refuse the rest with the same messages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

#: Header giving the length of the JSON part of a binary-extension request or response.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: Name of the optional INT64 output holding the arg-max class of each row.
PREDICTED_CLASS = "predicted_class"

#: Input datatypes we accept (converted to float32); values are little-endian numpy dtypes.
NUMERIC_DATATYPES: dict[str, np.dtype[Any]] = {
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
}
#: Valid Open Inference Protocol datatypes we refuse, with the reason given to the client.
REJECTED_DATATYPES = {"BOOL": "boolean", "BYTES": "string/bytes"}
#: Datatypes an input takes only when the signature declares them (entity keys): numpy dtype.
EXACT_DATATYPES: dict[str, np.dtype[Any]] = {"BOOL": np.dtype(bool), "BYTES": np.dtype(object)}


class ProtocolError(Exception):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class TensorMetadata:
    """``$metadata_tensor`` of the model metadata response."""

    name: str
    datatype: str
    shape: list[int]

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the spec."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class RequestedOutput:
    """One output the client wants, and whether it wants it in binary."""

    name: str
    binary: bool = False


@dataclass
class InferRequest:
    """A validated inference request: one C-contiguous array per model input, in the model's
    input order and datatypes, all with the same number of rows (the first dimension).

    A request that named entity keys instead has them in ``entities`` (entity input name ->
    ``[n]`` array, in the entity signature's order) and empty ``inputs`` until the core has read
    the features; ``parameters`` are the response's (the core adds the feature statuses there).
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] = field(default_factory=list)
    entities: dict[str, np.ndarray] | None = None
    parameters: dict[str, str | int | bool] = field(default_factory=dict)

    @property
    def rows(self) -> np.ndarray:
        """The first input's array (the only one of a single-input model)."""
        return next(iter(self.inputs.values()))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


# One decoder for all requests (json.loads with keyword arguments builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


# Digits -> "0", the decimal point kept, every other byte -> " ": an integer part of 19 digits
# or more then reads " 0000000000000000000" (a fraction's digits follow a ".").
_DIGIT_RUNS = bytes(ord("0") if 48 <= i <= 57 else ord(".") if i == 46 else ord(" ") for i in range(256))
_LONG_INTEGER = b" " + b"0" * 19


def _loads(text: bytes) -> Any:
    """``text`` parsed as JSON exactly as the standard library parses it, mostly by orjson (ten
    times faster on a request).

    The standard library decides wherever orjson would differ: what orjson refuses (so that the
    refusals and their messages stay the standard library's), and integers of 19 digits or more
    (orjson reads those beyond 64 bits as floats; the standard library keeps them exact).

    Raises:
        ValueError: not UTF-8 or not JSON, or NaN/Infinity (which JSON does not have).
        RecursionError: nested too deeply.
    """
    runs = text.translate(_DIGIT_RUNS)
    if _LONG_INTEGER not in runs and not runs.startswith(_LONG_INTEGER[1:]):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return _DECODER.decode(text.decode("utf-8"))


def _dumps(doc: Any) -> bytes:
    """Compact JSON bytes of ``doc``, exactly the standard library's bytes or JSON equal to them, mostly
    by orjson (twenty times faster on a response).

    orjson writes non-ASCII text as UTF-8 where the standard library writes ``\\u`` escapes, floats
    in the shortest form either way (``1e-07`` reads ``1e-7``), and NaN and infinities as ``null``,
    which no value of a response is otherwise: a ``null`` in its output (or a value orjson
    refuses, such as an integer beyond 64 bits) hands over to the standard library, which raises
    for those floats (JSON has none) and writes ``"null"`` strings as orjson would.

    Raises:
        ValueError: a float that is NaN or infinite.
    """
    try:
        out = orjson.dumps(doc)
    except orjson.JSONEncodeError:
        out = b"null"
    if b"null" not in out:
        return out
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _shape_str(shape: Any) -> str:
    return json.dumps(shape) if isinstance(shape, list) else repr(shape)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_infer_request(
    body: bytes,
    *,
    header_length: str | None,
    output_names: tuple[str, ...],
    inputs: Sequence[TensorMetadata] | None = None,
    input_name: str | None = None,
    input_size: int | None = None,
    entity_inputs: Sequence[TensorMetadata] = (),
) -> InferRequest:
    """Parse and validate an inference request body against the model's input signature.

    Args:
        body: the raw request body.
        header_length: value of the ``Inference-Header-Content-Length`` header, if any.
        output_names: outputs the client may request (all of them by default).
        inputs: the model's inputs (name, datatype, shape with -1 for free dimensions); or,
            for a model with one ``[-1, input_size]`` FP32 input, ``input_name`` and
            ``input_size``.
        entity_inputs: the entity keys a request may send instead of ``inputs``
            (:func:`choose_signature`).
    Returns:
        The request with one array per model input (finite values for float datatypes), or
        with ``entities`` when it sent entity keys.
    Raises:
        ProtocolError: 400 with a message naming the problem (and the input), for anything
            malformed.
    """
    if inputs is None:
        if input_name is None or input_size is None:
            raise TypeError("give inputs, or input_name and input_size")
        inputs = (TensorMetadata(input_name, "FP32", [-1, input_size]),)
    json_part, binary = _split_body(body, header_length)
    try:
        doc = _loads(json_part)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError(f"malformed JSON request body: {e}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"request body must be a JSON object, got {type(doc).__name__}")

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {type(request_id).__name__}")
    params = _parameters(doc, "request")
    binary_default = params.get("binary_data_output") is True

    raw_inputs = doc.get("inputs")
    names = [t.get("name") for t in raw_inputs if isinstance(t, dict)] if isinstance(raw_inputs, list) else []
    specs, keyed = choose_signature(names, inputs, entity_inputs)
    tensors = _match_inputs(raw_inputs, specs)
    arrays: dict[str, np.ndarray] = {}
    used = 0
    for tensor, spec in tensors:  # binary data follows the JSON in the order of 'inputs'
        arrays[spec.name], n = _parse_input(tensor, binary, used, spec)
        used += n
    if used != len(binary):
        raise ProtocolError(
            f"binary section has {len(binary)} bytes but inputs declare {used} (parameters.binary_data_size)"
        )
    check_batch(arrays)
    outputs = _parse_outputs(doc.get("outputs"), output_names, binary_default)
    ordered = {t.name: arrays[t.name] for t in specs}
    if keyed:
        return InferRequest(id=request_id, inputs={}, outputs=outputs, entities=ordered)
    return InferRequest(id=request_id, inputs=ordered, outputs=outputs)


def choose_signature(
    names: Sequence[Any], inputs: Sequence[TensorMetadata], entity_inputs: Sequence[TensorMetadata]
) -> tuple[Sequence[TensorMetadata], bool]:
    """Which signature a request's input names follow: ``(signature, keyed)``, ``keyed`` True
    for the entity keys (``entity_inputs``), False for the model's own ``inputs``.

    Names of neither (or none at all) choose the model's inputs, whose check
    (:func:`match_inputs`) then names the problem.

    Raises:
        ProtocolError: 400 when the names mix model inputs and entity keys.
    """
    if not entity_inputs:
        return inputs, False
    model = {t.name for t in inputs}
    keys = {t.name for t in entity_inputs}
    given = [n for n in names if isinstance(n, str)]
    if any(n in keys for n in given):
        if any(n in model for n in given):
            raise ProtocolError(
                f"the inputs mix the model's inputs ({_names(inputs)}) and entity keys "
                f"({_names(entity_inputs)}); send one or the other"
            )
        return entity_inputs, True
    return inputs, False


def _names(specs: Sequence[TensorMetadata]) -> str:
    return ", ".join(repr(t.name) for t in specs)


def _match_inputs(
    tensors: Any, specs: Sequence[TensorMetadata]
) -> list[tuple[dict[str, Any], TensorMetadata]]:
    """Pair each JSON request tensor with the model input of its name (request order)."""
    if not isinstance(tensors, list) or not tensors:
        raise ProtocolError(
            f"'inputs' must be a non-empty list of tensors (the model's inputs: {_names(specs)})"
        )
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise ProtocolError(f"inputs[{i}] must be a JSON object, got {type(tensor).__name__}")
    return list(zip(tensors, match_inputs([t.get("name") for t in tensors], specs), strict=True))


def match_inputs(names: Sequence[Any], specs: Sequence[TensorMetadata]) -> list[TensorMetadata]:
    """The model input of each of a request's input tensor names (request order).

    Both transports' check of the request's inputs against the model's signature.

    Raises:
        ProtocolError: 400 naming the input: none given, unknown, given twice, or missing.
    """
    by_name = {t.name: t for t in specs}
    if not names:
        raise ProtocolError(f"the request has no inputs; the model's inputs are {_names(specs)}")
    out: list[TensorMetadata] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in by_name:
            raise ProtocolError(
                f"unknown input {name!r} (inputs[{i}]); the model's inputs are {_names(specs)}"
            )
        if name in seen:
            raise ProtocolError(
                f"input {name!r} is given more than once; expected exactly one input tensor per model input"
            )
        seen.add(name)
        out.append(by_name[name])
    missing = [t.name for t in specs if t.name not in seen]
    if missing:
        raise ProtocolError(f"missing input {missing[0]!r}; the model's inputs are {_names(specs)}")
    return out


def check_batch(arrays: dict[str, np.ndarray]) -> None:
    """Every input must have the same number of rows (its first dimension).

    Raises:
        ProtocolError: 400 naming two inputs that differ.
    """
    sizes = {name: int(a.shape[0]) for name, a in arrays.items()}
    first = next(iter(sizes))
    for name, n in sizes.items():
        if n != sizes[first]:
            raise ProtocolError(
                f"input {name!r} has {n} rows but input {first!r} has {sizes[first]}; "
                "every input needs the same first (batch) dimension"
            )


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not text.isdigit() or not text.isascii():
        raise ProtocolError(f"{HEADER_LENGTH} must be a non-negative integer, got {header_length!r}")
    n = int(text)
    if n > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {n} but the body has only {len(body)} bytes")
    return body[:n], body[n:]


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(f"{where} 'parameters' must be a JSON object, got {type(params).__name__}")
    return params


def input_dtype(name: str, datatype: Any, spec: TensorMetadata) -> np.dtype[Any]:
    """The little-endian numpy dtype of the OIP ``datatype`` a request gives input ``name``.

    Any numeric datatype is accepted (the values are converted to ``spec.datatype`` by
    :func:`convert_input`); an input declared BOOL or BYTES takes exactly that datatype (numpy
    ``bool`` / ``object``).

    Raises:
        ProtocolError: 400 naming the input: not a string, BOOL/BYTES, or unknown.
    """
    if not isinstance(datatype, str):
        raise ProtocolError(f"input {name!r} needs a string 'datatype' (e.g. \"FP32\"), got {datatype!r}")
    exact = EXACT_DATATYPES.get(spec.datatype)
    if exact is not None:
        if datatype != spec.datatype:
            raise ProtocolError(f"input {name!r} has datatype {datatype}; expected {spec.datatype}")
        return exact
    if datatype in REJECTED_DATATYPES:
        raise ProtocolError(
            f"input {name!r} has datatype {datatype} ({REJECTED_DATATYPES[datatype]}); "
            f"expected a numeric datatype such as {spec.datatype}"
        )
    dtype = NUMERIC_DATATYPES.get(datatype)
    if dtype is None:
        raise ProtocolError(
            f"input {name!r} has unknown datatype {datatype!r}; expected {spec.datatype} (or another number type)"
        )
    return dtype


def check_shape(name: str, shape: Any, spec: TensorMetadata) -> list[int]:
    """Validate a request tensor's ``shape`` against the model input ``spec``.

    Returns:
        The shape.
    Raises:
        ProtocolError: 400 naming the input: not a list of non-negative integers, another
            rank, a fixed dimension that differs, or no rows.
    """
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(
            f"input {name!r} has invalid shape {_shape_str(shape)}; expected a list of non-negative integers "
            f"matching {_shape_str(spec.shape)}"
        )
    fits = len(shape) == len(spec.shape) and all(w in (-1, d) for d, w in zip(shape, spec.shape, strict=True))
    if not fits or shape[0] < 1:
        raise ProtocolError(
            f"input {name!r} has wrong shape {_shape_str(shape)}; expected {_shape_str(spec.shape)} "
            "(-1: any size; at least one row)"
        )
    return shape


def convert_input(name: str, arr: np.ndarray, datatype: str) -> np.ndarray:
    """``arr`` as a writable C-contiguous array of the model's ``datatype``.

    Raises:
        ProtocolError: 400 naming the input: float values that are not finite in the target
            float type, or values that are not integers in the target integer type's range;
            for BOOL, values that are not booleans; for BYTES, values that are not UTF-8 text.
    """
    if datatype in EXACT_DATATYPES:
        return _convert_exact(name, arr, datatype)
    target = NUMERIC_DATATYPES[datatype]
    if target.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.ascontiguousarray(arr, dtype=target.newbyteorder("="))
        if not np.isfinite(out).all():
            raise ProtocolError(
                f"input {name!r} has values that are not finite in {datatype.lower().replace('fp', 'float')} "
                "(NaN, inf or out of range)"
            )
    else:
        info = np.iinfo(target)
        if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (np.floor(arr) == arr).all()):
            raise ProtocolError(f"input {name!r} must hold integers ({datatype}); got fractions or NaN")
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ProtocolError(f"input {name!r} has values outside the range of {datatype}")
        out = np.ascontiguousarray(arr, dtype=target.newbyteorder("="))
    if not out.flags.writeable:  # a view of the request bytes; torch wants writable memory
        out = out.copy()
    return out


def _convert_exact(name: str, arr: np.ndarray, datatype: str) -> np.ndarray:
    """BOOL values as numpy ``bool``; BYTES values as an ``object`` array of ``str`` (UTF-8)."""
    if datatype == "BOOL":
        if arr.dtype.kind != "b":
            raise ProtocolError(f"input {name!r} must hold booleans (BOOL)")
        return np.array(arr, dtype=bool, order="C")
    out = np.empty(arr.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.reshape(-1).tolist()):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(f"input {name!r} has element {i} that is not UTF-8 text") from None
        if not isinstance(v, str):
            raise ProtocolError(
                f"input {name!r} must hold strings (BYTES); element {i} is {type(v).__name__}"
            )
        flat[i] = v
    return out


def deserialize_bytes(name: str, data: bytes, count: int) -> np.ndarray:
    """``count`` BYTES elements from Triton's serialization: each a 4-byte little-endian
    length, then that many bytes (``tritonclient.utils.serialize_byte_tensor``); all of ``data``.

    Raises:
        ProtocolError: 400 naming the input: truncated, or bytes left over.
    """
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(data):
            raise ProtocolError(
                f"input {name!r}: BYTES element {i} is cut off (its 4-byte length is missing)"
            )
        n = int.from_bytes(data[pos : pos + 4], "little")
        pos += 4
        if pos + n > len(data):
            raise ProtocolError(f"input {name!r}: BYTES element {i} declares {n} bytes, fewer follow")
        out[i] = bytes(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise ProtocolError(f"input {name!r}: {len(data) - pos} bytes follow its {count} BYTES elements")
    return out


def _parse_input(
    tensor: dict[str, Any], binary: bytes, offset: int, spec: TensorMetadata
) -> tuple[np.ndarray, int]:
    """Return (array in the model's datatype, bytes of the binary section consumed at ``offset``)."""
    name = tensor["name"]
    datatype = tensor.get("datatype")
    dtype = input_dtype(name, datatype, spec)
    shape = check_shape(name, tensor.get("shape"), spec)
    count = math.prod(shape)  # a list of ints (check_shape): numpy's prod costs 20x more per request
    params = _parameters(tensor, f"input {name!r}")
    size = params.get("binary_data_size")
    used = 0
    if size is not None:
        if "data" in tensor:
            raise ProtocolError(f"input {name!r} has both 'data' and parameters.binary_data_size")
        if not _is_int(size) or size < 0:
            raise ProtocolError(
                f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}"
            )
        if dtype.kind != "O" and size != count * dtype.itemsize:
            raise ProtocolError(
                f"input {name!r}: binary_data_size is {size} bytes but shape {_shape_str(shape)} "
                f"of {datatype} needs {count * dtype.itemsize}"
            )
        if size > len(binary) - offset:
            raise ProtocolError(
                f"input {name!r}: binary_data_size is {size} bytes "
                f"but only {len(binary) - offset} follow the JSON header"
            )
        if dtype.kind == "O":
            arr = deserialize_bytes(name, binary[offset : offset + size], count)
        else:
            arr = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
        used = size
    else:
        if "data" not in tensor:
            raise ProtocolError(f"input {name!r} has no 'data' (nor parameters.binary_data_size)")
        arr = _json_data_to_array(
            name, tensor["data"], spec.datatype if spec.datatype in EXACT_DATATYPES else None
        )
        if arr.size != count:
            raise ProtocolError(
                f"input {name!r} has {arr.size} values in 'data' but shape {_shape_str(shape)} needs {count}"
            )
    return convert_input(name, arr.reshape(shape), spec.datatype), used


def _json_data_to_array(name: str, data: Any, exact: str | None = None) -> np.ndarray:
    """A JSON ``data`` array: numbers; or, for an ``exact`` BOOL/BYTES input, booleans/strings."""
    what = {"BOOL": "booleans", "BYTES": "strings"}.get(exact or "", "numbers")
    if not isinstance(data, list):
        raise ProtocolError(
            f"input {name!r}: 'data' must be a JSON array of {what}, got {type(data).__name__}"
        )
    try:
        arr = np.asarray(data, dtype=object if exact == "BYTES" else None)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError):
        raise ProtocolError(
            f"input {name!r}: 'data' must be a flat or regularly nested array of {what} (it is ragged or mixed)"
        ) from None
    if exact == "BYTES":
        if not all(isinstance(v, str) for v in arr.reshape(-1).tolist()):
            raise ProtocolError(f"input {name!r}: 'data' must contain only strings (BYTES)")
        return arr
    if arr.dtype.kind not in ("b" if exact == "BOOL" else "iuf"):
        raise ProtocolError(
            f"input {name!r}: 'data' must contain only {what} (got {arr.dtype.kind!r} values)"
        )
    return arr


def _parse_outputs(
    outputs: Any, output_names: tuple[str, ...], binary_default: bool
) -> list[RequestedOutput]:
    if outputs is None or outputs == []:
        return [RequestedOutput(n, binary_default) for n in output_names]
    if not isinstance(outputs, list):
        raise ProtocolError(f"'outputs' must be a list, got {type(outputs).__name__}")
    result: list[RequestedOutput] = []
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ProtocolError(f"outputs[{i}] must be an object with a string 'name'")
        check_output_name(out["name"], output_names)
        binary = _parameters(out, f"output {out['name']!r}").get("binary_data", binary_default)
        result.append(RequestedOutput(out["name"], binary is True))
    return result


def check_output_name(name: str, output_names: tuple[str, ...]) -> None:
    """Raise ProtocolError 400 naming ``name`` unless it is one of ``output_names``."""
    if name not in output_names:
        known = ", ".join(repr(n) for n in output_names)
        raise ProtocolError(f"unknown output {name!r}; the model's outputs are {known}")


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: list[tuple[RequestedOutput, str, np.ndarray]],
    parameters: dict[str, str | int | bool] | None = None,
) -> tuple[bytes, int | None]:
    """Encode an inference response.

    Args:
        outputs: (requested output, OIP datatype, array) in the order to return them.
        parameters: the response's ``parameters`` (omitted when empty).
    Returns:
        (body, json_length): ``json_length`` is None for a pure JSON body, else the length of the
        JSON header for the ``Inference-Header-Content-Length`` response header.
    """
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for requested, datatype, arr in outputs:
        t: dict[str, Any] = {"name": requested.name, "datatype": datatype, "shape": list(arr.shape)}
        if requested.binary:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            t["data"] = arr.ravel().tolist()
        tensors.append(t)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "id": request_id}
    if parameters:
        doc["parameters"] = parameters
    doc["outputs"] = tensors
    header = _dumps(doc)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_body(message: str) -> bytes:
    """The spec's error object ``{"error": "<message>"}`` as bytes."""
    return json.dumps({"error": message}).encode()


def json_body(doc: Any) -> bytes:
    """Compact JSON bytes of ``doc``."""
    return json.dumps(doc, separators=(",", ":")).encode()
