"""OpenVINO on the CPU (openvino-cpu): reads the project's ONNX files as they are, opset-23 `Attention` included.

- fp32 runs `model.onnx` with INFERENCE_PRECISION_HINT f32 set explicitly: OpenVINO 2026 silently picks
  bf16 on a CPU that reports avx512_bf16, which changes the numbers and is faster on one CPU (AMD Zen 4,
  1.85x) but slower on another (Intel Xeon without AMX), as measured (README, CPU). fp32 means fp32.
- bf16 runs the same file with the bf16 hint, only where the plugin's OPTIMIZATION_CAPABILITIES has BF16.
- int8 runs our explicit symmetric Q/DQ file (`model.int8.onnx`), which OpenVINO fuses into int8
  kernels (the fastest int8 path measured on VNNI CPUs); its float parts keep the f32 hint, so the row's
  error is the quantization's alone.

One stream with the latency hint and INFERENCE_NUM_THREADS = threads: `run` is synchronous, one request
at a time, so more streams would only split the cores among requests that never run together. The model
is compiled once for batches 1..max_batch (a bounded batch dimension: measured as fast as a static shape
per batch size, without a compile per size) and one infer request is reused.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import MODEL_FILES, ArtifactError, ArtifactMeta
from runtime.backends.base import Backend, BackendKind, BackendUnavailable, ModelSource
from runtime.cpuinfo import usable_cores
from runtime.errors import UsageError

INSTALL_HINT = "pip install openvino (or `make install`, whose cpu extra has it)"
# precision -> (artifact file, INFERENCE_PRECISION_HINT)
FILES = {"fp32": (MODEL_FILES["fp32"], "f32"), "bf16": (MODEL_FILES["fp32"], "bf16"),
         "int8": (MODEL_FILES["int8"], "f32")}


@cache
def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can run fast here (e.g. FP32, BF16, INT8): its own view of the instruction set."""
    import openvino as ov

    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def ov_message(err: BaseException) -> str:
    """OpenVINO's own line of an error, without the 'Exception from src/...cpp:N:' lines that wrap it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("Exception from ")]
    return lines[0][:400] if lines else type(err).__name__


class OpenVinoKind(BackendKind):
    """The registry entry: answers the registry's questions and builds OpenVinoBackends."""

    name = "openvino-cpu"
    precisions = tuple(FILES)

    def unavailable_reason(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return f"openvino is not installed; {INSTALL_HINT}"
        return None

    def precision_unavailable(self, precision: str) -> str | None:
        """Why this CPU cannot run `precision` fast (None if it can): bf16 needs the plugin's BF16 capability."""
        if precision != "bf16" or self.unavailable_reason():
            return None
        caps = cpu_capabilities()
        if "BF16" in caps:
            return None
        return (f"this CPU has no bf16 instructions OpenVINO uses (OPTIMIZATION_CAPABILITIES: {', '.join(caps)}; "
                "needs avx512_bf16 or AMX-BF16)")

    def model_file_for(self, artifact_dir: Path, precision: str) -> Path:
        return Path(artifact_dir) / FILES[precision][0]

    def open_file(self, file: Path, artifact_dir: Path, asked: str | None) -> tuple[str, ArtifactMeta]:
        precision, meta = super().open_file(file, artifact_dir, asked)  # an fp32 file may run at bf16: the same file, another hint
        if precision not in FILES:
            raise UsageError(f"{file} is a {precision} model; {self.name} runs {', '.join(FILES)}")
        return precision, meta

    def backend(self, source: ModelSource, *, max_batch: int = 8, threads: int | None = None) -> OpenVinoBackend:
        return OpenVinoBackend(source, self, max_batch=max_batch, threads=threads)


class OpenVinoBackend(Backend):
    def __init__(self, source: ModelSource, kind: OpenVinoKind, **kwargs: Any) -> None:
        super().__init__(source, kind, **kwargs)
        self.ov_kind = kind
        self.threads = self.threads or usable_cores()
        self.hint = FILES[self.precision][1]
        self.request: Any = None
        self.output_names: list[str] = []
        self.compiled_precision: str | None = None  # what the compiled model reports, to show the hint held

    def activate(self) -> None:
        import openvino as ov

        reason = self.ov_kind.precision_unavailable(self.precision)
        if reason:
            raise BackendUnavailable(f"{self.name} cannot run bf16 here: {reason}")
        core = ov.Core()
        try:
            model = core.read_model(str(self.model_file))
            _, c, h, w = self.input_shape(1)
            model.reshape({model.inputs[0]: ov.PartialShape([ov.Dimension(1, self.max_batch), c, h, w])})
            compiled = core.compile_model(model, "CPU", {
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                "INFERENCE_NUM_THREADS": self.threads,
                "INFERENCE_PRECISION_HINT": self.hint,
            })
        except RuntimeError as err:  # OpenVINO reports unreadable or unsupported models as RuntimeError
            raise ArtifactError(f"{self.model_file}: OpenVINO cannot compile it ({ov_message(err)})") from None
        self.compiled_precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self.request = compiled.create_infer_request()

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        # share_inputs: no copy of the batch (the call is synchronous); outputs are copies (the next run reuses them).
        result = self.request.infer([np.ascontiguousarray(pixel_values, dtype=np.float32)], share_inputs=True)
        return {name: np.asarray(result[i], dtype=np.float32) for i, name in enumerate(self.output_names)}

    def deactivate(self) -> None:
        self.request = None

    def describe(self) -> dict[str, object]:
        return super().describe() | {"inference_precision": self.compiled_precision, "streams": 1,
                                     "performance_hint": "LATENCY"}


OPENVINO_CPU = OpenVinoKind()
