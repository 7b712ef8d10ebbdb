"""Backend registry: a name maps to the module and class that implement it, imported only when used."""

from __future__ import annotations

import importlib
from pathlib import Path

from runtime.backends.base import Backend, BackendUnavailable, InputSpec

__all__ = ["BACKENDS", "AUTO_ORDER", "Backend", "BackendUnavailable", "InputSpec", "backend_class", "create", "pick_auto"]

BACKENDS: dict[str, str] = {
    "trt": "runtime.backends.trt:TensorRTBackend",
    "ort-trt": "runtime.backends.ort_trt:OrtTensorRTBackend",
    "ort-cuda": "runtime.backends.ort_cuda:OrtCudaBackend",
    "ort-cpu": "runtime.backends.ort_cpu:OrtCpuBackend",
    "torch-eager": "runtime.backends.torch_eager:TorchEagerBackend",
    "torch-sdpa": "runtime.backends.torch_sdpa:TorchSdpaBackend",
}
# What `auto` tries, fastest first.
AUTO_ORDER = ("trt", "ort-cuda", "ort-cpu")


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as err:
        raise BackendUnavailable(f"backend {name!r} is not installed ({err})") from None


def pick_auto(artifact_dir: str | Path) -> tuple[str, dict[str, str]]:
    """The fastest backend that can run this artifact here, and why each faster one was passed over."""
    skipped: dict[str, str] = {}
    for name in AUTO_ORDER:
        try:
            cls = backend_class(name)
            reason = cls.unavailable_reason() or cls.missing_files(Path(artifact_dir))
        except BackendUnavailable as err:
            reason = str(err)
        if not reason:
            return name, skipped
        skipped[name] = reason
    raise BackendUnavailable("no backend can run this artifact: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))


def create(name: str, artifact_dir: str | Path, precision: str | None = None, max_batch: int = 8) -> Backend:
    """Construct (not yet activate) a backend; `auto` picks the fastest available."""
    if name == "auto":
        name, _ = pick_auto(artifact_dir)
    return backend_class(name)(artifact_dir, precision=precision, max_batch=max_batch)
