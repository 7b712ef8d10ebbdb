"""`python -m runtime.infer`: classify image files and folders with an exported DeiT artifact.

    python -m runtime.infer images/
    python -m runtime.infer images/ --model artifacts/deit-small-distilled-patch16-224 --backend ort-cpu --topk 5
    python -m runtime.infer photos/ -r --format csv --output predictions.csv    # Ctrl-C keeps predictions.csv.partial
    python -m runtime.infer photos/ -r --format csv --output predictions.csv --resume

Predictions go to stdout or --output; progress, warnings, per-file errors and the summary go to
stderr. Everything that can be checked (paths, model, backend, output location, arguments) is
checked before the first image is decoded. Exit status: see runtime/errors.py (0 all predicted,
1 some files failed, 2 usage, 5 model, 6 backend unavailable, 130/143 interrupted, work kept).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from runtime.artifact import SYNTHETIC_WARNING
from runtime.classify import ClassifyOptions, Summary, default_workers, iter_predictions, print_summary
from runtime.cli import add_classify_arguments, check_classify_arguments, check_thread_count, open_predictor
from runtime.console import progress_bar
from runtime.errors import ArgumentParser, Interrupted, UsageError, run_cli, signals_deferred
from runtime.output import FORMATS, PredictionWriter, RecordFormat, partial_path, read_done
from runtime.paths import check_output_file
from runtime.predictor import Prediction, display_path
from runtime.preprocess import Listing, find_images


def build_parser() -> ArgumentParser:
    title, _, usage = (__doc__ or "").partition("\n")
    p = ArgumentParser(prog="python -m runtime.infer", description=title, epilog=usage,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    add_classify_arguments(p, "")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text: path<TAB>label prob..., names escaped (\\t \\n \\\\ \\xNN); json; csv")
    p.add_argument("--output", type=Path, help="write predictions here (via <output>.partial) instead of stdout")
    p.add_argument("--resume", action="store_true", help="skip files an interrupted run already wrote to --output")
    p.add_argument("--recursive", "-r", action="store_true", help="also look inside sub-folders (symlinks followed)")
    p.add_argument("--workers", type=int, default=default_workers(), help="decode threads (default: one per core)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_classify_arguments(p, args, "workers")
    check_thread_count(p, "--workers", args.workers)
    if args.resume and args.output is None:
        p.error("--resume needs --output (the file an interrupted run was writing)")
    return args


def find_files(paths: list[Path], recursive: bool) -> Listing:
    missing = [display_path(p) for p in paths if not os.path.lexists(p)]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    listing = find_images(paths, recursive=recursive)
    if not listing.files and not listing.errors:
        hint = "" if recursive else " (use --recursive for sub-folders)"
        raise UsageError(f"no images found in {', '.join(display_path(p) for p in paths)}{hint}")
    return listing


@contextmanager
def prediction_file(output: Path | None) -> Iterator[IO[str]]:
    """stdout, or `<output>.partial` (renamed to `<output>` by `finish`)."""
    if output is None:
        yield sys.stdout
        return
    with open(partial_path(output), "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        yield f


def run(args: argparse.Namespace) -> int:
    listing = find_files(args.paths, args.recursive)
    if args.output is not None:
        needed = len(listing.files) * (100 + 60 * args.topk)  # bytes: a record is a name and k (index, label, prob)
        check_output_file(args.output, needed_bytes=needed)
        check_output_file(partial_path(args.output), needed_bytes=needed)
    fmt = RecordFormat(args.format, args.topk)
    done = read_done(args.output, fmt) if args.resume and args.output is not None else []
    predictor = open_predictor(args, "infer")
    backend = predictor.backend
    if backend.meta.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    for folder in listing.skipped_loops:
        print(f"infer: note: {display_path(folder)}: already visited (a symlink loop); not read again", file=sys.stderr)
    done_keys = {key for key, _, _ in done}
    todo = [f for f in listing.files if fmt.key(f) not in done_keys]
    summary = Summary(backend.name, backend.precision, str(backend.artifact_dir), backend.meta.synthetic)
    opts = ClassifyOptions(batch_size=args.batch_size, topk=args.topk, workers=args.workers, draft=args.draft,
                           max_pixels=args.max_pixels)
    with backend, prediction_file(args.output) as out, \
            progress_bar(total=len(todo) + len(listing.errors), unit="img", enabled=args.progress) as bar:
        writer = PredictionWriter(out, fmt)

        def emit(pred: Prediction) -> None:
            with signals_deferred():  # the record and the count of it go together, whatever arrives meanwhile
                writer.write(pred)
                summary.add(pred)
            bar.update()
            if pred.error:
                bar.write(f"infer: error: {pred.error}", file=sys.stderr)

        start = time.perf_counter()
        try:
            if done:
                bar.write(f"infer: resuming: {len(done)} files done earlier, {len(todo)} to go", file=sys.stderr)
            for key, record, failed in done:
                writer.write_record(record)
                summary.images += 1
                summary.resumed += not failed
                if failed:
                    summary.failed.append(Prediction(Path(key), error=f"{key}: failed in the earlier run"))
            for folder, reason in listing.errors:
                emit(Prediction(folder, error=f"{display_path(folder)}: {reason}"))
            for pred in iter_predictions(todo, predictor, opts):
                emit(pred)
        except KeyboardInterrupt as err:
            summary.seconds, summary.interrupted = time.perf_counter() - start, True
            with signals_deferred():
                writer.close(summary)
            saved = (f"{writer.count} predictions kept in {partial_path(args.output)}; run the same command with --resume "
                     "to finish" if args.output is not None else f"{writer.count} predictions written")
            raise Interrupted(getattr(err, "signum", 2), saved) from None
        summary.seconds = time.perf_counter() - start
        with signals_deferred(deliver=False):  # everything is predicted: a signal now changes nothing
            writer.close(summary)
            if args.output is not None:
                out.flush()
                os.fsync(out.fileno())
                os.replace(partial_path(args.output), args.output)
    print_summary(summary)
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("infer", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
