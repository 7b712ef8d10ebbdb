"""The server process: the listening socket and uvicorn, whose SIGTERM / SIGINT drain the data plane."""

from __future__ import annotations

import errno
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn

from runtime.errors import UsageError
from runtime.serve.dataplane import DataPlane


def bind(host: str, port: int) -> socket.socket:
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
        hint = " (another server runs there: choose another --port)" if err.errno == errno.EADDRINUSE else ""
        raise UsageError(f"{host}:{port}: {err.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT drain instead of closing connections, and which says when it listens."""

    def __init__(self, config: uvicorn.Config, plane: DataPlane, banner: str) -> None:
        super().__init__(config)
        self.plane, self.banner = plane, banner
        self.signum: int | None = None

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signum is not None and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C stops waiting for the drain
        self.signum = self.signum or sig
        self.plane.draining = True

    async def on_tick(self, counter: int) -> bool:
        if self.plane.draining:
            self.plane.batcher.flush()
            self.should_exit = self.should_exit or self.plane.in_flight == 0
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(self.banner, flush=True)
