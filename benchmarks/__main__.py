"""`python -m benchmarks`: time the backends side by side on one artifact, check their answers, report.

Writes results.json, results.md and latency.png to --out. Exit status (the README's table): 0 measured
(backends that could not run or failed are rows that say why), 2 usage, 5 bad artifact.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from benchmarks.harness import EndToEndRequest, Settings, default_labels, end_to_end, resolve, run_benchmark
from benchmarks.report import contended, write_report
from runtime.artifact import SYNTHETIC_WARNING, find_artifact
from runtime.cli import check_thread_count
from runtime.errors import ArgumentParser, Interrupted, run_cli
from runtime.paths import check_output_dir


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1 or max(values) > 256:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers from 1 to 256, got {text!r}")
    return values


def build_parser() -> ArgumentParser:
    defaults = Settings()
    p = ArgumentParser(prog="python -m benchmarks", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", help="artifact folder (default: the newest under artifacts/)")
    p.add_argument("--batch-sizes", type=_ints, default=defaults.batch_sizes, help="e.g. 1,2,4,8 (default)")
    p.add_argument("--backends", help="comma-separated; a registry name, optionally ending in -fp16/-bf16/-int8, or "
                                      "ort-cpu-optimum-style / ort-cuda-optimum-style (default: every GPU row on a GPU "
                                      "machine, every CPU row elsewhere; those that cannot run are listed with the reason)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--threads", type=int, help="CPU threads per backend (default: one per usable core)")
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--min-iters", type=int, default=defaults.min_iters)
    p.add_argument("--min-time", type=float, default=defaults.min_time_s, help="minimum seconds measured per cell")
    p.add_argument("--retries", type=int, default=defaults.retries,
                   help="re-measure a cell disturbed by other processes up to this often (default %(default)s)")
    p.add_argument("--reference", default=defaults.reference, help="fp32 backend the others are compared with")
    p.add_argument("--agreement-images", type=Path, help="photos added to the shared correctness batch")
    p.add_argument("--min-agreement", type=float, default=defaults.min_agreement, help="flag backends below this top-1 agreement")
    p.add_argument("--with-copies", action="store_true", help="GPU rows: also time with the host<->device copies")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="CPU rows: skip measuring the MatMul ceilings (GFLOP/s and share of ceiling columns)")
    p.add_argument("--no-auto", dest="auto", action="store_false", help="skip reporting what --backend auto picks")
    p.add_argument("--end-to-end", type=Path, metavar="DIR",
                   help="also time runtime.classify on this folder of photos (decode + preprocess + infer)")
    p.add_argument("--end-to-end-backends", default="ort-cpu", help="comma-separated (default ort-cpu)")
    p.add_argument("--end-to-end-limit", type=int, default=200, help="at most this many photos (default 200)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for flag, folder in (("--agreement-images", args.agreement_images), ("--end-to-end", args.end_to_end)):
        if folder is not None and not folder.is_dir():
            p.error(f"{flag} {folder}: no such folder")
    for flag, value in (("--threads", args.threads), ("--min-iters", args.min_iters), ("--end-to-end-limit", args.end_to_end_limit)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1")
    check_thread_count(p, "--threads", args.threads)
    if args.warmup < 0 or args.retries < 0 or args.min_time < 0:
        p.error("--warmup, --retries and --min-time cannot be negative")
    if not 0.0 <= args.min_agreement <= 1.0:
        p.error(f"--min-agreement {args.min_agreement}: a fraction between 0 and 1")
    labels = [x.strip() for x in (args.backends or ",".join(default_labels())).split(",") if x.strip()]
    e2e_labels = [x.strip() for x in args.end_to_end_backends.split(",") if x.strip()]
    settings = Settings(
        batch_sizes=args.batch_sizes, warmup=args.warmup, min_iters=args.min_iters, min_time_s=args.min_time,
        threads=args.threads, retries=args.retries, reference=args.reference, agreement_images=args.agreement_images,
        min_agreement=args.min_agreement, with_copies=args.with_copies,
    )

    def work() -> int:
        specs = [resolve(label) for label in labels]
        for label in [args.reference, *e2e_labels]:
            resolve(label)
        check_output_dir(args.out)
        artifact = find_artifact(args.model)
        from benchmarks.cpu import add_cpu_figures, auto_picks, matmul_ceilings

        ceilings = (lambda: matmul_ceilings(settings.threads)) if args.ceilings else None
        results = run_benchmark(artifact, specs, settings, progress=not args.no_progress, cpu_ceilings=ceilings)
        add_cpu_figures(results)
        if results["interrupted"]:
            paths = write_report(results, args.out)
            raise Interrupted(signal.Signals[results["interrupted"]],
                              f"the {len(results['backends'])} rows that finished are in {paths['json']}")
        if args.auto:
            results["auto"] = auto_picks(artifact, results, settings.threads)
        if args.end_to_end is not None:
            request = EndToEndRequest(args.end_to_end, e2e_labels, args.end_to_end_limit)
            results["end_to_end"] = end_to_end(artifact, request, settings, progress=not args.no_progress)
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

    return run_cli("benchmarks", work, entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
