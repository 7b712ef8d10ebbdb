"""One model behind the Open Inference Protocol: what every endpoint (HTTP, gRPC) calls.

Admission (--max-queue-size, draining), parsing and checking a request, decoding its images in the
decode threads, the dynamic batcher, the answer's tensors, metadata, configuration and statistics all
live here, so an endpoint only translates its protocol: it gets the same limits, errors (the
`runtime.serve.failures` classes), statistics and metrics as every other endpoint. An endpoint calls
`check_model`, `ready`, `server_metadata`, `metadata`, `config`, `statistics`, and for inference
`infer(body, parse)`: `body` reads its request's bytes, `parse` turns them into the protocol's
`InferRequest` (HTTP's is `parse_http`), and the answer is the request and its outputs, which the endpoint
encodes; a refusal it makes itself is counted with `count_failure`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from runtime import __version__
from runtime.cpuinfo import usable_cores
from runtime.decode import DecodeBudget, DecodeFailure, decode_bytes
from runtime.predictor import NOT_FINITE, Predictor, Top
from runtime.serve.batching import Duration, DynamicBatcher
from runtime.serve.failures import (HTTP_STATUS, BadRequest, InferenceFailed, NotFound, Overloaded, RequestFailure,
                                    ShuttingDown, TooLarge, status_of)
from runtime.serve.metrics import Counts, registry_for
from runtime.serve.options import ServeOptions
from runtime.serve.protocol import (InferRequest, Output, RequestedOutput, io_config, load_json, parse_request,
                                    split_body)

VERSION = "1"  # the one model version the server holds
OUTPUTS = {"logits": "FP32", "topk_indices": "INT64", "topk_labels": "BYTES", "topk_probs": "FP32"}
TYPE_NAMES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration"]
Row = tuple[np.ndarray, "Top | None"]  # one image's logits and its top-k (None: not finite)
BodyReader = Callable[[int], Awaitable[bytes]]  # the endpoint's body, read up to a byte limit
Parse = Callable[[bytes], InferRequest]  # the endpoint's wire format -> the protocol's request
JSON_COST = 16  # bytes of memory a parsed JSON request holds per byte of its text (measured: about 13)
TRIM_ABOVE = 64 << 20  # a hold this large is handed back to the operating system when it ends
KEPT_FREE = 8  # one picture holds at most all but 1/KEPT_FREE of the decode budget: small ones keep moving
WAITING_THREADS = 2  # decode threads beyond the cores: a thread waiting for the budget uses no CPU


class TrimmingBudget(DecodeBudget):
    """The decode budget, shared by every request's image decoding and JSON parsing. One hold takes at most all but
    1/KEPT_FREE of it, so a huge picture (or two) cannot make every small one wait for its decode: a picture
    that needs more than that is accounted at the cap (as a picture bigger than the whole budget always was).
    A decode thread that held a large share hands the freed memory back to the operating system once its
    request is decoded (`give_back`): glibc keeps freed heap pages otherwise, so one huge picture would leave
    the RSS at its peak."""

    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None)

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self._large = threading.local()  # per decode thread: whether its request held a large share

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        if nbytes >= TRIM_ABOVE:
            self._large.held = True
        with super().hold(min(nbytes, self.total - self.total // KEPT_FREE)):
            yield

    def give_back(self) -> None:
        """After a request's decoding, once its pictures and JSON are freed: return the memory if it held much."""
        if getattr(self._large, "held", False):
            self._large.held = False
            if hasattr(self._libc, "malloc_trim"):
                self._libc.malloc_trim(0)


class BodyBytes:
    """Bytes of request bodies still arriving, all requests together: past `total` a request gets 503, so slow
    uploads cost memory in proportion to what they sent, never to what they declared."""

    def __init__(self, total: int) -> None:
        self.total, self.held = total, 0

    def take(self, n: int) -> None:
        if self.held + n > self.total:
            raise Overloaded(f"the server is already receiving {self.held} bytes of request bodies "
                             "(--max-queue-size x --max-request-bytes); retry later")
        self.held += n

    def give(self, n: int) -> None:
        self.held -= n


