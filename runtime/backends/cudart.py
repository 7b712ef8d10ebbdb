"""The few CUDA runtime calls the TensorRT backend needs, through cuda-python (`cuda.bindings.runtime`).

cuda-python returns `(status, value...)` tuples instead of raising and carries no type information,
so every call goes through `_check`, which raises `CudaError` naming the call and the status. Keeping
all CUDA calls here keeps the untyped surface small. Imported lazily: nothing here runs at import.
"""

from __future__ import annotations

import ctypes
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

INSTALL_HINT = "run `make install-gpu` (onnxruntime-gpu, cuda-python and Polygraphy from PyPI, then TensorRT)"
NVIDIA_INDEX = "https://pypi.nvidia.com"
# TensorRT 10: the major that onnxruntime-gpu's TensorRT provider links (libnvinfer.so.10), so `trt` and `ort-trt`
# share one install; 10.14 is the first that parses the ONNX Attention op. The Makefile's TENSORRT is the same.
TENSORRT_REQUIREMENT = "tensorrt-cu13>=10.14,<11"
TENSORRT_HINT = (f"TensorRT's libraries come only from NVIDIA's package index ({NVIDIA_INDEX}), not PyPI: "
                 f"`make install-gpu` installs them last where that index answers (alone: `make install-tensorrt`, i.e. "
                 f"`pip install --extra-index-url {NVIDIA_INDEX} '{TENSORRT_REQUIREMENT}'`)")
# cudaGetDeviceCount statuses that mean "this machine has no usable NVIDIA GPU" rather than a bug.
NO_GPU_STATUSES = ("cudaErrorInsufficientDriver", "cudaErrorNoDevice", "cudaErrorCompatNotSupportedOnDevice")
# The oldest driver branch each CUDA major version runs on (CUDA's release notes, "minor version compatibility").
MIN_DRIVER = {12: "R525", 13: "R580"}


class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and the status."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "compute_capability": self.compute_capability, "memory_bytes": self.memory_bytes}


def _rt() -> Any:
    # Through importlib: the module is compiled, without stubs, so a checker could not see it anyway.
    return importlib.import_module("cuda.bindings.runtime")


def _status_name(status: Any) -> str:
    return getattr(status, "name", str(status))


