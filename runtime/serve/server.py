"""The server process: the listening socket, uvicorn with deadlines and limits on every connection, and a
SIGTERM / SIGINT drain that always ends.

uvicorn's keep-alive timer runs only between requests and restarts on every byte, and its parser takes
headers of any size and number, so `GuardedProtocol` adds what a hostile client needs: a deadline for a
request's headers from the moment the connection opens or the last answer went out, limits on header bytes
and fields, and a refusal (503, at once) past the connections the open-file limit allows. The body's
deadline is the HTTP endpoint's (`--body-timeout`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from runtime.errors import UsageError
from runtime.serve.dataplane import DataPlane
from runtime.serve.failures import HTTP_STATUS, BadRequest, HeadersTooLarge, Overloaded, RequestFailure, status_of

MAX_HEADER_BYTES = 32 << 10  # request line and header fields, as nginx's default large_client_header_buffers
MAX_HEADER_FIELDS = 100  # as Apache's LimitRequestFields
REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def bind(host: str, port: int, flag: str = "--port") -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port is a usage error at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = f" (another server runs there: choose another {flag})" if err.errno == errno.EADDRINUSE else ""
        raise UsageError(f"{host}:{port}: {err.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


def connection_limits(reserve: int = 64) -> tuple[int, int]:
    """(connections, listen backlog) this process may take: the open-file limit, raised to its hard maximum, less
    the files open now and `reserve` for what serving opens besides (model files, decode buffers, pipes), less the
    backlog itself: the event loop accepts up to a backlog of connections at once before any is looked at. Past
    the connections a new one gets 503 at once, instead of waiting in the listen queue for an accept() that
    fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may refuse: serve within the soft limit
            pass
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    free = max(2, soft - open_now - reserve)
    backlog = max(1, min(2048, free // 4))  # uvicorn's default backlog where the limit allows it
    return max(1, free - backlog), backlog


@dataclass
class Guard:
    """What every connection is held to, and where its refusals are counted."""

    header_timeout_s: float
    max_connections: int
    count: Callable[[RequestFailure], None]


class ServeConfig(uvicorn.Config):
    """uvicorn's configuration with the connections' `Guard`, which `GuardedProtocol` reads."""

    def __init__(self, app: Any, guard: Guard, **kwargs: Any) -> None:
        super().__init__(app, http=GuardedProtocol, **kwargs)
        self.guard = guard


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, header limits and a connection limit (module docstring)."""

    def __init__(self, config: ServeConfig, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = config.guard
        self.header_timer: asyncio.TimerHandle | None = None
        self.awaiting_headers, self.header_bytes, self.message_done = True, 0, False
        self.refusal: RequestFailure | None = None
        self.discarding = False  # refused: what the client still sends is read and dropped until it closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.max_connections:
            self.transport = transport  # answered and closed at once: its file descriptor is what is short
            self.refuse(Overloaded(f"the server holds {len(self.connections)} connections, as many as its open-file "
                                   "limit allows; retry later"), linger=False)
            return
        super().connection_made(transport)
        self.await_headers()

    def data_received(self, data: bytes) -> None:
        if self.discarding:
            return
        if self.awaiting_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        if self.awaiting_headers and self.header_bytes > MAX_HEADER_BYTES and not (self.discarding or self.transport.is_closing()):
            self.refuse(HeadersTooLarge(f"the request's headers are over {MAX_HEADER_BYTES} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADER_FIELDS:
            self.refusal = HeadersTooLarge(f"the request has more than {MAX_HEADER_FIELDS} header fields")
            raise self.refusal  # the parser stops; uvicorn answers through send_400_response
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        self.message_done, self.awaiting_headers = False, True  # a pipelined request's headers count from here
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.awaiting_headers = False
        self.cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.message_done = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if not self.message_done:  # answered before its body ended (408, 413, 503): the rest is not read
            self.transport.close()
        elif not pipelined:
            self.await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self.refuse(self.refusal or BadRequest(f"not a valid HTTP request ({msg.rstrip('.')})"))

    def await_headers(self) -> None:
        self.awaiting_headers, self.header_bytes = True, 0
        self.cancel_header_timer()
        self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self.headers_late)

    def headers_late(self) -> None:
        self.header_timer = None
        if self.awaiting_headers and not self.transport.is_closing():
            self.transport.close()  # an idle or trickling client: its connection goes, nothing was asked

    def cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def refuse(self, failure: RequestFailure, linger: bool = True) -> None:
        """Answer `failure` in the protocol's form straight on the connection (no request reached the app), and
        close it; `linger` first reads and drops what the client still sends (at most --header-timeout), so it
        reads the answer instead of a reset."""
        self.guard.count(failure)
        status = status_of(type(failure), HTTP_STATUS)
        body = json.dumps({"error": str(failure)}).encode()
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        if not linger:
            self.transport.close()
        else:
            self.discarding = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.cancel_header_timer()
            self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self.transport.close)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain for at most `drain_timeout_s`, whose second signal ends at
    once, and which says when it listens."""

    def __init__(self, config: uvicorn.Config, plane: DataPlane, banner: str, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.plane, self.banner, self.drain_timeout_s = plane, banner, drain_timeout_s
        self.signum: int | None = None  # the signal that started the drain
        self.second: int | None = None  # a signal that ended it at once
        self.deadline = float("inf")
        self.cut = 0  # requests held when the drain ended, HTTP and gRPC

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.plane.draining = sig, True
            self.deadline = time.monotonic() + self.drain_timeout_s
        else:
            self.second, self.should_exit, self.force_exit = sig, True, True

    async def on_tick(self, counter: int) -> bool:
        if self.plane.draining:
            self.plane.batcher.flush()
            done = self.plane.in_flight + self.plane.receiving == 0
            self.should_exit = self.should_exit or done or time.monotonic() >= self.deadline
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Requests still held now (of either protocol) are cut: their HTTP connections are closed here and their gRPC
        calls cancelled when gRPC stops (`time_left` is then 0), so nothing waits for their clients."""
        self.cut = self.plane.in_flight + self.plane.receiving
        if self.cut or self.force_exit:
            for connection in list(self.server_state.connections):
                connection.transport.abort()  # type: ignore[attr-defined]
        self.config.timeout_graceful_shutdown = 1  # the aborted requests' tasks end at once; then they are cancelled
        await super().shutdown(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(self.banner, flush=True)

    def time_left(self) -> float:
        """Seconds of the drain left to what serves beside HTTP: none once the drain cut requests or a second signal
        came; unbounded before a signal."""
        if self.cut or self.force_exit:
            return 0.0
        return max(0.0, self.deadline - time.monotonic())

    def outcome(self) -> str:
        """How the drain ended, for the exit message."""
        answered = f"drained: {self.plane.answered} requests answered"
        if not self.cut:
            return f"{answered}, none cut"
        why = "by a second signal" if self.second else f"at --drain-timeout {self.drain_timeout_s:g} s"
        return f"{answered}, {self.cut} cut {why}"
