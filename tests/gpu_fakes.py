"""A simulated GPU and TensorRT runtime, for the CPU tests of code that needs an NVIDIA GPU to run at all.

No GPU can run here, so these stand in for one with the semantics the backends rely on, and tests assert on
what comes out (outputs, timings), not on which calls were made:

- `FakeGpu` replaces `runtime.backends.cudart`: device memory is numpy bytes; work enqueued on a stream runs
  only when the host synchronises (so a missing copy or a stale buffer shows in the outputs); a CUDA graph
  records the work enqueued during capture and replays it; time moves only by the work done (a copy
  `COPY_MS`, a kernel `KERNEL_MS`), and CUDA events read that clock.
- The legacy default stream is one more stream: a copy there (ONNX Runtime's `OrtValue.update_inplace`, a
  synchronous cudaMemcpy whose DMA may still be in flight when it returns) is seen by work on a *blocking*
  stream, which waits for it, but not by work on a non-blocking stream.
- `fake_onnxruntime` is ONNX Runtime's CUDA provider on that GPU: a session whose kernels run on the
  `user_compute_stream` it is given and compute `FakeEngine.reference`.
- `fake_engine` is what `make engines` leaves on a GPU machine: a plan (arbitrary bytes here) and its sidecar,
  written by the same writer.
- `fake_tensorrt` is the `tensorrt` module: an engine whose "network" is `logits = first columns of the input +
  offset`, and whose execution context, like TensorRT's, does shape-dependent setup on the first enqueue after
  a shape change and keeps it in context state that the enqueued (and captured) kernels read when they run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest

from runtime.artifact import model_path, read_onnx_meta
from runtime.backends import cudart
from runtime.backends.trt import EngineTensor, engine_path, make_sidecar, write_sidecar

H100 = cudart.GpuInfo("NVIDIA H100 80GB HBM3", "9.0", 80 * 2**30)
TRT_VERSION = "10.14.1.48"


def onnx_io(onnx_path: Path) -> tuple[EngineTensor, ...]:
    """The I/O tensors TensorRT reports for an engine built from `onnx_path`: the graph's, dynamic axes as -1."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return tuple(EngineTensor(v.name, mode, "float32", tuple(d.dim_value if d.HasField("dim_value") else -1
                                                               for d in v.type.tensor_type.shape.dim))
                 for mode, values in (("input", graph.input), ("output", graph.output)) for v in values)


def fake_engine(artifact: Path, precision: str = "fp16", payload: bytes = b"\x00plan" * 100,
                gpu: cudart.GpuInfo = H100, trt_version: str = TRT_VERSION, max_batch: int = 8) -> Path:
    """A plan file of arbitrary bytes with the sidecar export/engines.py writes for it (same writer)."""
    plan = engine_path(artifact, precision)
    plan.write_bytes(payload)
    onnx_path = model_path(artifact, precision)
    h, w = read_onnx_meta(onnx_path).preprocessing.input_size
    profile = {"input": "pixel_values", "min": [1, 3, h, w], "opt": [max_batch, 3, h, w], "max": [max_batch, 3, h, w]}
    write_sidecar(plan, make_sidecar(plan, onnx_path, precision, tensorrt_version=trt_version, gpu=gpu, profile=profile,
                                     io=onnx_io(onnx_path), meta=read_onnx_meta(onnx_path)))
    return plan


@dataclass
class Stream:
    blocking: bool
    work: list[tuple[float, Callable[[], None]]] = field(default_factory=list)


