"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on ``--grpc-port``.

The service of KServe's and Triton's ``grpc_predict_v2.proto`` (:mod:`kiln.server.oip`), served by
``grpc.aio`` on the server's event loop next to REST and sharing its
:class:`~kiln.server.core.InferenceCore` (model, batcher, cache, metrics, readiness), so
``tritonclient.grpc`` and KServe's ``InferenceGRPCClient`` work unchanged.

ModelInfer accepts an input's values either as ``raw_input_contents`` (little-endian bytes, what
``tritonclient.grpc`` sends; the only way to send FP16) or as the typed ``contents`` field of its
datatype (``fp32_contents``, ``int_contents`` for INT8/16/32, ...). The answer uses the same
representation as the request: ``raw_output_contents`` for a raw request, typed ``contents``
otherwise. Validation is the REST path's (:mod:`kiln.server.protocol`): the same checks, with the
same messages naming the input.

Errors are call statuses (:data:`GRPC_CODES`): INVALID_ARGUMENT for a bad request, NOT_FOUND for an
unknown model or version, RESOURCE_EXHAUSTED for a message over ``--max-request-bytes``, INTERNAL
for an injected or internal failure, UNAVAILABLE while shutting down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
import numpy as np

from kiln import __version__
from kiln.server.core import EXTENSIONS, SERVER_NAME, InferenceCore, OutputTensor, request_id
from kiln.server.oip import grpc_predict_v2_pb2 as pb
from kiln.server.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from kiln.server.protocol import (
    InferRequest,
    ProtocolError,
    RequestedOutput,
    TensorMetadata,
    check_batch,
    check_output_name,
    check_shape,
    choose_signature,
    convert_input,
    deserialize_bytes,
    input_dtype,
    match_inputs,
)

#: gRPC status of each HTTP status the core answers with (anything else: INTERNAL).
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}

#: The ``InferTensorContents`` field holding each datatype's values (FP16 has none: raw only).
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def decode_infer_request(
    msg: pb.ModelInferRequest,
    *,
    inputs: Sequence[TensorMetadata],
    output_names: tuple[str, ...],
    entity_inputs: Sequence[TensorMetadata] = (),
) -> InferRequest:
    """Validate a ``ModelInferRequest`` against the model's input signature.

    The checks are REST's (:mod:`kiln.server.protocol`): every model input exactly once, by name;
    a numeric datatype; a shape fitting the signature; values converted to the model's datatype
    (finite floats, integers in range); the same row count for every input.

    Args:
        msg: the request (its model name and version are checked by the caller).
        inputs: the model's inputs (name, datatype, shape with -1 for free dimensions).
        output_names: outputs the client may request (all of them by default).
        entity_inputs: the entity keys a request may send instead of ``inputs``
            (:func:`kiln.server.protocol.choose_signature`; BYTES keys raw in Triton's
            serialization or as ``bytes_contents``).
    Returns:
        The request with one array per model input (or ``entities`` for entity keys); its
        outputs are ``binary`` (answered in ``raw_output_contents``) when the inputs came as
        ``raw_input_contents``.
    Raises:
        ProtocolError: 400 with a message naming the input or output at fault.
    """
    names = [t.name for t in msg.inputs]
    signature, keyed = choose_signature(names, inputs, entity_inputs)
    specs = match_inputs(names, signature)
    raw = len(msg.raw_input_contents) > 0
    if raw and len(msg.raw_input_contents) != len(msg.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(msg.raw_input_contents)} entries for {len(msg.inputs)} input(s)"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, (tensor, spec) in enumerate(zip(msg.inputs, specs, strict=True)):
        data = msg.raw_input_contents[i] if raw else None
        arrays[spec.name] = _decode_input(tensor, data, i, spec)
    check_batch(arrays)
    outputs = [RequestedOutput(n, raw) for n in output_names]
    if msg.outputs:
        outputs = []
        for out in msg.outputs:
            check_output_name(out.name, output_names)
            outputs.append(RequestedOutput(out.name, raw))
    ordered = {t.name: arrays[t.name] for t in signature}
    if keyed:
        return InferRequest(id=msg.id or None, inputs={}, outputs=outputs, entities=ordered)
    return InferRequest(id=msg.id or None, inputs=ordered, outputs=outputs)


