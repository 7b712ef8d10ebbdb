"""PyTorch (transformers) backends: the reference every export is compared to, and the baselines a user would try.

One backend, configured per row of the transformers docs' table and beyond it:

- torch-eager: transformers' eager attention (the reference for agreement checks);
- torch-sdpa: `scaled_dot_product_attention` (flash / memory-efficient kernels on a GPU);
- torch-sdpa-graph: SDPA captured once per batch size into a CUDA graph and replayed (GPU only);
- torch-compile: `torch.compile` (mode "reduce-overhead", i.e. with CUDA graphs, on a GPU).

They run on the GPU when torch sees one, else on the CPU, and say which (`describe()`). fp32 runs
with TF32 off (the published fp32 figures are true fp32); fp16 and bf16 cast the model. On the GPU,
`time_runs` times device-resident inputs with CUDA events. The model is rebuilt from the checkpoint
the artifact names (`runtime.checkpoints`), so a named ONNX file cannot be honoured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import MODEL_FILES, ArtifactMeta
from runtime.backends.base import Backend, BackendKind, BackendUnavailable, ModelSource
from runtime.checkpoints import load_checkpoint, model_outputs
from runtime.errors import UsageError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class TorchConfig:
    name: str
    attn_implementation: str  # "eager" | "sdpa"
    cuda_graphs: bool = False
    compile: bool = False


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchKind(BackendKind):
    """A registry entry: answers the registry's questions from a TorchConfig and builds TorchBackends."""

    precisions = tuple(DTYPES)

    def __init__(self, config: TorchConfig) -> None:
        self.config = config
        self.name = config.name

    @property
    def device(self) -> str:  # pyright: ignore[reportIncompatibleVariableOverride]  (asked when needed: it depends on the machine)
        return "cuda" if cuda_available() else "cpu"

    def unavailable_reason(self) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "PyTorch is not installed (pip install torch)"
        if self.config.cuda_graphs and not cuda_available():
            return "CUDA graphs need an NVIDIA GPU that torch can use (torch.cuda.is_available() is False)"
        return None

    def model_file_for(self, artifact_dir: Path, precision: str) -> Path:
        return Path(artifact_dir) / MODEL_FILES["fp32"]  # metadata only: the weights come from the checkpoint

    def open_file(self, file: Path, artifact_dir: Path, asked: str | None) -> tuple[str, ArtifactMeta]:
        raise UsageError(f"{file}: {self.name} rebuilds the PyTorch model from the checkpoint the artifact "
                         f"names and cannot run an ONNX file; pass the artifact folder {artifact_dir} instead")

    def backend(self, source: ModelSource, *, max_batch: int = 8, threads: int | None = None) -> TorchBackend:
        return TorchBackend(source, self, max_batch=max_batch, threads=threads)