class DataPlane:
    """One model behind the protocol: the decode threads, the batcher, the counts the statistics report."""

    def __init__(self, predictor: Predictor, opts: ServeOptions) -> None:
        self.predictor, self.opts = predictor, opts
        backend = predictor.backend
        self.meta = backend.meta
        self.classes = self.meta.num_labels
        _, _, self.height, self.width = backend.input_shape(1)
        self.pool = ThreadPoolExecutor(max_workers=usable_cores() + WAITING_THREADS, thread_name_prefix="decode")
        self.budget = TrimmingBudget(opts.decode_memory)
        self.body_bytes = BodyBytes(opts.max_queue * opts.max_request_bytes)
        self.receiving = 0  # requests whose body is arriving: no queue slot yet, so a stalled upload holds none
        self.decoding = 0  # requests admitted, being parsed and decoded
        self.batcher: DynamicBatcher[Row] = DynamicBatcher(self._run, opts.max_batch, opts.max_delay_s, opts.batching,
                                                           lambda: self.receiving + self.decoding)
        self.in_flight = 0  # requests admitted (--max-queue-size): decoding, queued or running
        self.draining = False
        self.success, self.fail = Duration(), Duration()
        self.images = 0  # of requests answered with success: Triton's inference_count
        self.failures: Counter[type[RequestFailure]] = Counter()
        self.registry = registry_for(self.counts)

    @property
    def answered(self) -> int:
        return self.success.count

    def _run(self, pixels: np.ndarray) -> list[Row]:
        logits, tops = self.predictor.run(pixels)
        return list(zip(logits, tops))

    def close(self, wait: bool = True) -> None:
        """Stop the batcher (what is queued runs first) and the decode threads; `wait=False` leaves a decode still
        running behind (a second signal: the process ends without it)."""
        self.batcher.close()
        self.pool.shutdown(wait=wait, cancel_futures=not wait)

    # --- health, metadata, configuration, statistics ---------------------------------------------

    def ready(self) -> bool:
        return not self.draining

    def check_model(self, model: str | None, version: str | None = None) -> None:
        """`NotFound` unless `model` (and `version`, when given) is the one this server holds."""
        name = self.opts.name
        if model != name:
            raise NotFound(f"unknown model {model!r}; this server holds {name!r}")
        if version not in (None, "", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has version {VERSION}")

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "deit-deploy", "version": __version__, "extensions": EXTENSIONS}

    def metadata(self) -> dict[str, Any]:
        k, c = self.predictor.topk, self.classes or -1
        b = self.predictor.backend
        return {
            "name": self.opts.name, "versions": [VERSION], "platform": f"deit-deploy_{b.name}",
            "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, self.height, self.width]},
                       {"name": "images", "datatype": "BYTES", "shape": [-1, 1]}],
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
        """Triton's statistics extension (per model, per batch size), plus what is held and refused now.
        A request counts as a success only once it is answered; every refusal counts as a failure."""
        b = self.batcher
        zero = {"count": 0, "ns": 0}
        with b.stats_lock:
            s = b.stats
            stats = {
                "name": self.opts.name, "version": VERSION, "last_inference": s.last_ms,
                "inference_count": self.images, "execution_count": s.executions,
                "inference_stats": {"success": self.success.to_dict(), "fail": self.fail.to_dict(),
                                    "queue": s.queue.to_dict(), "compute_input": zero, "compute_infer": s.compute.to_dict(),
                                    "compute_output": zero, "cache_hit": zero, "cache_miss": zero},
                "batch_stats": [{"batch_size": size, "compute_input": {"count": d.count, "ns": 0},
                                 "compute_infer": d.to_dict(), "compute_output": {"count": d.count, "ns": 0}}
                                for size, d in sorted(s.batches.items())],
            }
        queued, images = b.queued()
        stats["queue_now"] = {"requests": queued, "images": images, "in_flight": self.in_flight, "receiving": self.receiving}
        stats["rejected"] = {str(k): v for k, v in sorted(self._rejected_by_status().items())}
        stats["rejected_by_reason"] = {kind.reason: n for kind, n in sorted(self.failures.items(), key=lambda x: x[0].reason)}
        stats["process"] = {"pid": os.getpid(), "host": socket.gethostname()}  # which replica answered, behind Ray Serve
        return {"model_stats": [stats]}

    def _rejected_by_status(self) -> Counter[int]:
        by_status: Counter[int] = Counter()
        for kind, n in self.failures.items():
            by_status[status_of(kind, HTTP_STATUS)] += n
        return by_status

    def counts(self) -> Counts:
        """What the Prometheus metrics report, read from the same counts as the statistics."""
        with self.batcher.stats_lock:
            s = self.batcher.stats
            executions, queue_ns, compute_ns = s.executions, s.queue.ns, s.compute.ns
        failures = {(kind.triton_reason, kind.reason): n for kind, n in self.failures.items()}
        return Counts(self.opts.name, VERSION, self.success.count, self.images, executions, self.success.ns // 1000,
                      queue_ns // 1000, compute_ns // 1000, self.in_flight, self.receiving, failures)

    def count_failure(self, failure: RequestFailure, seconds: float = 0.0) -> None:
        """A request answered with `failure` (also one an endpoint refused before the data plane saw it)."""
        self.failures[type(failure)] += 1
        self.fail.add(seconds)

    # --- infer ------------------------------------------------------------------------------------

    def parse_http(self, body: bytes, header_length: str | None) -> InferRequest:
        """An HTTP infer body (JSON, or JSON and binary tensors) -> the request. The JSON's cost is held from the
        decode budget while it is parsed; JSON over --max-json-bytes is refused unparsed."""
        head, binary = split_body(body, header_length)
        if len(head) > self.opts.max_json_bytes:
            raise TooLarge(f"the request's JSON is {len(head)} bytes, over --max-json-bytes {self.opts.max_json_bytes}; "
                           "send tensors with the binary-tensor extension")
        with self.budget.hold(JSON_COST * len(head)):
            return parse_request(load_json(head), binary)

    def prepare(self, body: bytes, parse: Parse) -> tuple[InferRequest, str, np.ndarray, int]:
        """Parse and check a request, decode its images: (request, input name, pixels, k). Runs in a decode thread;
        decoding holds each picture's cost from the decode budget."""
        try:
            return self._prepare(parse(body))
        finally:
            self.budget.give_back()

    def _prepare(self, req: InferRequest) -> tuple[InferRequest, str, np.ndarray, int]:
        names = set(req.inputs)
        unknown = names - {"pixel_values", "images"}
        if unknown or len(names) != 1:
            what = f"unknown input {sorted(unknown)[0]!r}" if unknown else "both inputs were sent"
            raise BadRequest(f"{what}; send one of pixel_values (FP32 [N,3,{self.height},{self.width}]) "
                             "or images (BYTES [N], encoded image files)")
        (name,) = names
        t = req.inputs[name]
        n = t.shape[0] if t.shape else 0
        if not 1 <= n <= self.opts.max_batch:
            raise BadRequest(f"input {name!r}: {n} images in one request; this server takes 1 to "
                             f"{self.opts.max_batch} (--max-batch-size)")
        k = self._topk(req)
        if name == "pixel_values":
            return req, name, self._pixel_values(t.datatype, t.shape, t.data), k
        return req, name, self._images(t.datatype, t.shape, t.data), k

    def _pixel_values(self, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
        want = (3, self.height, self.width)
        if datatype != "FP32":
            raise BadRequest(f"input 'pixel_values': datatype {datatype}, expected FP32")
        if len(shape) != 4 or shape[1:] != want:
            raise BadRequest(f"input 'pixel_values': shape {list(shape)}, expected [N, {', '.join(map(str, want))}]")
        pixels = np.asarray(data, dtype=np.float32).reshape(shape)
        if not np.isfinite(pixels).all():
            raise BadRequest("input 'pixel_values': holds NaN or infinity")
        return pixels

    def _images(self, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
        if datatype != "BYTES":
            raise BadRequest(f"input 'images': datatype {datatype}, expected BYTES (encoded image files)")
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise BadRequest(f"input 'images': shape {list(shape)}, expected [N] or [N, 1]")
        spec = self.predictor.spec
        decoded = [decode_bytes(item, f"images[{i}]", spec, self.opts.draft, self.opts.max_pixels, self.opts.max_file_bytes,
                                self.budget) for i, item in enumerate(data)]
        failures = [d.message for d in decoded if isinstance(d, DecodeFailure)]
        if failures:
            raise BadRequest(f"input {'; '.join(failures)}")
        return np.stack([d for d in decoded if not isinstance(d, DecodeFailure)])

    def _topk(self, req: InferRequest) -> int:
        k = req.parameters.get("topk", self.predictor.topk)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.predictor.topk:
            raise BadRequest(f"parameter topk {k!r}: must be 1 to {self.predictor.topk} (the server's --topk)")
        for out in req.outputs or []:
            if out.name not in OUTPUTS:
                raise BadRequest(f"unknown output {out.name!r}; this model has {', '.join(OUTPUTS)}")
            if out.class_count and (out.name != "logits" or out.class_count > self.predictor.topk):
                raise BadRequest(f"output {out.name!r}: classification {out.class_count}: only 'logits' has classes, "
                                 f"at most {self.predictor.topk} (the server's --topk)")
        return k

    def outputs(self, req: InferRequest, input_name: str, rows: list[Row], k: int) -> list[Output]:
        """The requested outputs of a request's rows, for its endpoint to encode."""
        bad = [f"{input_name}[{i}]: {NOT_FINITE}" for i, (_, top) in enumerate(rows) if top is None]
        if bad:
            raise InferenceFailed("; ".join(bad))
        logits = np.stack([r[0] for r in rows]).astype(np.float32)
        tops = [r[1][:k] for r in rows if r[1] is not None]
        wanted = req.outputs or [RequestedOutput(n, req.binary_output) for n in OUTPUTS]
        outputs: list[Output] = []
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

    async def infer(self, body: BodyReader, parse: Parse) -> tuple[InferRequest, list[Output]]:
        """One request, from its body to its outputs: `body` reads it (up to --max-request-bytes), `parse` turns it
        into the protocol's request in a decode thread (each endpoint has its own wire format). A
        `RequestFailure` for every answer but success; either way it is counted in the statistics and metrics."""
        start = time.monotonic()
        try:
            answer, images = await self._infer(body, parse)
        except RequestFailure as failure:
            self.count_failure(failure, time.monotonic() - start)
            raise
        self.success.add(time.monotonic() - start)
        self.images += images
        return answer

    async def _infer(self, body: BodyReader, parse: Parse) -> tuple[tuple[InferRequest, list[Output]], int]:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        self.receiving += 1
        try:
            data = await body(self.opts.max_request_bytes)
        finally:  # received or refused: no longer on its way, which the batcher must see
            self.receiving -= 1
            self.batcher.poke()
        if self.in_flight >= self.opts.max_queue:
            raise Overloaded(f"the server already holds {self.in_flight} requests (--max-queue-size); retry later")
        self.in_flight += 1
        self.decoding += 1
        try:
            try:
                req, name, pixels, k = await asyncio.get_running_loop().run_in_executor(
                    self.pool, self.prepare, data, parse)
                queued = self.batcher.submit(pixels)
            finally:
                self.decoding -= 1
                self.batcher.poke()
            try:
                rows = await queued
            except Exception as err:  # the backend failed on this batch: a server fault, the server serves on
                raise InferenceFailed(f"inference failed: {type(err).__name__}: "
                                      f"{str(err).splitlines()[0] if str(err) else ''}") from None
            return (req, self.outputs(req, name, rows, k)), len(pixels)
        finally:
            self.in_flight -= 1
