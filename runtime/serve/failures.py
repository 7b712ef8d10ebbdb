"""Why a request gets no answer but an error: one exception class per reason, and the tables that map each
to its HTTP status and its gRPC status code.

The data plane raises these; every endpoint (HTTP, gRPC) turns them into its protocol's status with the
same one-line message, so a client sees the same reason whichever protocol it speaks. Each endpoint
looks its code up with `status_of` in its table here, so the two tables are read side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, TypeVar

from grpc import StatusCode


class RequestFailure(Exception):
    """A request the server answers with an error; the message is one line naming what is wrong.
    `reason` labels it in the statistics and metrics (rejections by reason)."""

    reason: ClassVar[str] = "error"
    triton_reason: ClassVar[str] = "OTHER"  # the `reason` label of Triton's nv_inference_request_failure


class BadRequest(RequestFailure):
    """Not valid protocol, or not what this model takes (names, datatypes, shapes, parameters, images)."""

    reason = "bad_request"


class NotFound(RequestFailure):
    """An unknown model, version or route."""

    reason = "not_found"


class Unsupported(RequestFailure):
    """A protocol extension this server does not have (shared memory, repository control, tracing, logging)."""

    reason = "unsupported"


class BodyTimeout(RequestFailure):
    """The body did not fully arrive within --body-timeout: the request is answered and its connection closed."""

    reason = "body_timeout"


class HeadersTooLarge(RequestFailure):
    """More header bytes or fields than the server reads."""

    reason = "headers_too_large"


class TooLarge(RequestFailure):
    """A body over --max-request-bytes (declared, received or decompressed) or JSON over --max-json-bytes."""

    reason = "too_large"


class Overloaded(RequestFailure):
    """--max-queue-size requests already held, too many bytes of bodies arriving, or as many connections as the
    open-file limit allows: refused at once rather than queued without bound."""

    reason = "queue_full"
    triton_reason = "REJECTED"


class ShuttingDown(RequestFailure):
    """The server drains: it answers what it holds, takes nothing new."""

    reason = "shutting_down"
    triton_reason = "REJECTED"


class InferenceFailed(RequestFailure):
    """The backend failed on the batch that held this request: a server fault; the server serves on."""

    reason = "inference_failed"
    triton_reason = "BACKEND"


class Internal(RequestFailure):
    """A fault of this server's own (a bug): answered in the protocol's form, the server serves on."""

    reason = "internal"


# Failure type -> HTTP status.
HTTP_STATUS: dict[type[RequestFailure], int] = {
    BadRequest: 400,
    NotFound: 404,
    Unsupported: 501,
    BodyTimeout: 408,
    TooLarge: 413,
    HeadersTooLarge: 431,
    Overloaded: 503,
    ShuttingDown: 503,
    InferenceFailed: 500,
    Internal: 500,
}


# Failure type -> gRPC status code, the codes Triton and KServe answer the same cases with; the rest (a failed
# inference, a fault of the server's own) is INTERNAL. Header limits are HTTP's alone.
GRPC_STATUS: dict[type[RequestFailure], StatusCode] = {
    BadRequest: StatusCode.INVALID_ARGUMENT,
    NotFound: StatusCode.NOT_FOUND,
    Unsupported: StatusCode.UNIMPLEMENTED,
    BodyTimeout: StatusCode.DEADLINE_EXCEEDED,
    TooLarge: StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: StatusCode.UNAVAILABLE,
    ShuttingDown: StatusCode.UNAVAILABLE,
    RequestFailure: StatusCode.INTERNAL,
}

Code = TypeVar("Code")


def status_of(failure: type[RequestFailure], table: Mapping[type[RequestFailure], Code]) -> Code:
    """The code `table` gives the failure class (or its nearest listed base)."""
    for kind in failure.__mro__:
        if kind in table:
            return table[kind]
    raise KeyError(f"{failure.__name__} has no entry in the failure table")
