"""One model behind the Open Inference Protocol: what every endpoint (HTTP, gRPC) calls.

Admission (--max-queue-size, draining), parsing and checking a request, decoding its images in the
decode threads, the dynamic batcher, the answer's tensors, metadata, configuration and statistics all
live here, so an endpoint only translates its protocol: it gets the same limits, errors (the
`runtime.serve.failures` classes) and statistics as every other endpoint.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from runtime import __version__
from runtime.cpuinfo import usable_cores
from runtime.predictor import Predictor, Top, decode_bytes
from runtime.serve.batching import DynamicBatcher
from runtime.serve.failures import (HTTP_STATUS, BadRequest, InferenceFailed, NotFound, Overloaded, RequestFailure,
                                    ShuttingDown, status_of)
from runtime.serve.options import ServeOptions
from runtime.serve.protocol import InferRequest, RequestedOutput, encode_response, io_config, parse_request

VERSION = "1"  # the one model version the server holds
OUTPUTS = {"logits": "FP32", "topk_indices": "INT64", "topk_labels": "BYTES", "topk_probs": "FP32"}
TYPE_NAMES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration"]
Row = tuple[np.ndarray, "Top | str"]  # one image's logits and its top-k (or why there is none)
BodyReader = Callable[[int], Awaitable[bytes]]  # the endpoint's body, read up to a byte limit


class DataPlane:
    """One model behind the protocol: the decode threads, the batcher, the counts the statistics report."""

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

    def prepare(self, body: bytes, header_length: str | None) -> tuple[InferRequest, str, np.ndarray, int]:
        """Parse and check a request, decode its images: (request, input name, pixels, k). Runs in a decode thread."""
        req = parse_request(body, header_length)
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
        if name == "pixel_values":
            pixels = self._pixel_values(t.datatype, t.shape, t.data)
        else:
            pixels = self._images(t.datatype, t.shape, t.data)
        return req, name, pixels, self._topk(req)

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
        decoded = [decode_bytes(item, f"images[{i}]", spec, self.opts.draft, self.opts.max_pixels, self.opts.max_file_bytes)
                   for i, item in enumerate(data)]
        errors = [d for d in decoded if isinstance(d, str)]
        if errors:
            raise BadRequest(f"input {'; '.join(errors)}")
        return np.stack([d for d in decoded if not isinstance(d, str)])

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

    def respond(self, req: InferRequest, input_name: str, rows: list[Row], k: int) -> tuple[bytes, dict[str, str]]:
        bad = [f"{input_name}[{i}]: {top}" for i, (_, top) in enumerate(rows) if isinstance(top, str)]
        if bad:
            raise InferenceFailed("; ".join(bad))
        logits = np.stack([r[0] for r in rows]).astype(np.float32)
        tops = [r[1][:k] for r in rows if not isinstance(r[1], str)]
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
        return encode_response(self.opts.name, req.id, outputs)

    async def infer(self, body: BodyReader, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        """One request, from admission to response; a `RequestFailure` for every answer but success,
        counted in the statistics."""
        try:
            return await self._infer(body, header_length)
        except RequestFailure as failure:
            status = status_of(failure, HTTP_STATUS)
            self.rejected[status] = self.rejected.get(status, 0) + 1
            raise

    async def _infer(self, body: BodyReader, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.in_flight >= self.opts.max_queue:
            raise Overloaded(f"the server already holds {self.in_flight} requests (--max-queue-size); retry later")
        self.in_flight += 1
        self.arriving += 1
        try:
            try:
                data = await body(self.opts.max_request_bytes)
                req, name, pixels, k = await asyncio.get_running_loop().run_in_executor(
                    self.pool, self.prepare, data, header_length)
                queued = self.batcher.submit(pixels)
            finally:  # queued or refused: no longer on its way, which the batcher must see
                self.arriving -= 1
                self.batcher.poke()
            try:
                rows = await queued
            except Exception as err:  # the backend failed on this batch: a server fault, the server serves on
                raise InferenceFailed(f"inference failed: {type(err).__name__}: "
                                      f"{str(err).splitlines()[0] if str(err) else ''}") from None
            answer = self.respond(req, name, rows, k)
            self.answered += 1
            return answer
        finally:
            self.in_flight -= 1

