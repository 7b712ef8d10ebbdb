"""checkpoint -> verified artifacts/<name>/{model.onnx, model.fp16.onnx, export.json, config files}."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.fp16 import convert_to_fp16
from export.onnx_export import OPSET, export_onnx, op_counts, tool_versions
from export.ort_fusion import FP32_OPS, fuse_for_ort, to_ort_fp16
from export.verify import verification_inputs
from runtime.artifact import (MODEL_FILES, ORT_FP16_SLN_FILE, ORT_FUSED_FILES, REPORT_FILE, ArtifactMeta, file_sha256, set_onnx_meta,
                              write_hf_configs, write_json)
from runtime.backends.onnxruntime import ORT_CPU
from runtime.checkpoints import load_checkpoint, model_outputs, parameter_count
from export.compare import compare
from runtime.console import progress_bar
from runtime.errors import GateFailed
from runtime.paths import check_output_dir

FP32_MAX_ABS_DIFF = 1e-4
FP16_MIN_COSINE = 0.999
REPORTED_META = ("checkpoint", "weights", "architecture", "task", "attention", "opset", "preprocessing_source", "versions")
# Files computed from an earlier model.onnx; a new export makes them stale.
DERIVED_GLOBS = ("model.*.onnx", "*.plan", "*.plan.json", "calibration.json", "auto-choice.json")
# Bytes written per model parameter: fp32 + fp16 files (+ ONNX Runtime's fused pair), with headroom.
BYTES_PER_PARAMETER = 4 * 3 * 1.2


@dataclass
class ExportOptions:
    source: str
    out_root: Path = Path("artifacts")
    weights: str = "pretrained"
    task: str = "classification"
    attention: str = "fused"
    fp16: bool = True
    ort_graph: bool = True  # also ONNX Runtime's fused-op graph (model.ort.onnx / model.ort.fp16.onnx) for its CUDA provider
    verify_images: Path | None = None
    verify_limit: int = 32
    progress: bool = True
    name: str | None = None  # artifact folder name; default: the checkpoint's last path part


def export_checkpoint(opts: ExportOptions) -> dict[str, Any]:
    """Export, verify and write the artifact folder; returns the export report (also export.json).

    Everything is written to a staging folder first and moved into place only after every check
    passed, so a failed or interrupted export leaves the previous artifact (or nothing) behind.
    """
    check_output_dir(opts.out_root)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    ort_graph = opts.ort_graph and opts.attention == "fused"  # the rewrite starts from the standard Attention op
    steps = (["load", "export", "verify fp32"] + (["fp16", "verify fp16"] if opts.fp16 else [])
             + (["ort graph", "verify ort graph"] if ort_graph else []) + ["write"])
    with progress_bar(total=len(steps), desc="export", unit="step", enabled=opts.progress) as bar:
        last = t_start

        def step(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            timings[name], last = round(now - last, 3), now
            bar.update(1)
            bar.set_postfix_str(name)

        parameters = parameter_count(opts.source, opts.weights, opts.task)  # from the config: room is checked first
        check_output_dir(opts.out_root, needed_bytes=int(parameters * BYTES_PER_PARAMETER))
        ckpt = load_checkpoint(opts.source, opts.weights, opts.task, attn_implementation="sdpa")
        step("load")
        meta = ckpt.meta.copy(attention=opts.attention, opset=OPSET[opts.attention], versions=tool_versions())
        load_warnings = ckpt.warnings
        model = export_onnx(ckpt, opts.attention)
        torch_model = ckpt.model
        del ckpt
        set_onnx_meta(model, meta)
        step("export")

        name = opts.name or meta.name
        final_dir = opts.out_root / name
        opts.out_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=opts.out_root))
        try:
            report, inputs, reference = _verify_and_write(opts, torch_model, model, meta, staging, step)
            del torch_model  # PyTorch's copy of the weights is not needed past here (a base model is 350 MB)
            if ort_graph:
                report["verification"] |= _ort_graph(model, meta, staging, inputs, reference, report, step)
            report.update({k: getattr(meta, k) for k in REPORTED_META})
            report.update(
                preprocessing=meta.preprocessing.to_dict(),
                warnings=load_warnings,
                parameters=parameters,
                ops={k: v for k, v in op_counts(model).items() if k in ("Attention", "Softmax", "MatMul", "Gemm", "LayerNormalization")},
                timings_s=timings,
                artifact_dir=str(final_dir),
                writer=meta.writer,
            )
            report["config_files"] = write_hf_configs(staging, meta)
            step("write")
            report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
            write_json(staging / REPORT_FILE, report)
            report["removed_stale"] = _publish(staging, final_dir)
            return report
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _verify_and_write(
    opts: ExportOptions, torch_model: torch.nn.Module, model: onnx.ModelProto, meta: ArtifactMeta, staging: Path,
    step: Callable[[str], None],
) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """Write and verify model.onnx (and model.fp16.onnx); the report, the inputs and PyTorch's outputs on them."""
    onnx.save(model, str(staging / MODEL_FILES["fp32"]))
    inputs, n_photos = verification_inputs(meta.preprocessing, opts.verify_images, opts.verify_limit)
    with torch.inference_mode():
        out = model_outputs(torch_model, torch.from_numpy(inputs), meta.output_names)
    reference = {k: v.numpy() for k, v in zip(meta.output_names, out)}
    with ORT_CPU(staging, model_file=staging / MODEL_FILES["fp32"]) as ort_fp32:
        fp32_out = ort_fp32.infer(inputs)
    fp32 = compare(reference, fp32_out) | {"photos": n_photos}
    _gate(fp32["max_abs_diff"] <= FP32_MAX_ABS_DIFF, f"fp32 ONNX differs from PyTorch by {fp32['max_abs_diff']:.3g} (> {FP32_MAX_ABS_DIFF})")
    if meta.task == "classification":
        _gate(fp32["top1_agreement"] == 1.0, f"fp32 ONNX top-1 agrees with PyTorch on only {fp32['top1_agreement']:.1%}")
    step("verify fp32")
    files = {MODEL_FILES["fp32"]: _file_info(staging / MODEL_FILES["fp32"])}
    report: dict[str, Any] = {"verification": {"fp32_vs_torch": fp32}, "files": files}
    if opts.fp16:
        fp16_model = convert_to_fp16(model)
        set_onnx_meta(fp16_model, meta.copy(precision="fp16"))
        onnx.save(fp16_model, str(staging / MODEL_FILES["fp16"]))
        step("fp16")
        with ORT_CPU(staging, model_file=staging / MODEL_FILES["fp16"]) as ort_fp16:
            fp16 = compare(fp32_out, ort_fp16.infer(inputs)) | {"photos": n_photos}
        _gate(fp16["min_cosine"] >= FP16_MIN_COSINE, f"fp16 logits cosine similarity {fp16['min_cosine']:.5f} < {FP16_MIN_COSINE}")
        report["verification"]["fp16_vs_fp32"] = fp16
        files[MODEL_FILES["fp16"]] = _file_info(staging / MODEL_FILES["fp16"])
        step("verify fp16")
    return report, inputs, reference


