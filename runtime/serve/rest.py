"""The HTTP endpoint: the Open Inference Protocol's REST routes (as Triton serves them) over one data plane.

Each route only translates: the path's model and version, the body, the data plane's answer or its
`RequestFailure`, whose HTTP status comes from `runtime.serve.failures.HTTP_STATUS`. Every answer is the
protocol's: an unknown route, a method a route does not take, an extension this server does not have and
a fault of its own are all `{"error": "<one line>"}`, never a plain-text page or a traceback.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.serve.dataplane import BodyBytes, DataPlane
from runtime.serve.failures import (HTTP_STATUS, BadRequest, BodyTimeout, Internal, NotFound, RequestFailure, TooLarge,
                                    Unsupported, status_of)
from runtime.serve.metrics import exposition
from runtime.serve.protocol import HEADER_LENGTH, encode_response

Endpoint = Callable[[Request], Awaitable[Response]]
# Triton's routes for extensions this server does not have -> what the answer says
UNSUPPORTED = {
    "/v2/repository": "model repository control is not supported: this server holds the one model given by --model",
    "/v2/systemsharedmemory": "shared memory is not supported; send the tensor in the body",
    "/v2/cudasharedmemory": "shared memory is not supported; send the tensor in the body",
    "/v2/trace": "trace settings are not supported",
    "/v2/logging": "log settings are not supported",
}
CLOSES = (BodyTimeout, TooLarge)  # answered before the whole body was read: the connection cannot carry another request


def error_response(failure: RequestFailure) -> Response:
    """The protocol's error answer: `{"error": "<one line>"}` with the failure's HTTP status."""
    headers = {"Connection": "close"} if isinstance(failure, CLOSES) else None
    return JSONResponse({"error": str(failure)}, status_code=status_of(type(failure), HTTP_STATUS), headers=headers)


def answering(endpoint: Endpoint) -> Endpoint:
    """`endpoint` with its failures answered in the protocol's form, a fault of the server's own included."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RequestFailure as failure:
            return error_response(failure)
        except Exception as err:  # a bug: one line in the log and in the answer, and the server serves on
            line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"serve: internal error on {request.method} {request.url.path}: {line}", file=sys.stderr, flush=True)
            return error_response(Internal(f"internal error: {line}"))

    return guarded


class Endpoints:
    """The routes' handlers over one data plane; each translates HTTP to a data-plane call and back."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def _check(self, request: Request) -> None:
        self.plane.check_model(request.path_params.get("model"), request.path_params.get("version"))

    def _readiness(self, body: dict[str, object]) -> Response:
        ready = self.plane.ready()
        return JSONResponse({**body, "ready": ready}, status_code=200 if ready else 503)

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        return self._readiness({})

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(self.plane.server_metadata())

    async def all_stats(self, request: Request) -> Response:
        return JSONResponse(self.plane.statistics())

    async def metrics(self, request: Request) -> Response:
        content, kind = exposition(self.plane.registry)
        return Response(content, media_type=kind)

    async def model_metadata(self, request: Request) -> Response:
        self._check(request)
        return JSONResponse(self.plane.metadata())

    async def model_ready(self, request: Request) -> Response:
        self._check(request)
        return self._readiness({"name": self.plane.opts.name})

    async def model_config(self, request: Request) -> Response:
        self._check(request)
        return JSONResponse(self.plane.config())

    async def model_stats(self, request: Request) -> Response:
        self._check(request)
        return JSONResponse(self.plane.statistics())

    async def infer(self, request: Request) -> Response:
        """The body is read under --body-timeout, and its header fields count in --max-request-bytes."""
        self._check(request)
        deadline = asyncio.get_running_loop().time() + self.plane.opts.body_timeout_s
        header_bytes = len(request.url.path) + sum(len(k) + len(v) + 4 for k, v in request.headers.raw)

        async def body(limit: int) -> bytes:
            return await read_body(request, limit - header_bytes, deadline, self.plane.body_bytes)

        header_length = request.headers.get(HEADER_LENGTH)
        req, outputs = await self.plane.infer(body, lambda data: self.plane.parse_http(data, header_length))
        content, headers = encode_response(self.plane.opts.name, req.id, outputs)
        return Response(content, headers=headers)

    @staticmethod
    def unsupported(message: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            raise Unsupported(message)

        return endpoint

    @staticmethod
    async def no_route(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}"}, status_code=405)
        return error_response(NotFound(f"no route {request.method} {request.url.path}; this server has Triton's /v2 "
                                       "routes for one model, and /metrics"))


def build_app(plane: DataPlane) -> Starlette:
    """The Starlette application: the protocol's routes over one `DataPlane`."""
    e = Endpoints(plane)

    def route(path: str, endpoint: Endpoint, methods: list[str] | None = None) -> Route:
        return Route(path, answering(endpoint), methods=methods)

    def model(path: str, endpoint: Endpoint, methods: list[str] | None = None) -> list[Route]:
        return [route(f"/v2/models/{{model}}{path}", endpoint, methods),
                route(f"/v2/models/{{model}}/versions/{{version}}{path}", endpoint, methods)]

    both = ["GET", "POST"]
    extensions = [route(f"{prefix}{tail}", e.unsupported(message), both)
                  for prefix, message in UNSUPPORTED.items() for tail in ("", "/{rest:path}")]
    routes = [route("/v2/health/live", e.live), route("/v2/health/ready", e.server_ready), route("/v2", e.server_metadata),
              route("/v2/models/stats", e.all_stats), route("/metrics", e.metrics), *extensions,
              *model("", e.model_metadata), *model("/ready", e.model_ready), *model("/config", e.model_config),
              *model("/stats", e.model_stats), *model("/trace/setting", e.unsupported(UNSUPPORTED["/v2/trace"]), both),
              *model("/infer", e.infer, ["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: e.no_route})


async def read_body(request: Request, limit: int, deadline: float, arriving: BodyBytes) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (--max-request-bytes less the header fields;
    declared, received or decompressed) or `deadline` (the loop's clock) passes before it has all arrived;
    what arrived is held against `arriving`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request is larger than --max-request-bytes allows ({declared} bytes of body, {limit} "
                       "left after its headers)")
    chunks: list[bytes] = []
    size = 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            arriving.take(len(chunk))
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request is larger than --max-request-bytes allows (more than {limit} bytes of body "
                               "received, the room left after its headers)")

    try:
        await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
    except asyncio.TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within --body-timeout ({size} of "
                          f"{declared or 'unknown'} bytes received)") from None
    except ClientDisconnect:
        raise BadRequest("the client closed the connection before the whole body arrived") from None
    finally:
        arriving.give(size)
    return inflate(b"".join(chunks), request.headers.get("content-encoding", "identity").lower(), limit)


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body decompressed, refused once it passes `limit` bytes."""
    if encoding == "identity":
        return data
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        data = decompressor.decompress(data, limit + 1)
    except zlib.error as err:
        raise BadRequest(f"the {encoding} request body cannot be decompressed ({err})") from None
    if len(data) > limit:
        raise TooLarge(f"the request is larger than --max-request-bytes allows (more than {limit} bytes of body "
                       "once decompressed)")
    return data