class FakeGpu:
    COPY_MS, KERNEL_MS = 5.0, 1.0

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gpu: cudart.GpuInfo) -> None:
        self.device: dict[int, np.ndarray] = {}  # address -> bytes
        self.host: dict[int, np.ndarray] = {}  # pinned address -> array
        self.streams: list[Stream] = []
        self.legacy = Stream(blocking=True)  # the legacy default stream
        self.capturing: list[tuple[float, Callable[[], None]]] | None = None
        self.clock = 0.0
        self._next = 0x1000
        patches: dict[str, Any] = {
            "gpu_unavailable_reason": lambda: None, "gpu_info": lambda device=0: gpu,
            "versions": lambda: {"driver": 13000, "runtime": 13000},
            "device_alloc": self.device_alloc, "device_free": self.device.pop,
            "pinned_empty": self.pinned_empty, "pinned_free": self.host.pop,
            "copy_to_device": self.copy_to_device, "copy_to_host": self.copy_to_host,
            "stream_create": self.stream_create, "stream_synchronize": self.synchronize,
            "stream_destroy": lambda stream: None, "stream_handle": lambda stream: id(stream),
            "capture_begin": self.capture_begin, "capture_end": self.capture_end,
            "graph_launch": self.graph_launch, "graph_destroy": lambda graph: None,
            "event_create": dict, "event_record": self.event_record, "event_elapsed_ms": self.event_elapsed_ms,
            "event_destroy": lambda event: None,
        }
        for name, fn in patches.items():
            monkeypatch.setattr(cudart, name, fn)

    def _address(self) -> int:
        self._next += 0x1000
        return self._next

    def device_alloc(self, nbytes: int) -> int:
        ptr = self._address()
        self.device[ptr] = np.full(nbytes, 0xFF, np.uint8)  # garbage until written
        return ptr

    def pinned_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[int, np.ndarray]:
        ptr = self._address()
        self.host[ptr] = np.zeros(shape, dtype)
        return ptr, self.host[ptr]

    def stream_create(self, *, blocking: bool = False) -> Stream:
        self.streams.append(Stream(blocking))
        return self.streams[-1]

    def enqueue(self, stream: Stream, ms: float, fn: Callable[[], None]) -> None:
        if stream.blocking and stream is not self.legacy:  # waits for the legacy default stream's work first
            fn = (lambda run: lambda: (self.synchronize(self.legacy), run()))(fn)
        (self.capturing if self.capturing is not None else stream.work).append((ms, fn))

    def synchronize(self, stream: Stream) -> None:
        work, stream.work = stream.work, []
        for ms, fn in work:
            self.clock += ms
            fn()

    def copy_to_device(self, dst: int, src_ptr: int, nbytes: int, stream: Stream) -> None:
        def copy() -> None:
            self.device[dst][:nbytes] = self.host[src_ptr].reshape(-1).view(np.uint8)[:nbytes]
        self.enqueue(stream, self.COPY_MS, copy)

    def copy_to_host(self, dst_ptr: int, src: int, nbytes: int, stream: Stream) -> None:
        def copy() -> None:
            self.host[dst_ptr].reshape(-1).view(np.uint8)[:nbytes] = self.device[src][:nbytes]
        self.enqueue(stream, self.COPY_MS, copy)

    def capture_begin(self, stream: Stream) -> None:
        self.capturing = []

    def capture_end(self, stream: Stream) -> list[tuple[float, Callable[[], None]]]:
        graph, self.capturing = self.capturing or [], None
        return graph

    def graph_launch(self, graph: list[tuple[float, Callable[[], None]]], stream: Stream) -> None:
        for ms, fn in graph:
            self.enqueue(stream, ms, fn)

    def event_record(self, event: dict[str, float], stream: Stream) -> None:
        self.enqueue(stream, 0.0, lambda: event.__setitem__("t", self.clock))

    def event_elapsed_ms(self, start: dict[str, float], end: dict[str, float]) -> float:
        for stream in self.streams:
            self.synchronize(stream)
        return end["t"] - start["t"]

    def stream_of(self, handle: int) -> Stream:
        return next(s for s in self.streams if id(s) == handle)

    def array(self, ptr: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        return self.device[ptr].view(dtype)[: int(np.prod(shape))].reshape(shape)


class FakeContext:
    """An IExecutionContext: its kernel computes as many rows as the shape its last setup was done for."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.shape, self.setup_rows = engine, 0, 0
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = int(shape[0])
        return 1 <= self.shape <= self.engine.max_batch

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shape, *self.engine.shapes[name][1:])

    def execute_async_v3(self, stream_handle: int) -> bool:
        if self.shape != self.setup_rows:  # host-side setup, as TensorRT does after a shape change
            self.setup_rows = self.shape
        gpu = self.engine.gpu
        gpu.enqueue(gpu.stream_of(stream_handle), gpu.KERNEL_MS, self.kernel)
        return True

    def kernel(self) -> None:
        gpu, engine, rows = self.engine.gpu, self.engine, self.setup_rows  # context state, read when it runs
        x = gpu.array(self.addresses[engine.input], np.dtype(np.float32), (rows, *engine.shapes[engine.input][1:]))
        for k, name in enumerate(engine.outputs):
            cols = engine.shapes[name][1]
            gpu.array(self.addresses[name], np.dtype(np.float32), (rows, cols))[:] = engine.reference(x, k, cols)


class FakeEngine:
    def __init__(self, gpu: FakeGpu, shapes: dict[str, tuple[int, ...]], max_batch: int) -> None:
        self.gpu, self.shapes, self.max_batch = gpu, shapes, max_batch
        self.input, *self.outputs = list(shapes)
        self.num_io_tensors = len(shapes)

    @staticmethod
    def reference(x: np.ndarray, k: int, cols: int) -> np.ndarray:
        """What the engine computes for output number `k`: the input's first `cols` values per image, plus k."""
        return x.reshape(len(x), -1)[:, :cols] + k

    def get_tensor_name(self, i: int) -> str:
        return list(self.shapes)[i]

    def get_tensor_mode(self, name: str) -> str:
        return "input" if name == self.input else "output"

    def get_tensor_dtype(self, name: str) -> type:
        return np.float32

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        rest = self.shapes[name][1:]
        return [(1, *rest), (self.max_batch, *rest), (self.max_batch, *rest)]

    def create_execution_context(self) -> FakeContext:
        return FakeContext(self)


def fake_tensorrt(monkeypatch: pytest.MonkeyPatch, gpu: FakeGpu, version: str, shapes: dict[str, tuple[int, ...]],
                  max_batch: int) -> FakeEngine:
    """Install a `tensorrt` module whose runtime deserializes any plan into a FakeEngine; returns that engine."""
    engine = FakeEngine(gpu, shapes, max_batch)
    module = SimpleNamespace(
        __version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        TensorIOMode=SimpleNamespace(INPUT="input"), nptype=lambda dtype: dtype,
        Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine))
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return engine