def _ort_graph(model: onnx.ModelProto, meta: ArtifactMeta, staging: Path, inputs: np.ndarray,
               reference: dict[str, np.ndarray], report: dict[str, Any], step: Callable[[str], None]) -> dict[str, Any]:
    """ONNX Runtime's fused-op graph, fp32 and fp16, each verified: the fp32 twin against PyTorch with model.onnx's
    gates (the contrib ops have fp32 CPU kernels), the fp16 file against it (on a CPU ORT runs its ops in fp32 behind
    casts, so this checks the conversion; the fp16 kernels themselves run only on a GPU)."""
    fused, counts = fuse_for_ort(model, int(meta.config["num_attention_heads"]))
    graph = {"graph": "onnxruntime-fused", "fused_ops": counts}
    set_onnx_meta(fused, meta.copy(extra=graph))
    onnx.save(fused, str(staging / ORT_FUSED_FILES["fp32"]))
    for name, fp32_ops in ((ORT_FUSED_FILES["fp16"], FP32_OPS), (ORT_FP16_SLN_FILE, ())):
        fused16 = to_ort_fp16(fused, fp32_ops)
        set_onnx_meta(fused16, meta.copy(precision="fp16", extra=graph | {"fp32_ops": list(fp32_ops)}))
        onnx.save(fused16, str(staging / name))
        del fused16  # a base model's graph is 350 MB: hold one fp16 copy at a time
    del fused
    step("ort graph")
    photos = report["verification"]["fp32_vs_torch"]["photos"]
    with ORT_CPU(staging, model_file=staging / ORT_FUSED_FILES["fp32"]) as ort32:
        got32 = ort32.infer(inputs)
    with ORT_CPU(staging, model_file=staging / ORT_FUSED_FILES["fp16"]) as ort16:
        got16 = ort16.infer(inputs)
    with ORT_CPU(staging, model_file=staging / ORT_FP16_SLN_FILE) as ort16_sln:
        got16_sln = ort16_sln.infer(inputs)
    fp32 = compare(reference, got32) | {"photos": photos}
    _gate(fp32["max_abs_diff"] <= FP32_MAX_ABS_DIFF and (meta.task != "classification" or fp32["top1_agreement"] == 1.0),
          f"{ORT_FUSED_FILES['fp32']} differs from PyTorch by {fp32['max_abs_diff']:.3g} (top-1 {fp32['top1_agreement']:.1%})")
    fp16 = compare(got32, got16) | {"photos": photos}
    _gate(fp16["min_cosine"] >= FP16_MIN_COSINE, f"{ORT_FUSED_FILES['fp16']} logits cosine {fp16['min_cosine']:.5f} < {FP16_MIN_COSINE}")
    fp16_sln = compare(got32, got16_sln) | {"photos": photos}
    _gate(fp16_sln["min_cosine"] >= FP16_MIN_COSINE, f"{ORT_FP16_SLN_FILE} logits cosine {fp16_sln['min_cosine']:.5f} < {FP16_MIN_COSINE}")
    for name in (*ORT_FUSED_FILES.values(), ORT_FP16_SLN_FILE):
        report["files"][name] = _file_info(staging / name)
    report["ort_fused_ops"] = counts
    step("verify ort graph")
    return {"ort_fp32_vs_torch": fp32, "ort_fp16_vs_ort_fp32": fp16, "ort_fp16_sln_vs_ort_fp32": fp16_sln}


def _gate(ok: bool | np.bool_, message: str) -> None:
    if not ok:
        raise GateFailed(f"verification failed: {message}; nothing written")


def _file_info(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _publish(staging: Path, final_dir: Path) -> list[str]:
    """Move verified files into the artifact folder (the report last) and drop files derived from the old model."""
    final_dir.mkdir(parents=True, exist_ok=True)
    (final_dir / REPORT_FILE).unlink(missing_ok=True)  # the folder is not an artifact while files change
    old = sorted({p for pattern in DERIVED_GLOBS for p in final_dir.glob(pattern)})
    for path in old:
        path.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == REPORT_FILE):
        path.replace(final_dir / path.name)
    return [p.name for p in old if not (final_dir / p.name).exists()]
