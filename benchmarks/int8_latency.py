"""ONNX Runtime CPU latency of an artifact's int8 files against its fp32 model, batch by batch.

    flock /tmp/deit-cpu.lock python -m benchmarks.int8_latency artifacts/deit-small-distilled-patch16-224 --batch 1 8

Times every ONNX file of the artifact that exists (model.onnx, model.int8.onnx = static Q/DQ for
TensorRT, model.int8-cpu.onnx = ORT dynamic int8) through the runtime's ort-cpu backend (same
session options as deployment), on the same random input, interleaving the files round by round
so drift on a shared machine hits all of them alike. Reports the median per batch and the speed-up
over fp32; run it under `flock /tmp/deit-cpu.lock` on shared machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import INT8_CPU_FILE, MODEL_FILES, SYNTHETIC_WARNING
from runtime.backends.ort_cpu import OrtCpuBackend

FILES = (MODEL_FILES["fp32"], MODEL_FILES["int8"], INT8_CPU_FILE)


def measure(artifact: Path, batches: list[int], rounds: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Median milliseconds per batch for each file present, plus speed-ups over fp32."""
    with ExitStack() as stack:
        backends = {}
        for name in FILES:
            if (artifact / name).is_file():
                backend = OrtCpuBackend(artifact, precision="int8" if "int8" in name else "fp32", max_batch=max(batches))
                backend.model_file = artifact / name  # time this exact file, whatever int8 preference says
                backends[name] = stack.enter_context(backend)
        meta = backends[FILES[0]].meta
        h, w = meta.preprocessing.input_size
        rng = np.random.default_rng(0)
        result: dict[str, Any] = {"artifact": str(artifact), "weights": meta.weights, "ms": {}, "speedup": {}}
        for b in batches:
            x = rng.standard_normal((b, 3, h, w)).astype(np.float32)
            times: dict[str, list[float]] = {n: [] for n in backends}
            for r in range(warmup + rounds):
                for name, backend in backends.items():
                    t = time.perf_counter()
                    backend.run(x)
                    if r >= warmup:
                        times[name].append((time.perf_counter() - t) * 1e3)
            ms = {n: round(statistics.median(t), 2) for n, t in times.items()}
            result["ms"][b] = ms
            result["speedup"][b] = {n: round(ms[FILES[0]] / v, 2) for n, v in ms.items()}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_latency", description=(__doc__ or "").split("\n")[0])
    p.add_argument("artifacts", nargs="+", type=Path, help="artifact folders (calibrated: python -m calibration)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    results = []
    for artifact in args.artifacts:
        if not (artifact / MODEL_FILES["fp32"]).is_file():
            print(f"int8_latency: error: {artifact}: no {MODEL_FILES['fp32']}", file=sys.stderr)
            return 1
        r = measure(artifact, args.batch, args.rounds)
        results.append(r)
        if r["weights"] == "synthetic":
            print(SYNTHETIC_WARNING, file=sys.stderr)
        print(f"{artifact} ({r['weights']} weights), ORT CPU, median of {args.rounds} runs:")
        for b, ms in r["ms"].items():
            cells = [f"{n} {v:.1f} ms" + (f" ({r['speedup'][b][n]:.2f}x)" if n in r["speedup"][b] else "") for n, v in ms.items()]
            print(f"  batch {b}: " + ", ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
