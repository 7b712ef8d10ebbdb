"""`ort-cpu-optimum-style`: the same checkpoint exported the way Hugging Face Optimum does it, for comparison.

Optimum exports with torch's legacy (TorchScript) exporter and then runs
`onnxruntime.transformers.optimizer.optimize_model(model_type="vit")`. The benchmark puts that model
beside ours to show whether our export (dynamo, opset 23, one fused `Attention` per layer) is at least
as fast. It is a benchmark-only backend: the model is rebuilt from the checkpoint the artifact names
into a temporary folder when the backend is activated, and deleted when it is deactivated.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from runtime.backends.ort_cpu import OrtCpuBackend

LEGACY_OPSET = 17  # the first opset with LayerNormalization; Optimum's ViT default is lower, never higher
# Optimum's exporter loads the model with transformers' classic (eager) attention, the pattern
# onnxruntime.transformers' fusions were written for.
ATTN_IMPLEMENTATION = "eager"


class OptimumStyleBackend(OrtCpuBackend):
    name = "ort-cpu-optimum-style"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.precision != "fp32":
            raise ValueError(f"{self.name} runs fp32 only, not {self.precision}")
        self.workdir: tempfile.TemporaryDirectory[str] | None = None
        self.info: dict[str, Any] = {}  # how the model was built; the benchmark records it

    def activate(self) -> None:
        self.workdir = tempfile.TemporaryDirectory(prefix="deit-optimum-style-")
        self.model_file, fused = build_optimum_style(
            self.meta.checkpoint, self.meta.weights, self.meta.task, Path(self.workdir.name)
        )
        self.info = {"exporter": f"torch.onnx.export(dynamo=False, opset {LEGACY_OPSET})",
                     "attn_implementation": ATTN_IMPLEMENTATION, "fused_ops": fused}
        super().activate()

    def deactivate(self) -> None:
        super().deactivate()
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def build_optimum_style(checkpoint: str, weights: str, task: str, out_dir: Path) -> tuple[Path, dict[str, int]]:
    """Legacy-export the checkpoint and apply ORT's transformer optimizer.

    Returns the optimized file and the optimizer's fused-operator counts (which fusions happened).
    """
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from export.onnx_export import NamedOutputs
    from runtime.checkpoints import load_checkpoint

    ckpt = load_checkpoint(checkpoint, weights, task, ATTN_IMPLEMENTATION)
    h, w = ckpt.preprocessing.input_size
    raw, optimized = out_dir / "legacy.onnx", out_dir / "optimized.onnx"
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            NamedOutputs(ckpt.model, ckpt.output_names).eval(),
            (torch.randn(1, 3, h, w),),
            str(raw),
            dynamo=False,
            opset_version=LEGACY_OPSET,
            input_names=["pixel_values"],
            output_names=ckpt.output_names,
            dynamic_axes={name: {0: "batch"} for name in ["pixel_values", *ckpt.output_names]},
        )
    heads, hidden = int(ckpt.config["num_attention_heads"]), int(ckpt.config["hidden_size"])
    model = optimize_model(str(raw), model_type="vit", num_heads=heads, hidden_size=hidden)
    model.save_model_to_file(str(optimized))
    return optimized, {op: n for op, n in model.get_fused_operator_statistics().items() if n}
