"""Backend registry: a name maps to where its `BackendKind` lives, imported only when used."""

from __future__ import annotations

import importlib
from pathlib import Path

from runtime.errors import UsageError
from runtime.backends.base import MAX_BATCH, PRECISIONS, Backend, BackendKind, BackendUnavailable, InputSpec, ModelSource

__all__ = ["BACKENDS", "GPU_ORDER", "MAX_BATCH", "PRECISIONS", "Backend", "BackendKind", "BackendUnavailable",
           "InputSpec", "ModelSource", "backend_kind", "create"]

BACKENDS: dict[str, str] = {
    "trt": "runtime.backends.trt:TRT",
    "ort-trt": "runtime.backends.onnxruntime:ORT_TRT",
    "ort-cuda": "runtime.backends.onnxruntime:ORT_CUDA",
    "ort-cpu": "runtime.backends.onnxruntime:ORT_CPU",
    "openvino-cpu": "runtime.backends.openvino:OPENVINO_CPU",
    "torch-eager": "runtime.backends.pytorch:TORCH_EAGER",
    "torch-sdpa": "runtime.backends.pytorch:TORCH_SDPA",
    "torch-sdpa-graph": "runtime.backends.pytorch:TORCH_SDPA_GRAPH",
    "torch-compile": "runtime.backends.pytorch:TORCH_COMPILE",
}
# What `auto` tries on a GPU, fastest first; on a CPU it measures (runtime.backends.auto).
GPU_ORDER = ("trt", "ort-cuda")


def backend_kind(name: str) -> BackendKind:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    module, attr = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise BackendUnavailable(f"backend {name!r} is not installed ({err})") from None


def create(name: str, artifact_dir: str | Path, precision: str | None = None, max_batch: int = 8,
           threads: int | None = None, model_file: Path | None = None) -> Backend:
    """Construct (not yet activate) a registry backend on what the artifact (or the named file) holds for it."""
    return backend_kind(name)(artifact_dir, precision=precision, max_batch=max_batch, threads=threads, model_file=model_file)
