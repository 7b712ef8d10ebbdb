"""`python -m benchmarks`: time the backends side by side on one artifact, check their answers, report.

Writes results.json, results.md and latency.png to --out. Exit status: 0 measured (flagged backends
are reported, not fatal), 1 the artifact or the reference backend could not be used, 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness import Settings, default_labels, end_to_end, resolve, run_benchmark
from benchmarks.report import contended, write_report
from runtime.artifact import SYNTHETIC_WARNING, ArtifactError, find_artifact
from runtime.backends import BackendUnavailable


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", help="artifact folder (default: the newest under artifacts/)")
    p.add_argument("--batch-sizes", type=_ints, default=defaults.batch_sizes, help="e.g. 1,2,4,8 (default)")
    p.add_argument("--backends", default=",".join(default_labels()),
                   help="comma-separated; a registry name, optionally with -fp16/-int8, or ort-cpu-optimum-style "
                        "(default: all; those that cannot run here are listed with the reason)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--threads", type=int, default=defaults.threads, help=f"CPU threads per backend (default {defaults.threads})")
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--min-iters", type=int, default=defaults.min_iters)
    p.add_argument("--min-time", type=float, default=defaults.min_time_s, help="minimum seconds measured per cell")
    p.add_argument("--retries", type=int, default=defaults.retries,
                   help="re-measure a cell disturbed by other processes up to this often (default %(default)s)")
    p.add_argument("--reference", default=defaults.reference, help="fp32 backend the others are compared with")
    p.add_argument("--agreement-images", type=Path, help="photos added to the shared correctness batch")
    p.add_argument("--min-agreement", type=float, default=defaults.min_agreement, help="flag backends below this top-1 agreement")
    p.add_argument("--end-to-end", type=Path, metavar="DIR",
                   help="also time runtime.classify on this folder of photos (decode + preprocess + infer)")
    p.add_argument("--end-to-end-backends", default="ort-cpu", help="comma-separated (default ort-cpu)")
    p.add_argument("--end-to-end-limit", type=int, default=200, help="at most this many photos (default 200)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for flag, folder in (("--agreement-images", args.agreement_images), ("--end-to-end", args.end_to_end)):
        if folder is not None and not folder.is_dir():
            p.error(f"{flag} {folder}: no such folder")
    try:
        specs = [resolve(label.strip()) for label in args.backends.split(",") if label.strip()]
        e2e_labels = [label.strip() for label in args.end_to_end_backends.split(",") if label.strip()]
        for label in [args.reference, *e2e_labels]:
            resolve(label)
    except ValueError as err:
        p.error(str(err))
    settings = Settings(
        batch_sizes=args.batch_sizes, warmup=args.warmup, min_iters=args.min_iters, min_time_s=args.min_time,
        threads=args.threads, retries=args.retries, reference=args.reference, agreement_images=args.agreement_images,
        min_agreement=args.min_agreement,
    )
    try:
        artifact = find_artifact(args.model)
        results = run_benchmark(artifact, specs, settings, progress=not args.no_progress)
        if args.end_to_end is not None:
            results["end_to_end"] = end_to_end(
                artifact, args.end_to_end, e2e_labels, settings, args.end_to_end_limit, progress=not args.no_progress
            )
    except (ArtifactError, BackendUnavailable, ValueError) as err:
        print(f"benchmarks: error: {err}", file=sys.stderr)
        return 1
    paths = write_report(results, args.out)
    if results["model"]["synthetic"]:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    print(paths["markdown"].read_text())
    for row in results["backends"]:
        if (row.get("agreement") or {}).get("flagged"):
            print(f"WARNING: {row['label']} disagrees with {settings.reference}: "
                  f"top-1 agreement {row['agreement']['top1_agreement']:.0%}", file=sys.stderr)
    suspect = [f"{row['label']}@{t['batch_size']}" for row in results["backends"] for t in row.get("timings", []) if contended(t)]
    if suspect:
        print(f"WARNING: other processes loaded the CPU during {', '.join(suspect)}: those timings are suspect",
              file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
