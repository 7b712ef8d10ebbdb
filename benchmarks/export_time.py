"""How long `python -m export` takes and how much memory it needs, for one checkpoint on this machine.

    python -m benchmarks.export_time --model facebook/deit-base-distilled-patch16-224 --weights synthetic

Runs the export in a child process (so the figures are the export's alone) and reports wall time,
the export's own per-step timings, and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure_export(model: str, weights: str, verify_images: Path | None, out_root: Path) -> dict:
    cmd = [sys.executable, "-m", "export", "--model", model, "--weights", weights, "--out", str(out_root)]
    if verify_images is not None:
        cmd += ["--verify-images", str(verify_images)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"export failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    report_file = next(out_root.glob("*/export.json"))
    report = json.loads(report_file.read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "model": model,
        "weights": weights,
        "wall_s": round(wall, 2),
        "steps_s": report["timings_s"],
        "peak_rss_mib": round(peak_kib / 1024),
        "verification": report["verification"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_time", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="facebook/deit-base-distilled-patch16-224")
    p.add_argument("--weights", choices=["pretrained", "synthetic"], default="synthetic")
    p.add_argument("--verify-images", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure_export(args.model, args.weights, args.verify_images, Path(tmp))
    print(f"{result['model']} ({result['weights']} weights): {result['wall_s']:.1f} s wall, "
          f"peak RSS {result['peak_rss_mib']} MiB")
    print("  steps (s): " + ", ".join(f"{k} {v}" for k, v in result["steps_s"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
