"""The gRPC endpoint: the KServe v2 / Triton API (`inference.GRPCInferenceService`) over one data plane.

A gRPC client (`tritonclient.grpc`, or any stub generated from Triton's `grpc_service.proto`) gets what
an HTTP client gets: the same health, metadata, configuration and statistics, and `ModelInfer` through
the data plane's admission, decode threads and dynamic batcher, in the same event loop as the HTTP
server, so requests of both protocols share one queue and one backend batch. Tensors come as
`raw_input_contents` (what tritonclient sends) or typed `contents`; outputs go back as
`raw_output_contents`, as Triton answers. A refusal is the HTTP one-line message under the gRPC code of
`runtime.serve.failures.GRPC_STATUS`. The messages are the ones tritonclient ships, so the wire format is
Triton's own; `ModelInfer` takes its message as bytes, parsed in a decode thread like an HTTP body.

Deadlines: the handler runs once a message has fully arrived, so a slow or stalled upload holds no
queue slot; a connection must finish its handshake within `HANDSHAKE_S`, one idle for `IDLE_S` is
closed, a message over --max-request-bytes is refused by gRPC itself (RESOURCE_EXHAUSTED, before this
server sees it, so it is not in the statistics), a client's own deadline cancels its call, and the server
stops with the HTTP server's drain (`GrpcEndpoint.beside`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from runtime.errors import UsageError
from runtime.serve.dataplane import VERSION, DataPlane
from runtime.serve.failures import GRPC_STATUS, BadRequest, Internal, RequestFailure, Unsupported, status_of
from runtime.serve.protocol import DTYPES, InferRequest, Output, RequestedOutput, Tensor, binary_tensor, raw_tensor
from runtime.serve.rest import UNSUPPORTED as ROUTES
from runtime.serve.server import bind

# Typed `InferTensorContents` field of each datatype (FP16 has none: it travels only as raw contents).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
SHARED_MEMORY, REPOSITORY = ROUTES["/v2/systemsharedmemory"], ROUTES["/v2/repository"]
UNSUPPORTED = {  # Triton's methods for extensions this server does not have -> what the answer says, as over HTTP
    "ModelStreamInfer": "streaming inference is not supported; use ModelInfer",
    "RepositoryIndex": REPOSITORY, "RepositoryModelLoad": REPOSITORY, "RepositoryModelUnload": REPOSITORY,
    "SystemSharedMemoryStatus": SHARED_MEMORY, "SystemSharedMemoryRegister": SHARED_MEMORY,
    "SystemSharedMemoryUnregister": SHARED_MEMORY, "CudaSharedMemoryStatus": SHARED_MEMORY,
    "CudaSharedMemoryRegister": SHARED_MEMORY, "CudaSharedMemoryUnregister": SHARED_MEMORY,
    "TraceSetting": ROUTES["/v2/trace"], "LogSettings": ROUTES["/v2/logging"],
}
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
HANDSHAKE_S = 10  # a connection that has not finished its HTTP/2 handshake by then is closed
IDLE_S = 60  # a connection without an open call for that long is closed (clients reconnect by themselves)
STREAM_HEADROOM = 8  # streams per connection beyond --max-queue-size
STOP_GRACE_S = 5.0  # after a drain that answered everything: how long metadata or health calls still open may finish
Answer = TypeVar("Answer")


def _parameters(params: Any) -> dict[str, Any]:
    """A protobuf `map<string, InferParameter>` as the plain values the HTTP request's `parameters` hold."""
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in params.items()}


def _tensor(t: Any, raw: bytes | None) -> Tensor:
    """One `InferInputTensor` with its raw bytes (or None: typed `contents`) as the HTTP parser's `Tensor`."""
    name, datatype = t.name, t.datatype
    if "shared_memory_region" in t.parameters:
        raise Unsupported(f"input {name!r}: {SHARED_MEMORY}")
    if datatype not in DTYPES:
        raise BadRequest(f"input {name!r}: unknown datatype {datatype!r}")
    if any(d < 0 for d in t.shape):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers, got {list(t.shape)}")
    shape = tuple(int(d) for d in t.shape)
    if raw is not None:
        data = binary_tensor(raw, name, datatype, shape)
    elif datatype in CONTENTS:
        values = getattr(t.contents, CONTENTS[datatype])
        data = list(values) if datatype == "BYTES" else np.asarray(values, dtype=DTYPES[datatype])
    else:
        raise BadRequest(f"input {name!r}: {datatype} data must come in raw_input_contents")
    if len(data) != math.prod(shape):
        raise BadRequest(f"input {name!r}: {len(data)} elements for shape {list(shape)}")
    return Tensor(name, datatype, shape, data)


