"""ONNX Runtime's CUDA execution provider: the fp16 model by default, inputs and outputs bound with IOBinding.

IOBinding copies each batch to the GPU once, into a buffer allocated once per batch size, instead of
letting `run()` allocate and copy on every call. Needs `onnxruntime-gpu` (`make install-gpu`) and an
NVIDIA driver; everything GPU-specific is imported here only, so CPU machines never load it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.backends.base import BackendUnavailable
from runtime.backends.cudart import INSTALL_HINT, gpu_unavailable_reason
from runtime.backends.ort_cpu import OrtCpuBackend


class OrtCudaBackend(OrtCpuBackend):
    name = "ort-cuda"
    default_precision = "fp16"
    device = "cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")

    def __init__(self, *args: Any, device_id: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device_id = device_id
        self.bindings: dict[int, tuple[Any, Any]] = {}  # batch size -> (IOBinding, input OrtValue on the GPU)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return f"onnxruntime is not installed; {INSTALL_HINT}"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (CPU-only build); {INSTALL_HINT}"
        return gpu_unavailable_reason()

    def provider_options(self) -> list[Any]:
        return [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]

    def activate(self) -> None:
        super().activate()
        if self.session.get_providers()[0] != "CUDAExecutionProvider":
            # ORT falls back to the CPU, with only a log line, when CUDA or cuDNN libraries are missing.
            self.session = None
            raise BackendUnavailable(
                f"onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries missing?); {INSTALL_HINT}"
            )

    def _binding(self, batch: int) -> tuple[Any, Any]:
        if batch not in self.bindings:
            import onnxruntime as ort

            shape = (batch, 3, *self.meta.preprocessing.input_size)
            x_gpu = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", self.device_id)
            io = self.session.io_binding()
            io.bind_ortvalue_input(self.input.name, x_gpu)
            for name in self.output_names:
                io.bind_output(name, "cuda", self.device_id)
            self.bindings[batch] = (io, x_gpu)
        return self.bindings[batch]

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        io, x_gpu = self._binding(len(pixel_values))
        x_gpu.update_inplace(np.ascontiguousarray(pixel_values, dtype=np.float32))
        self.session.run_with_iobinding(io)
        return dict(zip(self.output_names, io.copy_outputs_to_cpu()))

    def deactivate(self) -> None:
        self.bindings.clear()
        super().deactivate()
