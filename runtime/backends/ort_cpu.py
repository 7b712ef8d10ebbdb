"""ONNX Runtime on the CPU: runs every ONNX file of an artifact (fp32, fp16, int8)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import INT8_CPU_FILE, ArtifactError
from runtime.backends.base import Backend


class OrtCpuBackend(Backend):
    name = "ort-cpu"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __init__(self, *args: Any, threads: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads = threads or len(os.sched_getaffinity(0))
        self.session: Any = None

    @classmethod
    def model_file_for(cls, artifact_dir: Path, precision: str) -> Path:
        """On the CPU provider alone, int8 prefers the CPU-tuned variant (faster there, same accuracy
        gate); GPU subclasses keep the Q/DQ model."""
        cpu = Path(artifact_dir) / INT8_CPU_FILE
        if precision == "int8" and cls.providers == ("CPUExecutionProvider",) and cpu.is_file():
            return cpu
        return super().model_file_for(artifact_dir, precision)

    def session_options(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        return opts

    def provider_options(self) -> list[Any]:
        return list(self.providers)

    def activate(self) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(
                str(self.model_file), sess_options=self.session_options(), providers=self.provider_options()
            )
        except Exception as err:  # ORT raises its own Fail/InvalidGraph types
            raise ArtifactError(f"{self.model_file}: ONNX Runtime cannot load it ({str(err).splitlines()[0]})") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {self.input.name: pixel_values})
        return dict(zip(self.output_names, outputs))

    def deactivate(self) -> None:
        self.session = None
