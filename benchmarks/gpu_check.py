"""`make gpu-check`: the whole GPU path on one machine, export -> calibrate -> engines -> infer -> bench.

Prints one PASS/FAIL/SKIP row per step. Export, engine building and the accuracy checks are library
calls; calibration and the benchmark run their own CLIs (`python -m calibration`, `python -m
benchmarks`), exactly as a user would. TensorRT outputs are compared with ONNX Runtime CPU fp32 on
the photos given (else random inputs): fp16 top-1 agreement >= 99.5%, int8 >= 98%.

Exit status: 0 every step passed, 1 a step failed, 2 TensorRT or the GPU is missing (nothing run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from export.engines import EngineOptions, build_engines
from export.pipeline import ExportOptions, export_checkpoint
from export.verify import compare, verification_inputs
from runtime.artifact import model_path, read_onnx_meta
from runtime.backends import cudart
from runtime.backends.ort_cpu import OrtCpuBackend
from runtime.backends.trt import TensorRTBackend, engine_path, read_sidecar, tensorrt_unavailable_reason
from runtime.checkpoints import HubUnreachable

DEFAULT_MODEL = "facebook/deit-small-distilled-patch16-224"
MIN_AGREEMENT = {"fp16": 0.995, "int8": 0.98}


@dataclass
class Step:
    name: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    detail: str


class StepFailed(Exception):
    """A check inside a step did not hold; the message is the table's detail column."""


def _timed(name: str, fn: Callable[[], str]) -> Step:
    t0 = time.perf_counter()
    try:
        detail, status = fn(), "PASS"
    except StepFailed as err:
        detail, status = str(err), "FAIL"
    except Exception as err:  # a crashed step is a FAIL row, and the check goes on
        detail, status = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", "FAIL"
    return Step(name, status, time.perf_counter() - t0, detail)


def _run_cli(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise StepFailed(f"`python -m {' '.join(args)}` exited {proc.returncode}: {lines[-1] if lines else ''}")
    return f"`python -m {args[0]}` ok"


def _agreement(artifact: Path, precision: str, images: Path | None, limit: int) -> str:
    meta = read_onnx_meta(model_path(artifact, "fp32"))
    x, photos = verification_inputs(meta.preprocessing, images, limit, n_random=0 if images else 64)
    with OrtCpuBackend(artifact, precision="fp32") as ref:
        expected = ref.infer(x)
    with TensorRTBackend(artifact, precision=precision) as backend:
        got = backend.infer(x)
    result = compare(expected, got)
    text = (f"top-1 agreement {result['top1_agreement']:.2%} on {result['samples']} "
            f"{'photos' if photos else 'random inputs'}, min cosine {result['min_cosine']:.4f}")
    if result["top1_agreement"] < MIN_AGREEMENT[precision]:
        raise StepFailed(f"{text} < {MIN_AGREEMENT[precision]:.1%}")
    return text


def _attention(artifact: Path, precision: str) -> str:
    att = read_sidecar(engine_path(artifact, precision))["attention"]
    text = f"{att['fused_attention_layers']} fused attention layers ({att['expected_layers']} encoder layers)"
    if att["fused_attention_layers"] == 0:
        raise StepFailed(f"{precision}: {text}; layer types {att['layer_types']}")
    return text


def run_gpu_check(out: Path, model: str = DEFAULT_MODEL, images: Path | None = None, limit: int = 500) -> list[Step]:
    """Run every step; later steps that need an earlier one's output are skipped when it failed."""
    steps: list[Step] = []
    artifact = out / model.rstrip("/").split("/")[-1]

    def export() -> str:
        opts = ExportOptions(model, out_root=out, verify_images=images, progress=False)
        try:
            report = export_checkpoint(opts)
        except HubUnreachable:
            opts.weights = "synthetic"
            report = export_checkpoint(opts)
        return f"{report['weights']} weights -> {artifact}"

    steps.append(_timed("export", export))
    if steps[-1].status != "PASS":
        return steps
    if images is None:
        steps.append(Step("calibrate", "SKIP", 0.0, "no --images to calibrate on; int8 steps skipped"))
    else:
        steps.append(_timed("calibrate", lambda: _run_cli(
            ["calibration", "--model", str(artifact), "--calib-dir", str(images), "--num-images", "128"])))
    precisions = ("fp16", "int8") if model_path(artifact, "int8").is_file() else ("fp16",)

    def engines() -> str:
        report = build_engines(artifact, precisions, EngineOptions(progress=False))
        return ", ".join(f"{p} built in {s['build_time_s']:.0f} s" for p, s in report["engines"].items())

    steps.append(_timed("engines", engines))
    if steps[-1].status != "PASS":
        return steps
    for precision in precisions:
        steps.append(_timed(f"attention fused ({precision})", lambda p=precision: _attention(artifact, p)))
        steps.append(_timed(f"infer trt {precision} vs ORT fp32",
                            lambda p=precision: _agreement(artifact, p, images, limit)))
    backends = ",".join(["trt", *(["trt-int8"] if "int8" in precisions else []), "ort-trt", "ort-cuda", "ort-cpu"])
    steps.append(_timed("bench", lambda: _run_cli(
        ["benchmarks", "--model", str(artifact), "--batch-sizes", "1,2,4,8", "--backends", backends,
         "--out", str(out / "bench")])))
    return steps


def format_table(steps: list[Step]) -> str:
    width = max(len(s.name) for s in steps)
    lines = [f"{'step':{width}}  result  time     detail", f"{'-' * width}  ------  -------  ------"]
    lines += [f"{s.name:{width}}  {s.status:6}  {s.seconds:6.1f}s  {s.detail}" for s in steps]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--out", type=Path, default=Path("artifacts/gpu-check"))
    p.add_argument("--images", type=Path, help="photos for calibration and agreement (else random inputs, no int8)")
    p.add_argument("--limit", type=int, default=500, help="at most this many photos for agreement (default 500)")
    args = p.parse_args(argv)
    missing = [r for r in (tensorrt_unavailable_reason(), cudart.gpu_unavailable_reason()) if r]
    if missing:
        print("gpu-check: cannot run here:\n" + "\n".join(f"  - {m}" for m in missing), file=sys.stderr)
        return 2
    steps = run_gpu_check(args.out, args.model, args.images, args.limit)
    print(format_table(steps))
    return 0 if all(s.status in ("PASS", "SKIP") for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
