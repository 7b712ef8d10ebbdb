"""The KServe v2 / Triton gRPC API (`inference.GRPCInferenceService`) over runtime.serve's `ModelServer`.

A gRPC client (`tritonclient.grpc`, or any stub generated from Triton's `grpc_service.proto`) gets what
an HTTP client gets: the same health, metadata, configuration and statistics, and `ModelInfer` through
the same admission, decode threads and dynamic batcher, in the same event loop as the HTTP server, so
requests of both protocols share one backend batch. Tensors come as `raw_input_contents` (what
tritonclient sends) or typed `contents`; outputs go back as `raw_output_contents`, as Triton answers.
A refusal is the HTTP one-line message under the matching gRPC status code (`STATUS`). The generated
messages and service are the ones tritonclient ships, so the wire format is Triton's own.

Deadlines: the handler runs once a request has fully arrived, so a slow or stalled upload holds no
queue slot; a connection must finish its handshake within `HANDSHAKE_S`, one idle for `IDLE_S` is
closed, a message over --max-request-bytes is refused by gRPC itself (RESOURCE_EXHAUSTED), a client's
own deadline cancels its request, and on shutdown the RPCs still open after `STOP_GRACE_S` are cut.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from runtime import __version__
from runtime.errors import UsageError
from runtime.oip import DTYPES, InferRequest, ProtocolError, RequestedOutput, Tensor, binary_tensor, raw_tensor
from runtime.serve import EXTENSIONS, VERSION, ModelServer, Prepared, Refused, Row, bind

# The HTTP status of a refusal -> its gRPC status code (the codes Triton and KServe use for the same cases).
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}
# Typed `InferTensorContents` field of each datatype (FP16 has none: it travels only as raw contents).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
SHARED_MEMORY = "shared memory is not supported; send the tensor in the body"
HANDSHAKE_S = 10  # a connection that has not finished its HTTP/2 handshake by then is closed
IDLE_S = 60  # a connection without an open RPC for that long is closed (clients reconnect by themselves)
STREAM_HEADROOM = 8  # streams per connection beyond --max-queue-size
STOP_GRACE_S = 5.0  # on shutdown, after the drain: how long metadata or health RPCs still open may finish


def _parameters(params: Any) -> dict[str, Any]:
    """A protobuf `map<string, InferParameter>` as the plain values the HTTP request's `parameters` hold."""
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param") for key, value in params.items()}


