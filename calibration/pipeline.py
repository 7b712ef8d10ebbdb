"""artifact + photos -> model.int8.onnx (explicit Q/DQ), model.int8-trt.onnx (the same with fp16 as the high-precision
type, for TensorRT), model.int8-cpu.onnx, calibration.json, every file gated on its agreement with fp32."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.data import Batch, DataError, balanced_order, discover, load_batch
from calibration.evaluate import run_logits
from calibration.quantize import METHODS, amax_table, collect_stats, insert_qdq, plan_qdq, quantize_dynamic_cpu
from runtime.artifact import INT8_CPU_FILE, MODEL_FILES, ArtifactMeta, atomic_path, read_onnx_meta, set_onnx_meta, write_json
from export.fp16 import convert_to_fp16
from runtime.backends.trt import INT8_TRT_FILE, engine_path, sidecar_path
from export.compare import compare
from runtime.errors import UsageError
from runtime.paths import check_output_dir

DEFAULT_METHOD = "percentile"  # chosen by measurement: README "Calibration" (method comparison)
# Below this many evaluation images one disagreement moves the agreement by more than 1%: the gate
# could not tell 99% from 97%, so it is reported but not applied (and auto never picks such int8).
MIN_EVAL_IMAGES = 100
FP32_INT8 = ("fp32", "int8")  # the names of the accuracy figures in calibration.json (fp32_top1, int8_top1, ...)


@dataclass
class CalibrationOptions:
    artifact_dir: Path
    calib_dir: Path
    eval_dir: Path | None = None  # default: the calibration folder, minus the calibration images
    labels_file: Path | None = None  # for a flat val-style eval folder
    num_images: int = 512
    num_eval: int = 500
    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    attention_qdq: bool = False
    compare_methods: bool = False
    cpu_variant: bool = True
    min_agreement: float = 0.99
    seed: int = 0
    batch: int = 8
    cache_dir: Path | None = None  # default: <artifact>/.calib-cache
    cache: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(f"--min-agreement {self.min_agreement}: a fraction between 0 and 1 (0.99 = 99%)")
        if not 0.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile {self.percentile}: must be in (0, 100]")
        if self.num_images < 1 or self.num_eval < 1 or self.batch < 1:
            raise UsageError("--num-images, --num-eval and the batch size must be at least 1")


def calibrate(opts: CalibrationOptions) -> dict[str, Any]:
    """Calibrate, quantize, evaluate, gate; write the files only when the gate passes.

    Returns the report (also written as calibration.json when it passed). `report["passed"]` is
    False when int8 disagreed with fp32 too often; nothing is written then and earlier files stay.
    """
    if opts.method not in METHODS:
        raise ValueError(f"unknown calibration method {opts.method!r}; choose one of {', '.join(METHODS)}")
    t0 = time.perf_counter()
    fp32_path = opts.artifact_dir / MODEL_FILES["fp32"]
    meta = read_onnx_meta(fp32_path)
    check_output_dir(opts.artifact_dir, "--model", needed_bytes=2 * fp32_path.stat().st_size)
    model = onnx.load(str(fp32_path))
    warnings: list[str] = []
    cache = (opts.cache_dir or opts.artifact_dir / ".calib-cache") if opts.cache else None

    calib = load_batch(balanced_order(discover(opts.calib_dir), opts.seed), opts.num_images, meta.preprocessing, cache, opts.progress)
    _check_count(calib, opts.num_images, opts.calib_dir, "calibration", warnings)
    eval_pool = discover(opts.eval_dir or opts.calib_dir, opts.labels_file)
    eval_order = balanced_order(eval_pool, opts.seed + 1, exclude={Path(f) for f in calib.files} | {Path(f) for f in calib.skipped})
    if not eval_order:
        raise DataError(f"{opts.eval_dir or opts.calib_dir}: no images left for evaluation after taking {len(calib.files)} "
                        "for calibration; pass --eval-dir or lower --num-images")
    evals = load_batch(eval_order, opts.num_eval, meta.preprocessing, cache, opts.progress)
    _check_count(evals, opts.num_eval, opts.eval_dir or opts.calib_dir, "evaluation", warnings)
    labels = evals.labels if evals.labelled else None
    t_data = time.perf_counter()

    plan = plan_qdq(model, opts.attention_qdq)
    batches = [calib.x[i : i + opts.batch] for i in range(0, len(calib.x), opts.batch)]
    hists = collect_stats(model, plan.activations, batches, len(batches), opts.progress)
    t_calib = time.perf_counter()

    fp32_logits = run_logits(model, evals.x, opts.batch, "fp32", opts.progress)
    methods = METHODS if opts.compare_methods else (opts.method,)
    candidates: dict[str, onnx.ModelProto] = {}
    comparison: dict[str, Any] = {}
    for method in methods:
        amax = amax_table(hists, method, opts.percentile)
        candidates[method] = insert_qdq(model, plan, amax)
        int8_logits = run_logits(candidates[method], evals.x, opts.batch, method, opts.progress)
        comparison[method] = compare({"logits": fp32_logits}, {"logits": int8_logits}, labels, FP32_INT8)
        comparison[method]["scales"] = amax
    shipped = {MODEL_FILES["int8"]: candidates[opts.method]}
    accuracy = {MODEL_FILES["int8"]: {k: v for k, v in comparison[opts.method].items() if k != "scales"}}
    # TensorRT's int8 file: under strong typing the layers without Q/DQ run in the graph's own type, so this
    # one carries fp16 there (scales fp16 too, LayerNorm kept fp32 as in model.fp16.onnx). Checked on the CPU too.
    shipped[INT8_TRT_FILE] = convert_to_fp16(candidates[opts.method])
    int8_logits = run_logits(shipped[INT8_TRT_FILE], evals.x, opts.batch, "int8-trt", opts.progress)
    accuracy[INT8_TRT_FILE] = compare({"logits": fp32_logits}, {"logits": int8_logits}, labels, FP32_INT8)
    if opts.cpu_variant:
        shipped[INT8_CPU_FILE] = quantize_dynamic_cpu(model)
        int8_logits = run_logits(shipped[INT8_CPU_FILE], evals.x, opts.batch, "int8-cpu", opts.progress)
        accuracy[INT8_CPU_FILE] = compare({"logits": fp32_logits}, {"logits": int8_logits}, labels, FP32_INT8)
    t_eval = time.perf_counter()

    failures = [f"{name}: top-1 agreement with fp32 {acc['top1_agreement']:.2%} < {opts.min_agreement:.2%}"
                for name, acc in accuracy.items() if acc["top1_agreement"] < opts.min_agreement]
    not_applied = None
    if meta.synthetic:
        not_applied = "synthetic (random) weights: accuracy figures are printed but not gated"
    elif len(evals.files) < MIN_EVAL_IMAGES:
        not_applied = (f"only {len(evals.files)} evaluation images (< {MIN_EVAL_IMAGES}): too few for a meaningful "
                       "gate; figures are printed but not gated, and `auto` will not pick these int8 files")
    if not_applied:
        warnings.append(not_applied)
    passed = not_applied is not None or not failures
    amax = comparison[opts.method]["scales"]
    report: dict[str, Any] = {
        "artifact_dir": str(opts.artifact_dir),
        "checkpoint": meta.checkpoint,
        "weights": meta.weights,
        "attention": meta.attention,
        "method": opts.method,
        "percentile": opts.percentile if opts.method == "percentile" else None,
        "attention_qdq": opts.attention_qdq,
        "placement": plan.counts(),
        "calibration_images": _batch_info(calib, opts.calib_dir, opts.num_images, opts.seed),
        "evaluation_images": _batch_info(evals, opts.eval_dir or opts.calib_dir, opts.num_eval, opts.seed + 1),
        "scales": {"amax": amax, "summary": _summary(list(amax.values()))},
        "accuracy": accuracy,
        "method_comparison": {m: {k: v for k, v in r.items() if k != "scales"} | {"amax_summary": _summary(list(r["scales"].values()))}
                              for m, r in comparison.items()} if opts.compare_methods else None,
        "gate": {"min_agreement": opts.min_agreement, "applied": not_applied is None, "not_applied_because": not_applied,
                 "min_eval_images": MIN_EVAL_IMAGES, "failures": failures},
        "passed": passed,
        "warnings": warnings,
        "timings_s": {"data": round(t_data - t0, 2), "calibrate": round(t_calib - t_data, 2), "quantize_and_evaluate": round(t_eval - t_calib, 2)},
    }
    if passed:
        report["files"] = _write(opts.artifact_dir, meta, shipped, report)
    return report


def _check_count(batch: Batch, wanted: int, folder: Path, what: str, warnings: list[str]) -> None:
    if not batch.files:
        raise DataError(f"{folder}: no usable {what} images ({len(batch.skipped)} unreadable)")
    if len(batch.files) < wanted:
        warnings.append(f"{what}: only {len(batch.files)} usable images of {wanted} asked for in {folder}")


def _batch_info(batch: Batch, folder: Path, wanted: int, seed: int) -> dict[str, Any]:
    labels = batch.labels[batch.labels >= 0]
    return {
        "dir": str(folder), "requested": wanted, "used": len(batch.files), "seed": seed, "labelled": batch.labelled,
        "classes": int(len(np.unique(labels))), "from_cache": batch.cached, "skipped": batch.skipped, "files": batch.files,
    }


def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"count": int(v.size), "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


# What each shipped file is, for its metadata: (role, scheme); the static files share method and placement.
FILE_ROLES = {
    MODEL_FILES["int8"]: ("qdq-fp32", "static Q/DQ, symmetric int8, per-channel weights; fp32 elsewhere"),
    INT8_TRT_FILE: ("tensorrt-qdq", "static Q/DQ, symmetric int8, per-channel weights; fp16 elsewhere "
                                    "(LayerNormalization fp32), the TensorRT int8 engine's source"),
    INT8_CPU_FILE: ("ort-cpu-dynamic", "ONNX Runtime quantize_dynamic: int8 per-channel weights, per-batch activations"),
}


def _write(artifact_dir: Path, meta: ArtifactMeta, shipped: dict[str, onnx.ModelProto], report: dict[str, Any]) -> list[str]:
    for name, model in shipped.items():
        static = name != INT8_CPU_FILE
        meta_q = meta.copy(precision="int8", extra={"quantization": {
            "file_role": FILE_ROLES[name][0],
            "scheme": FILE_ROLES[name][1],
            "method": report["method"] if static else "dynamic",
            "placement": report["placement"] if static else {"ops": ["MatMul", "Gemm"]},
            "calibration_images": report["calibration_images"]["used"],
            "accuracy": report["accuracy"][name],
            "gate_applied": report["gate"]["applied"],
        }})
        set_onnx_meta(model, meta_q)
        with atomic_path(artifact_dir / name) as tmp:
            onnx.save(model, str(tmp))
    if INT8_CPU_FILE not in shipped:  # its accuracy would no longer be in calibration.json
        (artifact_dir / INT8_CPU_FILE).unlink(missing_ok=True)
    # An int8 engine built from the previous Q/DQ file would run the old scales: it goes with its sidecar.
    plan = engine_path(artifact_dir, "int8")
    for derived in (plan, sidecar_path(plan)):
        derived.unlink(missing_ok=True)
    write_json(artifact_dir / "calibration.json", report)
    return [*shipped, "calibration.json"]
