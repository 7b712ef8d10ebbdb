"""ONNX Runtime's TensorRT execution provider: the same ONNX files as `trt`, built by ORT instead.

A second route to TensorRT, to compare with our own engines. ORT builds the engine on first use and
keeps it in an engine cache; ORT does not notice when the ONNX file changes, so the cache folder is
named after the file's sha256 and a re-exported model gets a fresh one.
"""

from __future__ import annotations

from typing import Any

from runtime.backends import cudart
from runtime.backends.base import BackendUnavailable
from runtime.backends.ort_cpu import OrtCpuBackend
from runtime.backends.trt import file_sha256, tensorrt_unavailable_reason

TRT_EP = "TensorrtExecutionProvider"
WORKSPACE_BYTES = 4 << 30


class OrtTensorRTBackend(OrtCpuBackend):
    name = "ort-trt"
    default_precision = "fp16"
    device = "cuda"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import onnxruntime as ort

        if TRT_EP not in ort.get_available_providers():
            return (f"this onnxruntime has no {TRT_EP} (the CPU package is installed); "
                    f"{cudart.INSTALL_HINT}")
        return tensorrt_unavailable_reason() or cudart.gpu_unavailable_reason()

    def provider_options(self) -> list[Any]:
        cache = self.artifact_dir / "ort-trt-cache" / f"{self.precision}-{file_sha256(self.model_file)[:16]}"
        cache.mkdir(parents=True, exist_ok=True)
        h, w = self.input.shape[2:]

        def shape(batch: int) -> str:
            return f"{self.input.name}:{batch}x3x{h}x{w}"

        options = {
            "device_id": 0,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_max_workspace_size": WORKSPACE_BYTES,
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(self.max_batch),
            "trt_profile_max_shapes": shape(self.max_batch),
        }
        return [(TRT_EP, options), "CUDAExecutionProvider", "CPUExecutionProvider"]

    def activate(self) -> None:
        super().activate()
        used = self.session.get_providers()
        if not used or used[0] != TRT_EP:
            self.session = None
            raise BackendUnavailable(f"ONNX Runtime could not start {TRT_EP} for {self.model_file} "
                                     f"(providers in use: {', '.join(used)}); see ONNX Runtime's log above")