def _decode_input(
    tensor: pb.ModelInferRequest.InferInputTensor, data: bytes | None, index: int, spec: TensorMetadata
) -> np.ndarray:
    """One input's values (``data``: its ``raw_input_contents`` entry, None for typed contents)."""
    name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
    dtype = input_dtype(name, datatype, spec)
    shape = check_shape(name, shape, spec)
    count = int(np.prod(shape))
    if data is not None:
        if tensor.HasField("contents"):
            raise ProtocolError(f"input {name!r} has contents while the request uses raw_input_contents")
        if dtype.kind == "O":  # BYTES: Triton's length-prefixed serialization
            arr = deserialize_bytes(name, data, count)
        elif len(data) != count * dtype.itemsize:
            raise ProtocolError(
                f"input {name!r}: raw_input_contents[{index}] has {len(data)} bytes but shape {shape} "
                f"of {datatype} needs {count * dtype.itemsize}"
            )
        else:
            arr = np.frombuffer(data, dtype=dtype)
    else:
        field = CONTENTS_FIELDS.get(datatype)
        if field is None:
            raise ProtocolError(f"input {name!r}: {datatype} values can only be sent as raw_input_contents")
        values = getattr(tensor.contents, field)
        if len(values) != count:
            raise ProtocolError(
                f"input {name!r} has {len(values)} values in contents.{field} but shape {shape} needs {count}"
            )
        # the typed field is wider than the datatype (int_contents for INT8): check its range
        arr = convert_input(name, np.asarray(values, dtype=object if dtype.kind == "O" else None), datatype)
    return convert_input(name, arr.reshape(shape), spec.datatype)


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: list[OutputTensor],
    parameters: Mapping[str, str | int | bool] | None = None,
) -> pb.ModelInferResponse:
    """A ``ModelInferResponse``: binary outputs in ``raw_output_contents`` (little-endian), others typed.

    All outputs are raw when one is binary or has a datatype without a typed field (FP16).
    ``parameters`` become the response's ``InferParameter`` map (``string_param``,
    ``int64_param`` or ``bool_param`` by type).
    """
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            response.parameters[key].bool_param = value
        elif isinstance(value, int):
            response.parameters[key].int64_param = value
        else:
            response.parameters[key].string_param = value
    # raw for every output or for none (the proto's rule); FP16 has no typed field: raw then
    raw = any(o.requested.binary or o.datatype not in CONTENTS_FIELDS for o in outputs)
    for out in outputs:
        arr = out.array
        tensor = response.outputs.add(name=out.requested.name, datatype=out.datatype, shape=list(arr.shape))
        if raw:
            data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            response.raw_output_contents.append(data)
        else:
            getattr(tensor.contents, CONTENTS_FIELDS[out.datatype]).extend(arr.ravel().tolist())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over an :class:`InferenceCore`."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    async def _abort(self, context: grpc.aio.ServicerContext, e: ProtocolError) -> None:
        await context.abort(GRPC_CODES.get(e.status, grpc.StatusCode.INTERNAL), e.message)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Always live while the process answers."""
        with self.core.track():
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Ready until shutdown begins (the REST readiness)."""
        with self.core.track():
            return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """The served model's readiness; NOT_FOUND for another model or version."""
        with self.core.track():
            try:
                self.core.check_model(request.name, request.version or None)
            except ProtocolError as e:
                await self._abort(context, e)
            return pb.ModelReadyResponse(ready=self.core.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Name, version and extensions (as ``GET /v2``)."""
        with self.core.track():
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """As ``GET /v2/models/{name}``; NOT_FOUND for another model or version."""
        with self.core.track():
            try:
                self.core.check_model(request.name, request.version or None)
            except ProtocolError as e:
                await self._abort(context, e)
            meta = self.core.metadata()
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
            )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Inference through the shared core (batcher, cache, metrics with ``protocol="grpc"``)."""
        core = self.core

        async def decode() -> InferRequest:
            core.check_model(request.model_name, request.model_version or None)
            return decode_infer_request(
                request, inputs=core.inputs, output_names=core.output_names, entity_inputs=core.entity_inputs
            )

        def encode(parsed: InferRequest, outputs: list[OutputTensor]) -> pb.ModelInferResponse:
            return encode_infer_response(
                model_name=core.model.name,
                model_version=core.model.version,
                request_id=request_id(parsed),
                outputs=outputs,
                parameters=parsed.parameters,
            )

        with core.track():
            try:
                return await core.infer("grpc", decode, encode)
            except ProtocolError as e:
                await self._abort(context, e)
                raise AssertionError("unreachable: abort raises") from None


class GrpcServer:
    """A ``grpc.aio`` server of :class:`InferenceServicer` on one port."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host`` (empty: all interfaces) and ``port`` (0: any free one); return the port.

        Raises:
            OSError: the address cannot be bound (also when another process holds the port:
                SO_REUSEPORT, on by default in gRPC, is turned off).
        """
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", self.core.settings.max_request_bytes),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.core), server)
        address = f"[::]:{port}" if not host else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot bind gRPC port {address}: {e}") from None
        if bound == 0:
            raise OSError(f"cannot bind gRPC port {address}")
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace: float) -> None:
        """Refuse new calls (UNAVAILABLE) and give in-flight ones ``grace`` seconds, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
