"""ONNX Runtime CPU latency of an artifact's int8 files against its fp32 model, batch by batch.

    python -m benchmarks.int8_latency artifacts/deit-small-distilled-patch16-224 --batch 1 8

Times every ONNX file of the artifact that exists (model.onnx, model.int8.onnx = static Q/DQ for
TensorRT, model.int8-cpu.onnx = ORT dynamic int8) through the runtime's ort-cpu backend (same
session options as deployment, each file named explicitly) with the one timing core, and reports
the median per batch and the speed-up over fp32.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.harness import Settings, time_cell
from runtime.artifact import INT8_CPU_FILE, MODEL_FILES, SYNTHETIC_WARNING, find_artifact, write_json
from runtime.backends.onnxruntime import ORT_CPU
from runtime.errors import ArgumentParser, run_cli

FILES = (MODEL_FILES["fp32"], MODEL_FILES["int8"], INT8_CPU_FILE)


def measure_files(artifact: Path, batches: list[int], settings: Settings) -> dict[str, Any]:
    """Median milliseconds per batch for each file present, plus speed-ups over fp32."""
    with ExitStack() as stack:
        backends = {name: stack.enter_context(ORT_CPU(artifact, model_file=artifact / name, max_batch=max(batches),
                                                      threads=settings.threads))
                    for name in FILES if (artifact / name).is_file()}
        meta = backends[FILES[0]].meta
        result: dict[str, Any] = {"artifact": str(artifact), "weights": meta.weights, "ms": {}, "speedup": {}}
        for b in batches:
            ms = {name: time_cell(backend, b, settings, device_clock=False)["median_ms"] for name, backend in backends.items()}
            result["ms"][b] = ms
            result["speedup"][b] = {n: round(ms[FILES[0]] / v, 2) for n, v in ms.items()}
    return result


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.int8_latency", description=(__doc__ or "").split("\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path, help="artifact folders (calibrated: python -m calibration)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--min-time", type=float, default=2.0, help="seconds measured per cell (default 2)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: one per usable core)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.batch) < 1 or max(args.batch) > 256:
        p.error("--batch sizes must be from 1 to 256")

    def work() -> int:
        settings = Settings(min_time_s=args.min_time, threads=args.threads)
        results = []
        for artifact in args.artifacts:
            r = measure_files(find_artifact(artifact), args.batch, settings)
            results.append(r)
            if r["weights"] == "synthetic":
                print(SYNTHETIC_WARNING, file=sys.stderr)
            print(f"{artifact} ({r['weights']} weights), ORT CPU, median ms:")
            for b, ms in r["ms"].items():
                print(f"  batch {b}: " + ", ".join(f"{n} {v:.1f} ms ({r['speedup'][b][n]:.2f}x)" for n, v in ms.items()))
        if args.json:
            write_json(args.json, {"results": results})
        return 0

    return run_cli("int8_latency", work, entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
