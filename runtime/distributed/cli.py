"""`python -m runtime.distributed`: the command line over `Job` (arguments, Ray start-up, the summary)."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time

import runtime.distributed as package
from runtime.artifact import SYNTHETIC_WARNING
from runtime.classify import print_summary
from runtime.cli import add_classify_arguments, check_classify_arguments
from runtime.distributed.job import Job, JobOptions, import_ray, session
from runtime.distributed.writer import FORMATS
from runtime.errors import ArgumentParser, run_cli, signals_raise_interrupted


def build_parser() -> ArgumentParser:
    title, _, usage = (package.__doc__ or "").partition("\n")
    p = ArgumentParser(prog="python -m runtime.distributed", description=title, epilog=usage,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a folder (recursive), a glob, or a .parquet / text list of paths or URIs")
    p.add_argument("--output", required=True,
                   help="folder (local or URI) for the part files; a re-run with the same one resumes")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="part files: parquet (default) or jsonl")
    add_classify_arguments(p, "; the same path must exist on every node")
    p.add_argument("--address", help="join this Ray cluster (auto, ray://head:10001, head:6379); default: a local Ray")
    p.add_argument("--num-workers", type=int,
                   help="inference actors at most (default: one per GPU share, or one per node)")
    p.add_argument("--num-gpus-per-worker", type=float, default=1.0,
                   help="GPUs per actor of a GPU backend (0.5: two per GPU)")
    p.add_argument("--num-cpus-per-worker", type=float,
                   help="CPUs Ray reserves per actor (default: 1 with a GPU, else half the smallest node's; "
                        "a CPU actor's --threads default to its node's cores over the actors that fit there)")
    p.add_argument("--rows-per-file", type=int, default=100_000,
                   help="rows per part file (default 100,000); a part is the unit a Ctrl-C keeps")
    p.add_argument("--shard", metavar="I/N",
                   help="run only shard I of N (0 <= I < N) of INPUT, by a stable hash of each input's path: N such "
                        "jobs, at once or one by one, write every input once into the same --output")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="seconds without an input classified before the job ends with exit 7 (default 600)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_classify_arguments(p, args, "num_workers", "rows_per_file")
    for name in ("num_gpus_per_worker", "num_cpus_per_worker", "stall_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be more than 0")
    if args.shard is not None:
        index, slash, count = args.shard.partition("/")
        if not (slash and index.isdecimal() and count.isdecimal() and int(index) < int(count)):
            p.error(f"--shard {args.shard}: give I/N with 0 <= I < N, e.g. --shard 0/4")
        args.shard = (int(index), int(count))
    return args


def run(args: argparse.Namespace, argv: list[str]) -> int:
    opts = JobOptions(backend=args.backend, precision=args.precision, batch_size=args.batch_size, topk=args.topk,
                      threads=args.threads, num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
                      num_cpus_per_worker=args.num_cpus_per_worker, fmt=args.format, rows_per_file=args.rows_per_file,
                      max_pixels=args.max_pixels, max_file_bytes=args.max_file_bytes, draft=args.draft,
                      progress=args.progress, shard=args.shard,
                      stall_s=args.stall_timeout, command=f"`python -m runtime.distributed {shlex.join(argv)}`")
    ray = import_ray()
    # Inputs and output checked, and the output locked, before Ray starts; run() releases it, closing() if it never runs.
    job = Job(args.input, args.output, args.model, opts, args.artifacts)
    t0 = time.perf_counter()
    with contextlib.closing(job), session(args.address) as started, signals_raise_interrupted():  # ray.init replaced run_cli's SIGTERM handler
        res = ray.cluster_resources()
        where = "started a local Ray" if started else f"joined the Ray cluster at {args.address or 'this process'}"
        print(f"distributed: {where} ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        plan = job.plan()[0]
        if plan.choice:
            print(f"backend: {plan.choice}", file=sys.stderr)
        if plan.synthetic:
            print(SYNTHETIC_WARNING, file=sys.stderr)
        summary = job.run(report=True)
    print_summary(summary)
    return 1 if summary.failures else 0


def main(argv: list[str] | None = None) -> int:
    entry, argv = argv is None, sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return run_cli("distributed", lambda: run(args, argv), entry=entry)
