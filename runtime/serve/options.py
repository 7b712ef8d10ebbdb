"""What the one-process server and every Ray Serve replica are built from: the flags as the data plane
takes them, and the ready line clients read the URL from."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from runtime.classify import default_decode_memory
from runtime.predictor import Predictor
from runtime.decode import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS

PROG = "serve"


@dataclass(frozen=True)
class ServeOptions:
    name: str
    max_batch: int = 8
    max_delay_s: float = 0.005
    batching: bool = True
    max_queue: int = 64  # requests held at once (being read, decoded, queued or run); more get 503
    max_request_bytes: int = 64 << 20  # a request's header fields and body together
    draft: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_json_bytes: int = 16 << 20  # a request's JSON part (parsed, JSON costs about 13 times its size)
    decode_memory: int = field(default_factory=default_decode_memory)  # all requests' decoding and JSON together
    body_timeout_s: float = 30.0  # from the request's headers to the end of its body


def server_options(args: argparse.Namespace, predictor: Predictor) -> ServeOptions:
    """The flags as the data plane takes them; the one-process server and every Ray replica build theirs here."""
    name = args.name or predictor.backend.artifact_dir.name
    return ServeOptions(name, args.batch_size, args.max_queue_delay_ms / 1000, args.batching, args.max_queue_size,
                        args.max_request_bytes, args.draft, args.max_pixels, args.max_file_bytes, args.max_json_bytes,
                        args.decode_memory, args.body_timeout)


def banner(opts: ServeOptions, predictor: Predictor, host: str, port: int, where: str = "") -> str:
    """The line that says the server is ready: clients (and benchmarks.serve.launch) read the URL from it."""
    backend = predictor.backend
    shown = f"[{host}]" if ":" in host else host
    batching = (f"dynamic batching up to {opts.max_batch} within {opts.max_delay_s * 1000:g} ms" if opts.batching
                else "batching off")
    return (f"{PROG}: http://{shown}:{port}/v2/models/{opts.name} ready: backend {backend.name} ({backend.precision}), "
            f"{batching}, queue {opts.max_queue}{where}")