def _tensor(t: Any, raw: bytes | None) -> Tensor:
    """One `InferInputTensor` with its raw bytes (or None: typed `contents`) as the HTTP parser's `Tensor`."""
    name, datatype = t.name, t.datatype
    if "shared_memory_region" in t.parameters:
        raise ProtocolError(f"input {name!r}: {SHARED_MEMORY}")
    if datatype not in DTYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {datatype!r}")
    if any(d < 0 for d in t.shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers, got {list(t.shape)}")
    shape = tuple(int(d) for d in t.shape)
    count = math.prod(shape)
    if raw is not None:
        data = binary_tensor(raw, name, datatype, shape)
    elif datatype in CONTENTS:
        values = getattr(t.contents, CONTENTS[datatype])
        data = list(values) if datatype == "BYTES" else np.asarray(values, dtype=DTYPES[datatype])
    else:
        raise ProtocolError(f"input {name!r}: {datatype} data must come in raw_input_contents")
    if len(data) != count:
        raise ProtocolError(f"input {name!r}: {len(data)} elements for shape {list(shape)}")
    return Tensor(name, datatype, shape, data)


def infer_request(msg: pb.ModelInferRequest) -> InferRequest:
    """A `ModelInferRequest` as the protocol-neutral request `ModelServer.check_request` takes."""
    raw: Sequence[bytes | None] = list(msg.raw_input_contents) or [None] * len(msg.inputs)
    if len(raw) != len(msg.inputs):
        raise ProtocolError(f"{len(msg.raw_input_contents)} raw_input_contents for {len(msg.inputs)} inputs; "
                            "send one per input, in order")
    if not msg.inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    inputs: dict[str, Tensor] = {}
    for t, contents in zip(msg.inputs, raw):
        if t.name in inputs:
            raise ProtocolError(f"input {t.name!r} appears twice")
        inputs[t.name] = _tensor(t, contents)
    outputs = []
    for o in msg.outputs:
        params = _parameters(o.parameters)
        if "shared_memory_region" in params:
            raise ProtocolError(f"output {o.name!r}: {SHARED_MEMORY}")
        if any(o.name == seen.name for seen in outputs):
            raise ProtocolError(f"output {o.name!r} is requested twice")
        k = params.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ProtocolError(f"output {o.name!r}: classification must be a non-negative integer")
        outputs.append(RequestedOutput(o.name, True, k))
    return InferRequest(msg.id or None, inputs, outputs or None, True, _parameters(msg.parameters))


def infer_response(model: ModelServer, req: InferRequest, input_name: str, rows: list[Row], k: int) -> pb.ModelInferResponse:
    """The answered rows as Triton answers over gRPC: every output's bytes in `raw_output_contents`."""
    response = pb.ModelInferResponse(model_name=model.opts.name, model_version=VERSION, id=req.id or "")
    for name, datatype, array, _ in model.outputs(req, input_name, rows, k):
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(raw_tensor(datatype, array))
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over one `ModelServer`; what the server does not offer answers UNIMPLEMENTED
    saying so, instead of gRPC's bare "Method not implemented"."""

    def __init__(self, model: ModelServer) -> None:
        self.model = model

    async def _refuse(self, context: grpc.aio.ServicerContext, err: Refused) -> NoReturn:
        if err.status != 404:
            self.model.rejected[err.status] = self.model.rejected.get(err.status, 0) + 1
        await context.abort(STATUS.get(err.status, grpc.StatusCode.INTERNAL), str(err))
        raise AssertionError("unreachable: abort raises")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.model.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self.model.check_model(request.name, request.version)
        except Refused:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.model.draining)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="deit-deploy", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        try:
            self.model.check_model(request.name, request.version)
        except Refused as err:
            await self._refuse(context, err)
        # gRPC's metadata has no `parameters` (checkpoint, backend, ...): HTTP's metadata route shows them.
        return json_format.ParseDict(self.model.metadata(), pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        try:
            self.model.check_model(request.name, request.version)
        except Refused as err:
            await self._refuse(context, err)
        return json_format.ParseDict({"config": self.model.config()}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        if request.name:
            try:
                self.model.check_model(request.name, request.version)
            except Refused as err:
                await self._refuse(context, err)
        # `queue_now`, `rejected` and `process` have no field in Triton's message: HTTP's stats route shows them.
        return json_format.ParseDict(self.model.statistics(), pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        model = self.model

        async def receive() -> Callable[[], Prepared]:  # the message has arrived whole: checking it is the decode thread's
            return lambda: model.check_request(infer_request(request))

        try:
            model.check_model(request.model_name, request.model_version)
            return await model.serve_request(receive, lambda req, name, rows, k: infer_response(model, req, name, rows, k))
        except Refused as err:
            await self._refuse(context, err)

    async def ModelStreamInfer(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not supported; use ModelInfer")
        raise AssertionError("unreachable: abort raises")


def _unsupported(what: str) -> Callable[..., Any]:
    async def refuse(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, what)
        raise AssertionError("unreachable: abort raises")

    return refuse


for _method, _what in {
    "RepositoryIndex": "model repository control is not supported; this server holds one model",
    "RepositoryModelLoad": "model repository control is not supported; this server holds one model",
    "RepositoryModelUnload": "model repository control is not supported; this server holds one model",
    "SystemSharedMemoryStatus": SHARED_MEMORY, "SystemSharedMemoryRegister": SHARED_MEMORY,
    "SystemSharedMemoryUnregister": SHARED_MEMORY, "CudaSharedMemoryStatus": SHARED_MEMORY,
    "CudaSharedMemoryRegister": SHARED_MEMORY, "CudaSharedMemoryUnregister": SHARED_MEMORY,
    "TraceSetting": "trace settings are not supported", "LogSettings": "log settings are not supported",
}.items():
    setattr(InferenceServicer, _method, _unsupported(_what))


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
    """The gRPC server beside the HTTP one, in its event loop: `start` once the loop runs, `stop` after the drain."""

    def __init__(self, model: ModelServer, host: str, port: int) -> None:
        self.model, self.where = model, address(host, port)
        limit = model.opts.max_request_bytes
        self.options = [
            ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent share
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_S * 1000),
            ("grpc.max_connection_idle_ms", IDLE_S * 1000),
            # Calls past this wait in the client's transport (backpressure), so one connection cannot open thousands of
            # half-sent uploads; the headroom lets health and metadata calls through beside a full queue.
            ("grpc.max_concurrent_streams", model.opts.max_queue + STREAM_HEADROOM),
        ]
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=self.options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.model), server)
        try:
            server.add_insecure_port(self.where)
        except RuntimeError as err:
            raise UsageError(f"{self.where}: cannot listen for gRPC ({err}); choose another --grpc-port") from None
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(STOP_GRACE_S)

    async def beside(self, serve_http: Callable[[], Awaitable[None]]) -> None:
        """Serve gRPC while the HTTP server serves; gRPC stops once HTTP has drained and returned."""
        await self.start()
        try:
            await serve_http()
        finally:
            await self.stop()

