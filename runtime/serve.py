"""`python -m runtime.serve`: an exported DeiT behind an endpoint speaking the Open Inference Protocol.

    python -m runtime.serve --model artifacts/deit-small-distilled-patch16-224
    python -m runtime.serve --model artifacts/deit-small-distilled-patch16-224 --host 0.0.0.0 --port 8000 \\
        --max-batch-size 8 --max-queue-delay-ms 5 --max-queue-size 64
    python -m runtime.serve --model artifacts/deit-small-distilled-patch16-224 --address auto --replicas 2 --host 0.0.0.0

The same protocol as NVIDIA Triton (KServe v2: health, metadata, config, statistics, infer with JSON
or binary tensors, classification), so a `tritonclient` program works unchanged. Inputs: `images`
(BYTES [N], encoded JPEG/PNG/WebP files, decoded like runtime.infer) or `pixel_values` (FP32
[N,3,H,W], preprocessed). Outputs: `logits` (or its k best, Triton's `class_count`), `topk_indices`,
`topk_labels`, `topk_probs`. Concurrent requests are batched dynamically (runtime.batching). Bad
requests get 400, oversized ones 413, a full queue or a draining server 503, each with a one-line
`error`. SIGTERM or Ctrl-C drains: requests already received are answered, new ones get 503, then
the server exits 143 / 130. Exit status otherwise: the README's table (2 usage, e.g. port in use).
With --address the same application runs as Ray Serve replicas behind Ray Serve's proxy (runtime.serve_ray).
The same process also speaks the KServe v2 / Triton gRPC API on --grpc-port (runtime.serve_grpc).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import sys
import zlib
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import numpy as np

from runtime import __version__
from runtime.artifact import SYNTHETIC_WARNING
from runtime.batching import DynamicBatcher
from runtime.cli import add_classify_arguments, check_classify_arguments, settle_model
from runtime.cpuinfo import usable_cores
from runtime.errors import ArgumentParser, Interrupted, Unavailable, UsageError, doc_parser, run_cli
from runtime.oip import HEADER_LENGTH, InferRequest, ProtocolError, RequestedOutput, encode_response, io_config, parse_request
from runtime.decode import DecodeFailure, decode_bytes
from runtime.predictor import NOT_FINITE, Predictor, Top, open_predictor
from runtime.decode import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS

PROG = "serve"
VERSION = "1"  # the one model version the server holds
OUTPUTS = {"logits": "FP32", "topk_indices": "INT64", "topk_labels": "BYTES", "topk_probs": "FP32"}
TYPE_NAMES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
Row = tuple[np.ndarray, "Top | None"]  # one image's logits and its top-k (None: not finite)
Prepared = tuple[InferRequest, str, np.ndarray, int]  # a checked request, its input's name, its pixels, its top-k
Answer = TypeVar("Answer")
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration"]


@dataclass(frozen=True)
class ServeOptions:
    name: str
    max_batch: int = 8
    max_delay_s: float = 0.005
    batching: bool = True
    max_queue: int = 64  # requests held at once (being read, decoded, queued or run); more get 503
    max_request_bytes: int = 64 << 20
    draft: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


class RequestTooLarge(Exception):
    pass


class Refused(Exception):
    """An answer other than 200: the HTTP status and the one-line error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ModelServer:
    """One model behind the protocol: the routes' state, the decode threads and the batcher."""

    def __init__(self, predictor: Predictor, opts: ServeOptions) -> None:
        self.predictor, self.opts = predictor, opts
        backend = predictor.backend
        self.meta = backend.meta
        self.classes = self.meta.num_labels
        _, _, self.height, self.width = backend.input_shape(1)
        self.pool = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="decode")
        self.arriving = 0  # requests received but not yet queued for a batch (being read, parsed, decoded)
        self.batcher: DynamicBatcher[Row] = DynamicBatcher(self._run, opts.max_batch, opts.max_delay_s, opts.batching,
                                                           lambda: self.arriving)
        self.in_flight = 0
        self.draining = False
        self.answered = 0
        self.rejected: dict[int, int] = {}  # HTTP status -> count

    def _run(self, pixels: np.ndarray) -> list[Row]:
        logits, tops = self.predictor.run(pixels)
        return list(zip(logits, tops))

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=True)

    # --- metadata -------------------------------------------------------------------------------

    def check_model(self, asked: str | None, version: str | None) -> None:
        """`Refused` 404 unless a request names this model (and its one version, or none): HTTP and gRPC alike."""
        if asked != self.opts.name:
            raise Refused(404, f"unknown model {asked!r}; this server holds {self.opts.name!r}")
        if version not in (None, "", VERSION):
            raise Refused(404, f"model {self.opts.name!r} has no version {version!r}; it has version {VERSION}")

    def metadata(self) -> dict[str, Any]:
        k, c = self.predictor.topk, self.classes or -1
        b = self.predictor.backend
        return {
            "name": self.opts.name, "versions": [VERSION], "platform": f"deit-deploy_{b.name}",
            "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, self.height, self.width]},
                       {"name": "images", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, c]},
                        *({"name": n, "datatype": OUTPUTS[n], "shape": [-1, k]} for n in ("topk_indices", "topk_labels", "topk_probs"))],
            "parameters": {"checkpoint": self.meta.checkpoint, "weights": self.meta.weights, "backend": b.name,
                           "precision": b.precision, "model_file": b.model_file.name, "max_batch_size": self.opts.max_batch,
                           "topk": k, "deit_deploy_version": __version__},
        }

    def config(self) -> dict[str, Any]:
        """Triton's model configuration, as `tritonclient` `get_model_config` returns it."""
        io = io_config(self.meta, self.classes)
        k = self.predictor.topk
        cfg: dict[str, Any] = {
            "name": self.opts.name, "platform": "deit-deploy", "backend": self.predictor.backend.name,
            "max_batch_size": self.opts.max_batch,
            "input": [*io["input"], {"name": "images", "data_type": "TYPE_STRING", "dims": [1]}],
            "output": [*io["output"], *({"name": n, "data_type": TYPE_NAMES[OUTPUTS[n]], "dims": [k]}
                                         for n in ("topk_indices", "topk_labels", "topk_probs"))],
            "version_policy": {"latest": {"num_versions": 1}},
        }
        if self.opts.batching:
            cfg["dynamic_batching"] = {"max_queue_delay_microseconds": int(self.opts.max_delay_s * 1e6),
                                       "default_queue_policy": {"max_queue_size": self.opts.max_queue}}
        return cfg

    def statistics(self) -> dict[str, Any]:
        """Triton's statistics extension (per model, per batch size), plus what is queued and refused now."""
        b = self.batcher
        with b.stats_lock:
            s = b.stats
            zero = {"count": 0, "ns": 0}
            stats = {
                "name": self.opts.name, "version": VERSION, "last_inference": s.last_ms,
                "inference_count": s.images, "execution_count": s.executions,
                "inference_stats": {"success": s.success.to_dict(), "fail": s.fail.to_dict(), "queue": s.queue.to_dict(),
                                    "compute_input": zero, "compute_infer": s.compute.to_dict(), "compute_output": zero},
                "batch_stats": [{"batch_size": size, "compute_input": {"count": d.count, "ns": 0},
                                 "compute_infer": d.to_dict(), "compute_output": {"count": d.count, "ns": 0}}
                                for size, d in sorted(s.batches.items())],
            }
        queued, images = b.queued()
        stats["queue_now"] = {"requests": queued, "images": images, "in_flight": self.in_flight}
        stats["rejected"] = {str(k): v for k, v in sorted(self.rejected.items())}
        stats["process"] = {"pid": os.getpid(), "host": socket.gethostname()}  # which replica answered, behind Ray Serve
        return {"model_stats": [stats]}

    # --- infer ------------------------------------------------------------------------------------

    def prepare(self, body: bytes, header_length: str | None) -> Prepared:
        """Parse and check an HTTP request, decode its images. Runs in a decode thread."""
        return self.check_request(parse_request(body, header_length))

    def check_request(self, req: InferRequest) -> Prepared:
        """Check a parsed request of either protocol, decode its images: (request, input name, pixels, k)."""
        names = set(req.inputs)
        unknown = names - {"pixel_values", "images"}
        if unknown or len(names) != 1:
            what = f"unknown input {sorted(unknown)[0]!r}" if unknown else "both inputs were sent"
            raise ProtocolError(f"{what}; send one of pixel_values (FP32 [N,3,{self.height},{self.width}]) "
                                "or images (BYTES [N], encoded image files)")
        (name,) = names
        t = req.inputs[name]
        n = t.shape[0] if t.shape else 0
        if not 1 <= n <= self.opts.max_batch:
            raise ProtocolError(f"input {name!r}: {n} images in one request; this server takes 1 to "
                                f"{self.opts.max_batch} (--max-batch-size)")
        if name == "pixel_values":
            pixels = self._pixel_values(t.datatype, t.shape, t.data)
        else:
            pixels = self._images(t.datatype, t.shape, t.data)
        return req, name, pixels, self._topk(req)

    def _pixel_values(self, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
        want = (3, self.height, self.width)
        if datatype != "FP32":
            raise ProtocolError(f"input 'pixel_values': datatype {datatype}, expected FP32")
        if len(shape) != 4 or shape[1:] != want:
            raise ProtocolError(f"input 'pixel_values': shape {list(shape)}, expected [N, {', '.join(map(str, want))}]")
        pixels = np.asarray(data, dtype=np.float32).reshape(shape)
        if not np.isfinite(pixels).all():
            raise ProtocolError("input 'pixel_values': holds NaN or infinity")
        return pixels

    def _images(self, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
        if datatype != "BYTES":
            raise ProtocolError(f"input 'images': datatype {datatype}, expected BYTES (encoded image files)")
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise ProtocolError(f"input 'images': shape {list(shape)}, expected [N] or [N, 1]")
        spec = self.predictor.spec
        decoded = [decode_bytes(item, f"images[{i}]", spec, self.opts.draft, self.opts.max_pixels, self.opts.max_file_bytes)
                   for i, item in enumerate(data)]
        failures = [d.message for d in decoded if isinstance(d, DecodeFailure)]
        if failures:
            raise ProtocolError(f"input {'; '.join(failures)}")
        return np.stack([d for d in decoded if not isinstance(d, DecodeFailure)])

    def _topk(self, req: InferRequest) -> int:
        k = req.parameters.get("topk", self.predictor.topk)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.predictor.topk:
            raise ProtocolError(f"parameter topk {k!r}: must be 1 to {self.predictor.topk} (the server's --topk)")
        for out in req.outputs or []:
            if out.name not in OUTPUTS:
                raise ProtocolError(f"unknown output {out.name!r}; this model has {', '.join(OUTPUTS)}")
            if out.class_count and (out.name != "logits" or out.class_count > self.predictor.topk):
                raise ProtocolError(f"output {out.name!r}: classification {out.class_count}: only 'logits' has classes, "
                                    f"at most {self.predictor.topk} (the server's --topk)")
        return k

    def respond(self, req: InferRequest, input_name: str, rows: list[Row], k: int) -> tuple[bytes, dict[str, str]]:
        return encode_response(self.opts.name, req.id, self.outputs(req, input_name, rows, k))

    def outputs(self, req: InferRequest, input_name: str, rows: list[Row], k: int) -> list[tuple[str, str, np.ndarray, bool]]:
        """The requested outputs of answered rows, (name, datatype, array, binary) each, for either protocol's encoder."""
        bad = [f"{input_name}[{i}]: {NOT_FINITE}" for i, (_, top) in enumerate(rows) if top is None]
        if bad:
            raise Refused(500, "; ".join(bad))
        logits = np.stack([r[0] for r in rows]).astype(np.float32)
        tops = [r[1][:k] for r in rows if r[1] is not None]
        wanted = req.outputs or [RequestedOutput(n, req.binary_output) for n in OUTPUTS]
        outputs = []
        for out in wanted:
            if out.class_count:  # Triton's classification: "value:index:label", the value being the logit
                array = np.array([[f"{logit[i]:f}:{i}:{label}".encode() for i, label, _ in top[: out.class_count]]
                                  for logit, top in zip(logits, tops)], dtype=np.object_)
                outputs.append((out.name, "BYTES", array, out.binary))
                continue
            array = {
                "logits": lambda: logits,
                "topk_indices": lambda: np.array([[i for i, _, _ in t] for t in tops], dtype=np.int64),
                "topk_labels": lambda: np.array([[lab.encode() for _, lab, _ in t] for t in tops], dtype=np.object_),
                "topk_probs": lambda: np.array([[p for _, _, p in t] for t in tops], dtype=np.float32),
            }[out.name]()
            outputs.append((out.name, OUTPUTS[out.name], array, out.binary))
        return outputs

    async def infer(self, body: Callable[[int], Awaitable[bytes]], header_length: str | None) -> tuple[bytes, dict[str, str]]:
        """One HTTP request, from admission to response; `Refused` for every answer but 200."""
        async def receive() -> Callable[[], Prepared]:
            data = await body(self.opts.max_request_bytes)
            return lambda: self.prepare(data, header_length)

        return await self.serve_request(receive, self.respond)

    async def serve_request(self, receive: Callable[[], Awaitable[Callable[[], Prepared]]],
                            answer: Callable[[InferRequest, str, list[Row], int], Answer]) -> Answer:
        """One request of either protocol through admission, the decode threads and the batcher: `receive` reads it
        and returns how to prepare it (run in a decode thread), `answer` encodes its rows; `Refused` but for 200."""
        if self.draining:
            raise Refused(503, "the server is shutting down; retry on another replica")
        if self.in_flight >= self.opts.max_queue:
            raise Refused(503, f"the server already holds {self.in_flight} requests (--max-queue-size); retry later")
        self.in_flight += 1
        self.arriving += 1
        try:
            try:
                prepare = await receive()
                req, name, pixels, k = await asyncio.get_running_loop().run_in_executor(self.pool, prepare)
                queued = self.batcher.submit(pixels)
            except RequestTooLarge as err:
                raise Refused(413, f"the request is larger than --max-request-bytes {self.opts.max_request_bytes} ({err})") from None
            except ProtocolError as err:
                raise Refused(400, str(err)) from None
            finally:  # queued or refused: no longer on its way, which the batcher must see
                self.arriving -= 1
                self.batcher.poke()
            try:
                rows = await queued
            except Exception as err:  # the backend failed on this batch: a server fault, the server serves on
                raise Refused(500, f"inference failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
            answered = answer(req, name, rows, k)
            self.answered += 1
            return answered
        finally:
            self.in_flight -= 1


def build_app(model: ModelServer) -> Any:
    """The Starlette application: the protocol's routes over one `ModelServer`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    name = model.opts.name

    def error(status: int, message: str) -> Response:
        if status != 404:
            model.rejected[status] = model.rejected.get(status, 0) + 1
        return JSONResponse({"error": message}, status_code=status)

    def ready() -> bool:
        return not model.draining

    def check(request: Request) -> Response | None:
        try:
            model.check_model(request.path_params.get("model"), request.path_params.get("version"))
        except Refused as err:
            return error(err.status, str(err))
        return None

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(request: Request) -> Response:
        return JSONResponse({"ready": ready()}, status_code=200 if ready() else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "deit-deploy", "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: Request) -> Response:
        return check(request) or JSONResponse(model.metadata())

    async def model_ready(request: Request) -> Response:
        return check(request) or JSONResponse({"name": name, "ready": ready()}, status_code=200 if ready() else 503)

    async def model_config(request: Request) -> Response:
        return check(request) or JSONResponse(model.config())

    async def stats(request: Request) -> Response:
        if request.path_params.get("model") is None:
            return JSONResponse(model.statistics())
        return check(request) or JSONResponse(model.statistics())

    async def infer(request: Request) -> Response:
        refused = check(request)
        if refused:
            return refused

        async def body(limit: int) -> bytes:
            return await read_body(request, limit)

        try:
            content, headers = await model.infer(body, request.headers.get(HEADER_LENGTH))
        except Refused as err:
            return error(err.status, str(err))
        return Response(content, headers=headers)

    def both(path: str, endpoint: Callable[[Request], Awaitable[Response]], methods: list[str] | None = None) -> list[Route]:
        return [Route(f"/v2/models/{{model}}{path}", endpoint, methods=methods),
                Route(f"/v2/models/{{model}}/versions/{{version}}{path}", endpoint, methods=methods)]

    routes = [Route("/v2/health/live", live), Route("/v2/health/ready", server_ready), Route("/v2", server_metadata),
              Route("/v2/models/stats", stats), *both("", model_metadata), *both("/ready", model_ready),
              *both("/config", model_config), *both("/stats", stats), *both("/infer", infer, ["POST"])]
    return Starlette(routes=routes)


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused as soon as it passes `limit` bytes (declared, received or decompressed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"{declared} bytes")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"more than {limit} bytes received")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Refused(400, "the client closed the connection before the whole body arrived") from None
    data = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        inflate = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
        try:
            data = inflate.decompress(data, limit + 1)
        except zlib.error as err:
            raise Refused(400, f"the {encoding} request body cannot be decompressed ({err})") from None
        if len(data) > limit:
            raise RequestTooLarge(f"more than {limit} bytes once decompressed")
    elif encoding != "identity":
        raise Refused(400, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    return data


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


def _uvicorn_server() -> type:
    """uvicorn.Server whose SIGTERM/SIGINT drain instead of closing connections, and which says when it listens."""
    try:
        import uvicorn
    except ImportError as err:
        raise Unavailable(f"runtime.serve needs the serve extra: pip install -e '.[serve]' ({err})") from None

    class DrainingServer(uvicorn.Server):
        def __init__(self, config: uvicorn.Config, model: ModelServer, banner: str) -> None:
            super().__init__(config)
            self.model, self.banner = model, banner
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
            self.model.draining = True

        async def on_tick(self, counter: int) -> bool:
            if self.model.draining:
                self.model.batcher.flush()
                self.should_exit = self.should_exit or self.model.in_flight == 0
            return await super().on_tick(counter)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                print(self.banner, flush=True)

    return DrainingServer


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
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="larger request bodies get 413 (default 64 MiB)")
    p.add_argument("--address", help="serve as Ray Serve replicas instead of in this process: 'local' (a Ray started "
                   "here), 'auto' (the cluster of `ray start`) or ray://HOST:PORT; Ray Serve's proxy listens on --host/--port")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, each with its own model and batcher "
                   "(with --address; default 1)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_classify_arguments(p, args, "max_queue_size", "max_request_bytes")
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


def server_options(args: argparse.Namespace, predictor: Predictor) -> ServeOptions:
    """The flags as the model server takes them; the one-process server and every Ray replica build theirs here."""
    name = args.name or predictor.backend.artifact_dir.name
    return ServeOptions(name, args.batch_size, args.max_queue_delay_ms / 1000, args.batching, args.max_queue_size,
                        args.max_request_bytes, args.draft, args.max_pixels, args.max_file_bytes)


def banner(opts: ServeOptions, predictor: Predictor, host: str, port: int, where: str = "") -> str:
    """The line that says the server is ready: clients (and benchmarks.serve.launch) read the URL from it."""
    backend = predictor.backend
    shown = f"[{host}]" if ":" in host else host
    batching = (f"dynamic batching up to {opts.max_batch} within {opts.max_delay_s * 1000:g} ms" if opts.batching
                else "batching off")
    return (f"{PROG}: http://{shown}:{port}/v2/models/{opts.name} ready: backend {backend.name} ({backend.precision}), "
            f"{batching}, queue {opts.max_queue}{where}")


def run(args: argparse.Namespace) -> int:
    if args.address:
        from runtime.serve_ray import run_on_ray

        return run_on_ray(args)
    sock = bind(args.host, args.port)
    server_class = _uvicorn_server()
    import uvicorn

    try:
        from runtime.serve_grpc import GrpcEndpoint, address, reserve_port
    except ImportError as err:
        raise Unavailable(f"runtime.serve needs the serve extra: pip install -e '.[serve]' ({err})") from None
    grpc_port = reserve_port(args.host, args.grpc_port if args.grpc_port is not None else 0 if args.port == 0 else 8001)

    predictor = open_predictor(settle_model(args, PROG))
    backend = predictor.backend
    if backend.meta.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    opts = server_options(args, predictor)
    host, port = sock.getsockname()[:2]
    with backend:
        model = ModelServer(predictor, opts)
        config = uvicorn.Config(build_app(model), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=30)
        server = server_class(config, model, banner(opts, predictor, host, port, f", gRPC {address(host, grpc_port)}"))
        try:
            asyncio.run(GrpcEndpoint(model, host, grpc_port).beside(lambda: server.serve(sockets=[sock])))
        finally:
            model.close()
            sock.close()
    if server.signum is not None:
        raise Interrupted(server.signum, f"drained: {model.answered} requests answered, none dropped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(PROG, lambda: run(args), entry=argv is None)


if __name__ == "__main__":
    from runtime import serve  # this module under its own name: runtime.serve_grpc catches its Refused, not __main__'s

    sys.exit(serve.main())
