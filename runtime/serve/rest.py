"""The HTTP endpoint: the Open Inference Protocol's REST routes (as Triton serves them) over one data plane.

Each route only translates: the path's model and version, the body, the data plane's answer or its
`RequestFailure`, whose HTTP status comes from `runtime.serve.failures.HTTP_STATUS`.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.serve.dataplane import DataPlane
from runtime.serve.failures import HTTP_STATUS, BadRequest, RequestFailure, TooLarge, status_of
from runtime.serve.protocol import HEADER_LENGTH

Endpoint = Callable[[Request], Awaitable[Response]]


def error_response(failure: RequestFailure) -> Response:
    """The protocol's error answer: `{"error": "<one line>"}` with the failure's HTTP status."""
    return JSONResponse({"error": str(failure)}, status_code=status_of(failure, HTTP_STATUS))


def build_app(plane: DataPlane) -> Starlette:
    """The Starlette application: the protocol's routes over one `DataPlane`."""

    def model_route(answer: Callable[[Request], Response]) -> Endpoint:
        """A route under /v2/models/<model>[/versions/<version>]: 404 unless it names the model served."""

        async def endpoint(request: Request) -> Response:
            try:
                plane.check_model(request.path_params.get("model"), request.path_params.get("version"))
            except RequestFailure as failure:
                return error_response(failure)
            return answer(request)

        return endpoint

    def readiness(body: dict[str, Any]) -> Response:
        return JSONResponse({**body, "ready": plane.ready()}, status_code=200 if plane.ready() else 503)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(request: Request) -> Response:
        return readiness({})

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(plane.server_metadata())

    async def all_stats(request: Request) -> Response:
        return JSONResponse(plane.statistics())

    async def infer(request: Request) -> Response:
        try:
            plane.check_model(request.path_params.get("model"), request.path_params.get("version"))
            content, headers = await plane.infer(lambda limit: read_body(request, limit), request.headers.get(HEADER_LENGTH))
        except RequestFailure as failure:
            return error_response(failure)
        return Response(content, headers=headers)

    def both(path: str, endpoint: Endpoint, methods: list[str] | None = None) -> list[Route]:
        return [Route(f"/v2/models/{{model}}{path}", endpoint, methods=methods),
                Route(f"/v2/models/{{model}}/versions/{{version}}{path}", endpoint, methods=methods)]

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", server_ready), Route("/v2", server_metadata),
              Route("/v2/models/stats", all_stats),
              *both("", model_route(lambda r: JSONResponse(plane.metadata()))),
              *both("/ready", model_route(lambda r: readiness({"name": plane.opts.name}))),
              *both("/config", model_route(lambda r: JSONResponse(plane.config()))),
              *both("/stats", model_route(lambda r: JSONResponse(plane.statistics()))),
              *both("/infer", infer, ["POST"])]
    return Starlette(routes=routes)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (declared, received or decompressed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request is larger than --max-request-bytes {limit} ({declared} bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request is larger than --max-request-bytes {limit} (more than {limit} bytes received)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client closed the connection before the whole body arrived") from None
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
        raise TooLarge(f"the request is larger than --max-request-bytes {limit} (more than {limit} bytes once decompressed)")
    return data
