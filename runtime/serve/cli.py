"""`python -m runtime.serve`: an exported DeiT behind an endpoint speaking the Open Inference Protocol.

    python -m runtime.serve --model artifacts/deit-small-distilled-patch16-224
    python -m runtime.serve --model artifacts/deit-small-distilled-patch16-224 --host 0.0.0.0 --port 8000 \\
        --max-batch-size 8 --max-queue-delay-ms 5 --max-queue-size 64
    python -m runtime.serve --model artifacts/deit-small-distilled-patch16-224 --address auto --replicas 2 --host 0.0.0.0

The same protocol as NVIDIA Triton (KServe v2: health, metadata, config, statistics, infer with JSON
or binary tensors, classification), so a `tritonclient` program works unchanged. Inputs: `images`
(BYTES [N], encoded JPEG/PNG/WebP files, decoded like runtime.infer) or `pixel_values` (FP32
[N,3,H,W], preprocessed). Outputs: `logits` (or its k best, Triton's `class_count`), `topk_indices`,
`topk_labels`, `topk_probs`. Concurrent requests are batched dynamically (runtime.serve.batching). Bad
requests get 400, oversized ones 413, a body slower than --body-timeout 408, a full queue or a draining
server 503, each with a one-line `error`; Prometheus metrics on /metrics. SIGTERM or Ctrl-C drains:
requests already received are answered for at most --drain-timeout, new ones get 503, then the server
exits 143 / 130 (at once on a second signal). Exit status otherwise: the README's table (2 usage, e.g. port in use).
The same process speaks the KServe v2 / Triton gRPC API on --grpc-port (runtime.serve.grpc), through the
same queue and batcher. With --address the HTTP application runs as Ray Serve replicas behind Ray
Serve's proxy (runtime.serve.ray_serve), without gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys

from runtime.artifact import SYNTHETIC_WARNING
from runtime.classify import default_decode_memory
from runtime.cli import add_classify_arguments, check_classify_arguments, settle_model
from runtime.errors import ArgumentParser, Interrupted, Unavailable, doc_parser, run_cli
from runtime.predictor import open_predictor
from runtime.serve.dataplane import DataPlane
from runtime.serve.options import PROG, banner, server_options


def build_parser() -> ArgumentParser:
    p = doc_parser("python -m runtime.serve", __doc__)
    add_classify_arguments(p, "", batch_flag="--max-batch-size")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL printed says which)")
    p.add_argument("--grpc-port", type=int, help="port of the KServe v2 / Triton gRPC API (default 8001; with --port 0, "
                   "any free one too; the ready line says which)")
    p.add_argument("--name", help="the model's name on the wire (default: the artifact folder's name)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0,
                   help="how long the oldest queued request may wait for others to fill a batch (default 5)")
    p.add_argument("--no-batching", dest="batching", action="store_false", help="run every request alone")
    p.add_argument("--max-queue-size", type=int, default=64, help="requests held at once; more get 503 (default 64)")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20,
                   help="larger requests (header fields and body) get 413 (default 64 MiB)")
    p.add_argument("--max-json-bytes", type=int, default=16 << 20, help="a request's JSON part larger than this gets "
                   "413: parsed JSON holds about 13 times its size; binary tensors are not limited by it (default 16 MiB)")
    p.add_argument("--decode-memory", type=int, default=default_decode_memory(),
                   help="bytes that all requests' image decoding and JSON parsing may hold at once; the rest wait "
                   "(default: a quarter of the memory, 512 MiB to 8 GiB)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="a request whose body has not all arrived this many "
                   "seconds after its headers gets 408 and its connection is closed (default 30)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="a connection that has not sent a request's headers "
                   "this many seconds after it opened or got its last answer is closed; idle keep-alive connections "
                   "are closed after at most 5 s (default 10)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM / Ctrl-C, answer what is held for at most "
                   "this many seconds, then cut the rest and exit; a second signal exits at once (default 30)")
    p.add_argument("--address", help="serve as Ray Serve replicas instead of in this process: 'local' (a Ray started "
                   "here), 'auto' (the cluster of `ray start`) or ray://HOST:PORT; Ray Serve's proxy listens on --host/--port")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own model and batcher "
                   "(with --address; default 1)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_classify_arguments(p, args, "max_queue_size", "max_request_bytes", "max_json_bytes", "decode_memory")
    for flag in ("body_timeout", "header_timeout", "drain_timeout"):
        if not getattr(args, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be more than 0")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port}: must be between 0 and 65535")
    if args.grpc_port is not None and not 0 <= args.grpc_port <= 65535:
        p.error(f"--grpc-port {args.grpc_port}: must be between 0 and 65535")
    if args.grpc_port is not None and args.address:
        p.error("--grpc-port: gRPC is served by the one-process server, not on Ray Serve (--address)")
    if args.max_queue_delay_ms < 0:
        p.error("--max-queue-delay-ms must be at least 0")
    if args.replicas < 1:
        p.error(f"--replicas {args.replicas}: must be at least 1")
    if args.replicas != 1 and not args.address:
        p.error("--replicas needs --address (replicas run on Ray Serve)")
    return args


def run(args: argparse.Namespace) -> int:
    if args.address:
        from runtime.serve.ray_serve import run_on_ray

        return run_on_ray(args)
    try:
        from runtime.serve.grpc import GrpcEndpoint, address, reserve_port
        from runtime.serve.rest import build_app
        from runtime.serve.server import DrainingServer, Guard, ServeConfig, bind, connection_limits
    except ImportError as err:
        raise Unavailable(f"runtime.serve needs the serve extra: pip install -e '.[serve]' ({err})") from None
    sock = bind(args.host, args.port)
    grpc_port = reserve_port(args.host, args.grpc_port if args.grpc_port is not None else 0 if args.port == 0 else 8001)
    warn_if_exposed(args.host)
    predictor = open_predictor(settle_model(args, PROG))
    backend = predictor.backend
    if backend.meta.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    opts = server_options(args, predictor)
    host, port = sock.getsockname()[:2]
    with backend:
        plane = DataPlane(predictor, opts)
        connections, backlog = connection_limits()
        guard = Guard(args.header_timeout, connections, plane.count_failure)
        config = ServeConfig(build_app(plane), guard, log_level="warning", access_log=False, lifespan="off",
                             timeout_keep_alive=min(5, args.header_timeout), backlog=backlog)
        ready = banner(opts, predictor, host, port, f", gRPC {address(host, grpc_port)}")
        server = DrainingServer(config, plane, ready, args.drain_timeout)
        grpc = GrpcEndpoint(plane, host, grpc_port)
        try:
            asyncio.run(grpc.beside(lambda: server.serve(sockets=[sock]), server.time_left))
        finally:
            plane.close(wait=server.second is None)
            sock.close()
    if server.signum is not None:
        raise Interrupted(server.second or server.signum, server.outcome())
    return 0


def warn_if_exposed(host: str) -> None:
    """One line on stderr when --host is reachable from other machines: the endpoint has no authentication."""
    try:
        loopback = all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (socket.gaierror, ValueError):
        loopback = False
    if not loopback:
        print(f"{PROG}: warning: --host {host}: the endpoint is reachable from other hosts, without authentication "
              "or TLS; put it behind a proxy that has them, or keep the default 127.0.0.1", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args), entry=argv is None)
