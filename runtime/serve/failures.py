"""Why a request gets no answer but an error: one exception class per reason, and the one table that maps
each to its HTTP status.

The data plane raises these; every endpoint (HTTP here, gRPC beside it) turns them into its protocol's
status with the same one-line message, so a client sees the same reason whichever protocol it speaks.
A new endpoint adds its own code per class beside `HTTP_STATUS` and looks it up with `status_of`.
"""

from __future__ import annotations

from typing import ClassVar


class RequestFailure(Exception):
    """A request the server answers with an error; the message is one line naming what is wrong.
    `reason` labels it in the statistics and metrics (rejections by reason)."""

    reason: ClassVar[str] = "error"


class BadRequest(RequestFailure):
    """Not valid protocol, or not what this model takes (names, datatypes, shapes, parameters, images)."""

    reason = "bad_request"


class NotFound(RequestFailure):
    """An unknown model, version or route."""

    reason = "not_found"


class Unsupported(RequestFailure):
    """A protocol extension this server does not have (shared memory, repository control, tracing, logging)."""

    reason = "unsupported"


class TooLarge(RequestFailure):
    """A body over --max-request-bytes (declared, received or decompressed) or JSON over --max-json-bytes."""

    reason = "too_large"


class Overloaded(RequestFailure):
    """--max-queue-size requests already held: refused at once rather than queued without bound."""

    reason = "queue_full"


class ShuttingDown(RequestFailure):
    """The server drains: it answers what it holds, takes nothing new."""

    reason = "shutting_down"


class InferenceFailed(RequestFailure):
    """The backend failed on the batch that held this request: a server fault; the server serves on."""

    reason = "inference_failed"


# Failure type -> HTTP status. The one table: an endpoint for another protocol keeps its codes beside it.
HTTP_STATUS: dict[type[RequestFailure], int] = {
    BadRequest: 400,
    NotFound: 404,
    Unsupported: 400,
    TooLarge: 413,
    Overloaded: 503,
    ShuttingDown: 503,
    InferenceFailed: 500,
}


def status_of(failure: RequestFailure, table: dict[type[RequestFailure], int]) -> int:
    """The code `table` gives `failure`'s class (or its nearest listed base)."""
    for kind in type(failure).__mro__:
        if kind in table:
            return table[kind]
    raise KeyError(f"{type(failure).__name__} has no entry in the failure table")
