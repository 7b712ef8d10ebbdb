"""`ort-*-optimum-style`: the same checkpoint exported the way Hugging Face Optimum does it, as an anchor row.

Optimum exports with torch's legacy (TorchScript) exporter and then runs
`onnxruntime.transformers.optimizer.optimize_model(model_type="vit")` (with `use_gpu=True` and an
fp16 conversion for the CUDA provider). The benchmark puts that model beside ours to show that our
graphs are at least as fast. These are ONNX Runtime configurations (runtime/backends/onnxruntime.py)
run on a `ModelSource` that builds the model from the checkpoint the artifact names into a
temporary folder when the backend is activated, instead of reading an artifact file.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.artifact import MODEL_FILES, ORT_FP16_SLN_FILE, ArtifactMeta
from runtime.backends.base import ModelSource
from runtime.backends.onnxruntime import CPU_EP, CUDA_EP, OrtConfig, OrtKind

LEGACY_OPSET = 17  # the first opset with LayerNormalization; Optimum's ViT default is lower, never higher
# Optimum's exporter loads the model with transformers' classic (eager) attention, the pattern
# onnxruntime.transformers' fusions were written for.
ATTN_IMPLEMENTATION = "eager"


def build_optimum_style(meta: ArtifactMeta, precision: str, out_dir: Path, use_gpu: bool) -> tuple[Path, dict[str, Any]]:
    """Legacy-export the checkpoint, apply ORT's transformer optimizer (and fp16 for the GPU).

    Returns the model file and how it was built, with the optimizer's fused-operator counts.
    """
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from export.onnx_export import NamedOutputs
    from runtime.checkpoints import load_checkpoint

    ckpt = load_checkpoint(meta.checkpoint, meta.weights, meta.task, ATTN_IMPLEMENTATION)
    names = ckpt.meta.output_names
    h, w = ckpt.meta.preprocessing.input_size
    raw, optimized = out_dir / "legacy.onnx", out_dir / f"optimized.{precision}.onnx"
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            NamedOutputs(ckpt.model, names).eval(),
            (torch.randn(1, 3, h, w),),
            str(raw),
            dynamo=False,
            opset_version=LEGACY_OPSET,
            input_names=["pixel_values"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["pixel_values", *names]},
        )
    heads, hidden = int(ckpt.meta.config["num_attention_heads"]), int(ckpt.meta.config["hidden_size"])
    model = optimize_model(str(raw), model_type="vit", num_heads=heads, hidden_size=hidden, use_gpu=use_gpu)
    fused = {op: n for op, n in model.get_fused_operator_statistics().items() if n}
    if precision == "fp16":
        model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(optimized))
    info = {"exporter": f"torch.onnx.export(dynamo=False, opset {LEGACY_OPSET})", "attn_implementation": ATTN_IMPLEMENTATION,
            "optimizer": f"optimize_model(model_type='vit', use_gpu={use_gpu})", "fused_ops": fused}
    return optimized, info


@dataclass
class OptimumStyleSource(ModelSource):
    """The artifact's checkpoint, exported and optimized the Optimum way when the backend activates."""

    use_gpu: bool = False
    workdir: tempfile.TemporaryDirectory[str] | None = None

    def load(self) -> Path:
        self.workdir = tempfile.TemporaryDirectory(prefix="deit-optimum-style-")
        self.file, self.info = build_optimum_style(self.meta, self.precision, Path(self.workdir.name), self.use_gpu)
        return self.file

    def release(self) -> None:
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


class OptimumStyleKind(OrtKind):
    """An ONNX Runtime configuration whose model is built from the checkpoint, not read from the artifact."""

    def __init__(self, config: OrtConfig, use_gpu: bool) -> None:
        super().__init__(config)
        self.use_gpu = use_gpu

    def model_file_for(self, artifact_dir: Path, precision: str) -> Path:
        return Path(artifact_dir) / MODEL_FILES["fp32"]  # its metadata names the checkpoint

    def source(self, artifact_dir: str | Path, precision: str | None = None, model_file: Path | None = None) -> ModelSource:
        base = super().source(artifact_dir, precision, model_file)
        return OptimumStyleSource(base.artifact_dir, base.file, base.precision, base.meta, use_gpu=self.use_gpu)


ORT_CPU_OPTIMUM_STYLE = OptimumStyleKind(OrtConfig(
    name="ort-cpu-optimum-style", device="cpu", providers=(CPU_EP,), default_precision="fp32", files={"fp32": ()},
), use_gpu=False)
ORT_CUDA_OPTIMUM_STYLE = OptimumStyleKind(OrtConfig(
    name="ort-cuda-optimum-style", device="cuda", providers=(CUDA_EP, CPU_EP), default_precision="fp16",
    files={"fp16": (), "fp32": ()}, io_binding=True, cuda_graphs=True,
), use_gpu=True)
# ort-cuda on our fused graph with SkipLayerNormalization in fp16 as well (what the Optimum-style graph runs), with
# ONNX Runtime's strict mode keeping the op's accumulation in fp32: beside `ort-cuda`, a GPU run shows which is faster.
ORT_CUDA_SLN16 = OrtKind(OrtConfig(
    name="ort-cuda-sln16", device="cuda", providers=(CUDA_EP, CPU_EP), default_precision="fp16",
    files={"fp16": (ORT_FP16_SLN_FILE,)}, io_binding=True, cuda_graphs=True,
    cuda_options=(("enable_skip_layer_norm_strict_mode", "1"),),
))