def infer_request(msg: pb.ModelInferRequest) -> InferRequest:
    """A `ModelInferRequest` as the protocol's request, which the data plane checks as it checks HTTP's."""
    raw: Sequence[bytes | None] = list(msg.raw_input_contents) or [None] * len(msg.inputs)
    if len(raw) != len(msg.inputs):
        raise BadRequest(f"{len(msg.raw_input_contents)} raw_input_contents for {len(msg.inputs)} inputs; "
                         "send one per input, in order")
    if not msg.inputs:
        raise BadRequest("the request needs a non-empty 'inputs' list")
    inputs: dict[str, Tensor] = {}
    for t, contents in zip(msg.inputs, raw):
        if t.name in inputs:
            raise BadRequest(f"input {t.name!r} appears twice")
        inputs[t.name] = _tensor(t, contents)
    outputs: list[RequestedOutput] = []
    for o in msg.outputs:
        params = _parameters(o.parameters)
        if "shared_memory_region" in params:
            raise Unsupported(f"output {o.name!r}: {SHARED_MEMORY}")
        if any(o.name == seen.name for seen in outputs):
            raise BadRequest(f"output {o.name!r} is requested twice")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BadRequest(f"output {o.name!r}: classification must be a non-negative integer")
        outputs.append(RequestedOutput(o.name, True, k))
    return InferRequest(msg.id or None, inputs, outputs or None, True, _parameters(msg.parameters))