class TorchBackend(Backend):
    def __init__(self, source: ModelSource, kind: TorchKind, **kwargs: Any) -> None:
        super().__init__(source, kind, **kwargs)
        self.config = kind.config
        self.clock = "cuda-events" if self.device == "cuda" else "host"
        self.model: Any = None
        self.output_names: list[str] = []
        self._restore: list[Any] = []  # undo of the global torch settings activate() changed
        self._graphs: dict[int, tuple[Any, Any, tuple[Any, ...]]] = {}  # batch -> (graph, static input, static outputs)
        self._inputs: dict[int, Any] = {}  # batch -> device-resident input buffer

    def activate(self) -> None:
        import torch

        if self.threads:
            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            self._restore.append(lambda: torch.set_num_threads(previous))
        if self.device == "cuda":
            self._tf32_off()
        loaded = load_checkpoint(self.meta.checkpoint, self.meta.weights, self.meta.task, self.config.attn_implementation)
        self.output_names = loaded.meta.output_names
        self.model = loaded.model.to(device=self.device, dtype=getattr(torch, DTYPES[self.precision]))
        if self.config.compile:
            mode = "reduce-overhead" if self.device == "cuda" else None
            self.model = torch.compile(self.model, mode=mode, dynamic=False)

    def _tf32_off(self) -> None:
        """fp32 rows are true fp32: TF32 tensor-core matmuls and convolutions stay off while this backend is active.

        torch 2.9+ API (`fp32_precision`); reading the legacy `allow_tf32` flags after it is used raises.
        """
        import torch

        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv  # pyright: ignore[reportAttributeAccessIssue]
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = "ieee"

        def restore() -> None:
            matmul.fp32_precision, conv.fp32_precision = saved

        self._restore.append(restore)

    def _forward(self, x: Any) -> tuple[Any, ...]:
        import torch

        with torch.no_grad():
            return model_outputs(self.model, x, self.output_names)

    def _device_input(self, pixel_values: np.ndarray) -> Any:
        """The batch in a device buffer that stays at one address per batch size (CUDA graphs replay it)."""
        import torch

        n = len(pixel_values)
        if n not in self._inputs:
            dtype = next(self.model.parameters()).dtype
            self._inputs[n] = torch.empty(self.input_shape(n), dtype=dtype, device=self.device)
        buffer = self._inputs[n]
        buffer.copy_(torch.from_numpy(np.ascontiguousarray(pixel_values)), non_blocking=False)
        return buffer

    def _launch(self, x: Any) -> tuple[Any, ...]:
        if not self.config.cuda_graphs:
            return self._forward(x)
        n = x.shape[0]
        if n not in self._graphs:
            self._graphs[n] = self._capture(x)
        graph, _, outputs = self._graphs[n]
        graph.replay()
        return outputs

    def _capture(self, x: Any) -> tuple[Any, Any, tuple[Any, ...]]:
        """Warm up on a side stream (cuBLAS/cuDNN pick their kernels outside the capture), then capture."""
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._forward(x)
        return graph, x, outputs

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        if self.device == "cpu" and not self.config.cuda_graphs:
            x = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(next(self.model.parameters()).dtype)
            outputs = self._forward(x)
        else:
            outputs = self._launch(self._device_input(pixel_values))
        return {k: v.float().cpu().numpy() for k, v in zip(self.output_names, outputs)}

    def time_runs(self, pixel_values: np.ndarray, iterations: int) -> list[float]:
        """GPU milliseconds per forward pass on a device-resident batch, from CUDA events."""
        import torch

        if self.device != "cuda":
            raise BackendUnavailable(f"{self.name} runs on the CPU here; it is timed on the host clock")
        x = self._device_input(pixel_values)
        self._launch(x)  # captures the graph / compiles for this batch size outside the timed runs
        times = []
        for _ in range(iterations):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._launch(x)
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        return times

    def deactivate(self) -> None:
        self._graphs.clear()
        self._inputs.clear()
        self.model = None
        while self._restore:
            self._restore.pop()()
        self._release_memory()

    def _release_memory(self) -> None:
        """Free what compiled and captured runs hold, so the next benchmark row starts with the memory this one took:
        torch.compile's caches (with reduce-overhead, its CUDA-graph memory pool), then the caching allocator's free blocks."""
        import gc

        import torch

        if self.config.compile:
            torch.compiler.reset()
        gc.collect()  # captured graphs and compiled modules hold their tensors until collected
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = super().describe() | {"attn_implementation": self.config.attn_implementation}
        if self.device == "cpu":
            info["device_note"] = "CPU: torch sees no CUDA GPU"
        else:
            info["tf32"] = "off"
        return info


TORCH_EAGER = TorchKind(TorchConfig("torch-eager", "eager"))
TORCH_SDPA = TorchKind(TorchConfig("torch-sdpa", "sdpa"))
TORCH_SDPA_GRAPH = TorchKind(TorchConfig("torch-sdpa-graph", "sdpa", cuda_graphs=True))
TORCH_COMPILE = TorchKind(TorchConfig("torch-compile", "sdpa", compile=True))
