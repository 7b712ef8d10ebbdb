"""Flags every classifying CLI shares (runtime.infer, runtime.distributed, runtime.serve), so they mean the same in each."""

from __future__ import annotations

import argparse
import sys

from runtime.backends import BACKENDS, MAX_BATCH, PRECISIONS
from runtime.cpuinfo import usable_cores
from runtime.decode import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from runtime.errors import ArgumentParser
from runtime.predictor import ModelOptions, Settled, settle

# More threads than cores only adds switching; this many times more is a typo (100000 threads took 16 GB).
THREADS_LIMIT_FACTOR = 4


def add_model_arguments(p: ArgumentParser, where: str = "", batch_flag: str = "--batch-size") -> None:
    """Which model runs where and what it answers: --model --artifacts --backend --precision --batch-size
    (or the server's --max-batch-size, its Triton name) --threads --topk: `model_options` reads them."""
    p.add_argument("--model", help=f"artifact folder, or one model file in it (default: the newest under --artifacts){where}")
    p.add_argument("--artifacts", default="artifacts", help="where to look for the newest artifact")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="auto: TensorRT > ORT CUDA on a GPU; on a CPU the fastest measured there")
    p.add_argument("--precision", choices=PRECISIONS, help="model precision (default: the backend's own)")
    p.add_argument(batch_flag, dest="batch_size", type=int, default=8, help=f"images per batch, 1-{MAX_BATCH} (default 8)")
    p.add_argument("--threads", type=int, help="inference threads of CPU backends (default: one per core)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (at most the model's class count)")


def add_classify_arguments(p: ArgumentParser, where: str = "", batch_flag: str = "--batch-size") -> None:
    """The model arguments plus how images are decoded."""
    add_model_arguments(p, where, batch_flag)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels than this, from their header (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                   help=f"refuse files larger than this before opening them (default {DEFAULT_MAX_FILE_BYTES:,})")
    p.add_argument("--draft", action="store_true",
                   help="decode big JPEGs at reduced scale: faster, pixels not identical to the image processor")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def check_thread_count(p: ArgumentParser, flag: str, value: int | None) -> None:
    """A thread count above the usable cores is allowed with a warning; far above them it is a usage error."""
    cores = usable_cores()
    if value is None or value <= cores:
        return
    if value > THREADS_LIMIT_FACTOR * cores:
        p.error(f"{flag} {value}: more than {THREADS_LIMIT_FACTOR}x the {cores} usable cores")
    print(f"{p.prog.split('.')[-1]}: warning: {flag} {value} is more than the {cores} usable cores; "
          "runs will be slower, not faster", file=sys.stderr)


def check_classify_arguments(p: ArgumentParser, args: argparse.Namespace, *at_least_one: str) -> None:
    """Usage errors for the shared flags (and the named integer flags), before any work."""
    if not 1 <= args.batch_size <= MAX_BATCH:
        flag = next(a.option_strings[0] for a in p._actions if a.dest == "batch_size")
        p.error(f"{flag} {args.batch_size}: must be between 1 and {MAX_BATCH}")
    for name in ("topk", "max_pixels", "max_file_bytes", "threads", *at_least_one):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    check_thread_count(p, "--threads", args.threads)


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The flags of `add_model_arguments` as the predictor's options."""
    return ModelOptions(model=args.model, artifacts=args.artifacts, backend=args.backend, precision=args.precision,
                        batch_size=args.batch_size, threads=args.threads, topk=args.topk)


def settle_model(args: argparse.Namespace, prog: str) -> Settled:
    """`settle` the model flags; what `auto` chose, and why, goes to stderr."""
    settled = settle(model_options(args))
    if settled.choice:
        print(f"{prog}: backend: {settled.choice}", file=sys.stderr)
    return settled