def infer_response(model: str, req: InferRequest, outputs: list[Output]) -> pb.ModelInferResponse:
    """The outputs as Triton answers over gRPC: every output's bytes in `raw_output_contents`."""
    response = pb.ModelInferResponse(model_name=model, model_version=VERSION, id=req.id or "")
    for name, datatype, array, _ in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(raw_tensor(datatype, array))
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over one data plane; each method translates gRPC to a data-plane call and
    back, and every refusal goes out through `answer` with its code from `GRPC_STATUS`."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def answer(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[Answer]]) -> Answer:
        """`call`'s answer, or its refusal under the failure's gRPC code; a fault of the server's own is one line
        in the log and INTERNAL to the client, and the server serves on."""
        try:
            return await call()
        except RequestFailure as failure:
            refusal = failure
        except Exception as err:  # a bug
            line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"serve: internal error on a gRPC call: {line}", file=sys.stderr, flush=True)
            refusal = Internal(f"internal error: {line}")
        await context.abort(status_of(type(refusal), GRPC_STATUS), str(refusal))
        raise AssertionError("unreachable: abort raises")

    async def _checked(self, name: str, version: str, answer: Callable[[], Any], message: Any) -> Any:
        self.plane.check_model(name, version)
        return json_format.ParseDict(answer(), message, ignore_unknown_fields=True)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self.plane.check_model(request.name, request.version)
        except RequestFailure:  # an unknown model is not ready, as Triton answers
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.plane.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(self.plane.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        # gRPC's metadata has no `parameters` (checkpoint, backend, ...): HTTP's metadata route shows them.
        return await self.answer(context, lambda: self._checked(request.name, request.version, self.plane.metadata,
                                                                 pb.ModelMetadataResponse()))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        return await self.answer(context, lambda: self._checked(request.name, request.version,
                                                                 lambda: {"config": self.plane.config()},
                                                                 pb.ModelConfigResponse()))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        # `queue_now`, `rejected` and `process` have no field in Triton's message: HTTP's stats route shows them.
        name = request.name or self.plane.opts.name  # no name: every model's, which is this one
        return await self.answer(context, lambda: self._checked(name, request.version, self.plane.statistics,
                                                                 pb.ModelStatisticsResponse()))

    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        """The message comes unparsed (`handlers`): the data plane parses it in a decode thread, as an HTTP body."""
        async def arrived(limit: int) -> bytes:  # gRPC itself refuses a message over the limit (module docstring)
            return request

        async def infer() -> pb.ModelInferResponse:
            req, outputs = await self.plane.infer(arrived, self.parse)
            return infer_response(self.plane.opts.name, req, outputs)

        return await self.answer(context, infer)

    def parse(self, data: bytes) -> InferRequest:
        """A `ModelInferRequest`'s bytes -> the protocol's request, for the model this server holds."""
        try:
            msg = pb.ModelInferRequest.FromString(data)
        except DecodeError as err:
            raise BadRequest(f"not a ModelInferRequest message ({err})") from None
        self.plane.check_model(msg.model_name, msg.model_version)
        return infer_request(msg)

    async def ModelStreamInfer(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        """Refused, and counted as a refused inference request (HTTP has no such route to count)."""
        async def refuse() -> NoReturn:
            failure = Unsupported(UNSUPPORTED["ModelStreamInfer"])
            self.plane.count_failure(failure)
            raise failure

        await self.answer(context, refuse)
        raise AssertionError("unreachable: answer raises")


def _unsupported(message: str) -> Callable[..., Awaitable[NoReturn]]:
    async def refuse(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        async def unsupported() -> NoReturn:
            raise Unsupported(message)

        await self.answer(context, unsupported)
        raise AssertionError("unreachable: answer raises")

    return refuse


for _method, _message in UNSUPPORTED.items():
    if _method != "ModelStreamInfer":
        setattr(InferenceServicer, _method, _unsupported(_message))


def handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's methods as the proto declares them, each (de)serialized with its generated message, except that
    `ModelInfer` takes its request as bytes."""
    table: dict[str, grpc.RpcMethodHandler] = {}
    for method in SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        table[method.name] = make(getattr(servicer, method.name),
                                  request_deserializer=None if method.name == "ModelInfer" else request.FromString,
                                  response_serializer=response.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, table)


def address(host: str, port: int) -> str:
    """host:port as gRPC and the ready line write it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reserve_port(host: str, port: int) -> int:
    """The gRPC port, checked free before the model loads (a taken one is a usage error at once); 0 picks a free one.
    gRPC binds it itself once the event loop runs: another process could take it in between, which
    `GrpcEndpoint.start` reports as the same usage error."""
    sock = bind(host, port, "--grpc-port")
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


class GrpcEndpoint:
    """The gRPC server beside the HTTP one, in its event loop: it serves while HTTP serves (`beside`)."""

    def __init__(self, plane: DataPlane, host: str, port: int) -> None:
        self.plane, self.where = plane, address(host, port)
        limit = plane.opts.max_request_bytes
        self.options = [
            ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent share
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_S * 1000),
            ("grpc.max_connection_idle_ms", IDLE_S * 1000),
            # Calls past this wait in the client's transport (backpressure), so one connection cannot open thousands of
            # half-sent uploads; the headroom lets health and metadata calls through beside a full queue.
            ("grpc.max_concurrent_streams", plane.opts.max_queue + STREAM_HEADROOM),
        ]

    async def beside(self, serve_http: Callable[[], Awaitable[None]], grace: Callable[[], float]) -> None:
        """Serve gRPC while `serve_http` serves; once it has drained and returned, stop within `grace()` seconds
        (0 once the drain cut requests or a second signal came), cancelling the calls still open."""
        server = grpc.aio.server(options=self.options)
        server.add_generic_rpc_handlers((handlers(InferenceServicer(self.plane)),))
        try:
            server.add_insecure_port(self.where)
        except RuntimeError as err:
            raise UsageError(f"{self.where}: cannot listen for gRPC ({err}); choose another --grpc-port") from None
        await server.start()
        try:
            await serve_http()
        finally:
            await server.stop(min(STOP_GRACE_S, grace()))