def _check(call: str, result: tuple[Any, ...]) -> Any:
    """The value(s) of a cuda-python call, or CudaError when its status is not cudaSuccess."""
    status, values = result[0], result[1:]
    if status != _rt().cudaError_t.cudaSuccess:
        raise CudaError(f"{call} failed: {_status_name(status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def gpu_unavailable_reason() -> str | None:
    """None when cuda-python is installed and sees at least one GPU, else what is missing."""
    try:
        rt = _rt()
    except ImportError:
        return f"cuda-python is not installed; {INSTALL_HINT}"
    status, count = rt.cudaGetDeviceCount()
    if status != rt.cudaError_t.cudaSuccess:
        name = _status_name(status)
        if name == "cudaErrorInsufficientDriver":
            return _driver_too_old(rt) or (f"no usable NVIDIA GPU (cudaGetDeviceCount: {name}, no NVIDIA driver found): "
                                           "run on a machine with an NVIDIA GPU and driver")
        if name in NO_GPU_STATUSES:
            return f"no usable NVIDIA GPU (cudaGetDeviceCount: {name}): run on a machine with an NVIDIA GPU and driver"
        return f"CUDA cannot be initialised (cudaGetDeviceCount: {name})"
    if count == 0:
        return "no NVIDIA GPU found (cudaGetDeviceCount returned 0)"
    return None


def _cuda_version(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def _driver_too_old(rt: Any) -> str | None:
    """What to do when a driver is installed but older than the CUDA runtime cuda-python brings (None: no driver).

    cudaErrorInsufficientDriver means both "no driver" and "a driver too old for this runtime"; the
    driver's own CUDA version (0 without a driver) tells them apart. Every GPU package this project pins is a
    CUDA 13 build (torch 2.13 requires cuda-bindings 13, onnxruntime-gpu 1.31 links CUDA 13), so no CUDA 12
    install resolves beside them: the only way on is a newer driver.
    """
    status, driver = rt.cudaDriverGetVersion()
    if status != rt.cudaError_t.cudaSuccess or not driver:
        return None
    runtime = int(_check("cudaRuntimeGetVersion", rt.cudaRuntimeGetVersion()))
    major = runtime // 1000
    return (f"the NVIDIA driver supports CUDA {_cuda_version(int(driver))}, older than the CUDA {_cuda_version(runtime)} "
            f"runtime of cuda-python {_bindings_version()} (cudaGetDeviceCount: cudaErrorInsufficientDriver): update the "
            f"driver to {MIN_DRIVER.get(major, 'a newer branch')} or newer (torch {_dist_version('torch')} and "
            f"onnxruntime-gpu are CUDA {major} builds too)")


def _dist_version(*dists: str) -> str:
    import importlib.metadata

    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(unknown version)"


def _bindings_version() -> str:
    return _dist_version("cuda-bindings", "cuda-python")


def stream_handle(stream: Any) -> int:
    """The stream's address, for APIs that take it as an int (TensorRT's execute_async_v3, ONNX Runtime's
    user_compute_stream). `int(stream)` is deprecated since cuda-bindings 12.9.1; this is its replacement."""
    return int(importlib.import_module("cuda.bindings.utils").get_cuda_native_handle(stream))


def gpu_info(device: int = 0) -> GpuInfo:
    props = _check("cudaGetDeviceProperties", _rt().cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(name=name, compute_capability=f"{props.major}.{props.minor}", memory_bytes=int(props.totalGlobalMem))


def versions() -> dict[str, int]:
    """CUDA driver and runtime versions as CUDA encodes them (12080 = 12.8)."""
    rt = _rt()
    return {"driver": int(_check("cudaDriverGetVersion", rt.cudaDriverGetVersion())),
            "runtime": int(_check("cudaRuntimeGetVersion", rt.cudaRuntimeGetVersion()))}


def device_alloc(nbytes: int) -> int:
    return int(_check("cudaMalloc", _rt().cudaMalloc(nbytes)))


def device_free(ptr: int) -> None:
    _check("cudaFree", _rt().cudaFree(ptr))


def pinned_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[int, np.ndarray]:
    """A page-locked host array (so copies can be asynchronous) and its pointer, for `pinned_free`."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    ptr = int(_check("cudaMallocHost", _rt().cudaMallocHost(nbytes)))
    raw = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
    return ptr, raw.view(dtype).reshape(shape)  # via bytes: ctypes has no float16


def pinned_free(ptr: int) -> None:
    _check("cudaFreeHost", _rt().cudaFreeHost(ptr))


def copy_to_device(dst: int, src_ptr: int, nbytes: int, stream: Any) -> None:
    rt = _rt()
    _check("cudaMemcpyAsync(host->device)",
           rt.cudaMemcpyAsync(dst, src_ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))


def copy_to_host(dst_ptr: int, src: int, nbytes: int, stream: Any) -> None:
    rt = _rt()
    _check("cudaMemcpyAsync(device->host)",
           rt.cudaMemcpyAsync(dst_ptr, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


def stream_create(*, blocking: bool = False) -> Any:
    """A stream of our own. Non-blocking (the default) for work whose copies are all enqueued on it (TensorRT's);
    `blocking=True` (cudaStreamDefault) for ONNX Runtime, whose OrtValue.update_inplace copies with a synchronous
    cudaMemcpy on the legacy default stream: only a blocking stream waits for that copy before ORT's kernels read it."""
    rt = _rt()
    flags = rt.cudaStreamDefault if blocking else rt.cudaStreamNonBlocking
    return _check("cudaStreamCreateWithFlags", rt.cudaStreamCreateWithFlags(flags))


def stream_synchronize(stream: Any) -> None:
    _check("cudaStreamSynchronize", _rt().cudaStreamSynchronize(stream))


def stream_destroy(stream: Any) -> None:
    _check("cudaStreamDestroy", _rt().cudaStreamDestroy(stream))


def capture_begin(stream: Any) -> None:
    rt = _rt()
    _check("cudaStreamBeginCapture",
           rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))


def capture_end(stream: Any) -> Any:
    """Finish a capture and instantiate it; returns the executable graph for `graph_launch`."""
    rt = _rt()
    graph = _check("cudaStreamEndCapture", rt.cudaStreamEndCapture(stream))
    try:
        return _check("cudaGraphInstantiate", rt.cudaGraphInstantiate(graph, 0))
    finally:
        _check("cudaGraphDestroy", rt.cudaGraphDestroy(graph))


def graph_launch(graph_exec: Any, stream: Any) -> None:
    _check("cudaGraphLaunch", _rt().cudaGraphLaunch(graph_exec, stream))


def graph_destroy(graph_exec: Any) -> None:
    _check("cudaGraphExecDestroy", _rt().cudaGraphExecDestroy(graph_exec))


def event_create() -> Any:
    return _check("cudaEventCreate", _rt().cudaEventCreate())


def event_record(event: Any, stream: Any) -> None:
    _check("cudaEventRecord", _rt().cudaEventRecord(event, stream))


def event_elapsed_ms(start: Any, end: Any) -> float:
    """GPU time between two recorded events (waits for `end`)."""
    _check("cudaEventSynchronize", _rt().cudaEventSynchronize(end))
    return float(_check("cudaEventElapsedTime", _rt().cudaEventElapsedTime(start, end)))


def event_destroy(event: Any) -> None:
    _check("cudaEventDestroy", _rt().cudaEventDestroy(event))


def time_on_stream(stream: Any, launch: Callable[[], object], iterations: int) -> list[float]:
    """GPU milliseconds of each of `iterations` calls of `launch`, from CUDA events recorded on `stream` around it."""
    start, end = event_create(), event_create()
    try:
        times = []
        for _ in range(iterations):
            event_record(start, stream)
            launch()
            event_record(end, stream)
            times.append(event_elapsed_ms(start, end))
        return times
    finally:
        event_destroy(start)
        event_destroy(end)
