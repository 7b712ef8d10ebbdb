"""How long `python -m export` takes and how much memory it needs, for one checkpoint on this machine.

    python -m benchmarks.export_time --model facebook/deit-base-distilled-patch16-224 --weights synthetic

Runs the export in a child process (so the figures are the export's alone) and reports wall time,
the export's own per-step timings, and that child's own peak resident memory (its VmHWM, polled:
getrusage's figures for children include the parent's memory at fork and the largest child ever).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.errors import ArgumentParser, run_cli


def measure_export(model: str, weights: str, verify_images: Path | None, out_root: Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "export", "--model", model, "--weights", weights, "--out", str(out_root)]
    if verify_images is not None:
        cmd += ["--verify-images", str(verify_images)]
    rc, wall, peak_kib, stderr = run_measured(cmd + ["--no-progress"])
    if rc != 0:
        raise RuntimeError(f"export failed (exit {rc}): {(stderr.strip().splitlines() or [''])[-1]}")
    report_file = next(out_root.glob("*/export.json"))
    report = json.loads(report_file.read_text())
    return {
        "model": model,
        "weights": weights,
        "wall_s": round(wall, 2),
        "steps_s": report["timings_s"],
        "peak_rss_mib": round(peak_kib / 1024),
        "verification": report["verification"],
    }


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, float, int, str]:
    """Run `cmd`; its exit status, wall seconds, its peak RSS in KiB (VmHWM, polled every 10 ms) and its stderr."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        status, peak = Path(f"/proc/{proc.pid}/status"), 0
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_kib(status))
            time.sleep(0.01)
        wall = time.perf_counter() - start
        err.seek(0)
        return proc.returncode, wall, peak, err.read().decode(errors="replace")


def _vm_hwm_kib(status: Path) -> int:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.export_time", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="facebook/deit-base-distilled-patch16-224")
    p.add_argument("--weights", choices=["pretrained", "synthetic"], default="synthetic")
    p.add_argument("--verify-images", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure_export(args.model, args.weights, args.verify_images, Path(tmp))
        print(f"{result['model']} ({result['weights']} weights): {result['wall_s']:.1f} s wall, "
              f"peak RSS {result['peak_rss_mib']} MiB")
        print("  steps (s): " + ", ".join(f"{k} {v}" for k, v in result["steps_s"].items()))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    return run_cli("export_time", work, entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