class FakeOrtValue:
    """An OrtValue on the simulated GPU."""

    gpu: FakeGpu

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)
        self.ptr = self.gpu.device_alloc(int(np.prod(shape)) * 4)

    @classmethod
    def ortvalue_from_shape_and_type(cls, shape: list[int], dtype: type, device: str, device_id: int) -> FakeOrtValue:
        return cls(shape)

    def update_inplace(self, array: np.ndarray) -> None:
        """ORT's copy in: a synchronous cudaMemcpy on the legacy default stream, its DMA finishing there later."""
        data = np.ascontiguousarray(array, np.float32).reshape(-1).view(np.uint8).copy()
        self.gpu.enqueue(self.gpu.legacy, self.gpu.COPY_MS, lambda: self.gpu.device[self.ptr].__setitem__(slice(0, data.size), data))

    def numpy(self) -> np.ndarray:
        self.gpu.synchronize(self.gpu.legacy)
        return self.gpu.array(self.ptr, np.dtype(np.float32), self.shape).copy()


class FakeBinding:
    def __init__(self) -> None:
        self.inputs: list[FakeOrtValue] = []
        self.outputs: list[FakeOrtValue] = []

    def bind_ortvalue_input(self, name: str, value: FakeOrtValue) -> None:
        self.inputs.append(value)

    def bind_ortvalue_output(self, name: str, value: FakeOrtValue) -> None:
        self.outputs.append(value)

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [value.numpy() for value in self.outputs]


class FakeOrtSession:
    """InferenceSession on the CUDA provider: kernels on the user stream; the host waits for them in each run."""

    gpu: FakeGpu
    outputs: dict[str, int]  # output name -> columns

    def __init__(self, path: str, sess_options: object = None, providers: list[tuple[str, dict[str, str]]] | None = None) -> None:
        options = dict(providers or [])["CUDAExecutionProvider"]
        self.stream = self.gpu.stream_of(int(options["user_compute_stream"]))

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_outputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=name, shape=["batch", cols]) for name, cols in self.outputs.items()]

    def io_binding(self) -> FakeBinding:
        return FakeBinding()

    def run_with_iobinding(self, io: FakeBinding, options: object = None) -> None:
        def kernel() -> None:
            (x,) = io.inputs
            for k, out in enumerate(io.outputs):
                self.gpu.array(out.ptr, np.dtype(np.float32), out.shape)[:] = FakeEngine.reference(
                    self.gpu.array(x.ptr, np.dtype(np.float32), x.shape), k, out.shape[1])
        self.gpu.enqueue(self.stream, self.gpu.KERNEL_MS, kernel)
        self.gpu.synchronize(self.stream)


def fake_onnxruntime(monkeypatch: pytest.MonkeyPatch, gpu: FakeGpu, outputs: dict[str, int]) -> None:
    """ONNX Runtime with a CUDA provider on the simulated GPU (sessions, OrtValues), the rest of ORT as it is."""
    import onnxruntime

    value = type("OrtValue", (FakeOrtValue,), {"gpu": gpu})
    session = type("InferenceSession", (FakeOrtSession,), {"gpu": gpu, "outputs": outputs})
    monkeypatch.setattr(onnxruntime, "OrtValue", value)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda: None, raising=False)
