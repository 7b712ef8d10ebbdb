"""`python -m runtime.infer`: classify image files and folders with an exported DeiT artifact.

    python -m runtime.infer images/
    python -m runtime.infer images/ --model artifacts/deit-small-distilled-patch16-224 --backend ort-cpu --topk 5
    python -m runtime.infer photos/ -r --format csv --output predictions.csv    # Ctrl-C keeps predictions.csv.partial
    python -m runtime.infer photos/ -r --format csv --output predictions.csv --resume

Predictions go to stdout or --output; progress, warnings, per-file errors and the summary go to
stderr. Everything that can be checked (paths, model, backend, output location, arguments) is
checked before the first image is decoded. Exit status: the README's table (1: some files failed,
each named; 7 and 130/143 keep the .partial for --resume).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from runtime.artifact import SYNTHETIC_WARNING
from runtime.backends import Backend
from runtime.classify import ClassifyOptions, Summary, classify, default_decode_memory, default_workers, print_summary
from runtime.cli import add_classify_arguments, check_classify_arguments, check_thread_count, settle_model
from runtime.console import progress_bar
from runtime.errors import ArgumentParser, Interrupted, UsageError, run_cli, signals_deferred
from runtime.infer.output import (FORMATS, DoneRecord, PredictionWriter, RecordFormat, check_resumable, escape_name,
                            partial_path, read_written)
from runtime.paths import check_output_file, output_lock
from runtime.decode import display_path
from runtime.inputs import Listing, find_images
from runtime.predictor import Prediction, open_predictor


def build_parser() -> ArgumentParser:
    title, _, usage = (__doc__ or "").partition("\n")
    p = ArgumentParser(prog="python -m runtime.infer", description=title, epilog=usage,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    add_classify_arguments(p, "")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text: path<TAB>label prob... (a failed file: path<TAB>error<TAB>why); json; csv. Every "
                        "format names files the same way: \\\\ \\t \\n \\r and non-UTF-8 bytes (\\xNN) escaped")
    p.add_argument("--output", type=Path, help="write predictions here (via <output>.partial) instead of stdout")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run's --output: inputs with a record (failed ones included) are skipped; "
                        "the format, --topk and model must be the same")
    p.add_argument("--recursive", "-r", action="store_true", help="also look inside sub-folders (symlinks followed)")
    p.add_argument("--workers", type=int, default=default_workers(), help="decode threads (default: one per core)")
    p.add_argument("--decode-memory", type=int, default=default_decode_memory(),
                   help="bytes of decoded pixels all decode threads may hold at once; a bigger picture is decoded alone, a "
                        "bigger JPEG at reduced scale as --draft does (default: a quarter of the memory, 512 MiB to 8 GiB)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_classify_arguments(p, args, "workers")
    check_thread_count(p, "--workers", args.workers)
    if args.decode_memory < 1:
        p.error("--decode-memory must be at least 1")
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


def run(args: argparse.Namespace) -> int:
    listing = find_files(args.paths, args.recursive)
    output: Path | None = None  # the regular file written through its .partial; None: stdout or a stream
    stream = args.output
    if args.output is None and sys.stdout is None:
        raise UsageError("stdout is closed; give --output FILE for the predictions")
    if args.output is not None:
        needed = len(listing.files) * (100 + 60 * args.topk)  # bytes: a record is a name and k (index, label, prob)
        output = check_output_file(args.output, needed_bytes=needed)
        if output is not None:
            check_output_file(partial_path(output), needed_bytes=needed)
            stream = None
        elif args.resume:
            raise UsageError(f"--resume: --output {args.output} is a device or FIFO, written straight through; "
                             "nothing of an earlier run was kept there")
    fmt = RecordFormat(args.format, args.topk)
    predictor = open_predictor(settle_model(args, "infer"))
    backend = predictor.backend
    with prediction_file(output, stream, fmt, run_identity(fmt, backend), args.resume) as target:
        if stream is not None:
            print(f"infer: note: --output {stream} is a device or FIFO: records go straight to it (no .partial; "
                  "an interrupted run cannot be resumed)", file=sys.stderr)
        if backend.meta.synthetic:
            print(SYNTHETIC_WARNING, file=sys.stderr)
        if listing.skipped_note():
            print(f"infer: note: {listing.skipped_note()}", file=sys.stderr)
        for folder in listing.skipped_loops:
            print(f"infer: note: {display_path(folder)}: already visited (a symlink loop); not read again", file=sys.stderr)
        done_keys = {r.key for r in target.done}
        todo = [f for f in listing.files if escape_name(f) not in done_keys]
        folder_errors = [Prediction(folder, error=f"{display_path(folder)}: {why}") for folder, why in listing.errors
                         if escape_name(folder) not in done_keys]
        summary = Summary(backend.name, backend.precision, str(backend.artifact_dir), backend.meta.synthetic)
        summary.images = summary.resumed = len(target.done)
        for r in target.done:
            if r.error is not None:
                summary.failed.append(Prediction(r.key, error=r.error))
        summary.resumed -= len(summary.failed)
        opts = ClassifyOptions(batch_size=args.batch_size, workers=args.workers, draft=args.draft,
                               max_pixels=args.max_pixels, max_file_bytes=args.max_file_bytes,
                               decode_memory=args.decode_memory)
        with backend, progress_bar(total=len(todo) + len(folder_errors), unit="img", enabled=args.progress) as bar:
            writer = PredictionWriter(target.out, fmt, len(target.done), target.name, resumable=output is not None)

            def emit(pred: Prediction) -> None:  # called with signals deferred, after the prediction was counted
                writer.write(pred)
                bar.update()
                if pred.error:
                    bar.write(f"infer: error: {pred.error}", file=sys.stderr)

            try:
                if target.done:
                    bar.write(f"infer: resuming: {len(target.done)} files done earlier, {len(todo) + len(folder_errors)} "
                              "to go", file=sys.stderr)
                for pred in folder_errors:
                    with signals_deferred():
                        summary.add(pred)
                        emit(pred)
                classify(todo, predictor, opts, emit, summary)
            except KeyboardInterrupt as err:
                summary.interrupted = True
                with signals_deferred():
                    writer.close(summary)
                saved = (f"{writer.count} records kept in {partial_path(output)}; run the same command with --resume "
                         "to finish" if output is not None else f"{writer.count} records written")
                raise Interrupted(getattr(err, "signum", signal.SIGINT), saved) from None
            with signals_deferred(deliver=False):  # everything is predicted: a signal now changes nothing
                writer.close(summary)
                target.finish()
    print_summary(summary)
    return 1 if summary.failed else 0


def run_identity(fmt: RecordFormat, backend: Backend) -> str:
    """What makes two runs' records belong in one file: a resumed run must have the same."""
    stat = backend.model_file.stat()
    return json.dumps({"format": fmt.fmt, "topk": fmt.topk, "model": str(backend.model_file.resolve()),
                       "model_bytes": stat.st_size, "model_mtime_ns": stat.st_mtime_ns})


@dataclass
class Target:
    """Where records go: stdout, or `<output>.partial` (with the records an earlier run finished, when resuming)."""

    out: IO[str]
    name: str  # how errors name it
    done: list[DoneRecord] = field(default_factory=list)
    finish: Callable[[], None] = lambda: None  # the run is complete: make the output final


@contextmanager
def prediction_file(output: Path | None, stream: Path | None, fmt: RecordFormat, identity: str,
                    resume: bool) -> Iterator[Target]:
    """`<output>.partial` held under `<output>.partial.lock` (so two runs never write one output); without
    an output, the `stream` (a device or FIFO) or stdout.

    With `resume`, the complete records of the partial (else of the finished output) are kept and the
    file is continued after them (nothing written earlier is rewritten, so a kill at any point loses
    nothing); an output of another format, top-k or model is refused.
    """
    if output is None:
        if stream is None:
            yield Target(sys.stdout, "stdout")
            return
        with open(stream, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            yield Target(f, str(stream))
        return
    partial = partial_path(output)
    with output_lock(partial.with_name(partial.name + ".lock"), str(output)) as lock:
        source = partial if partial.is_file() else output
        kept, done = b"", []
        if resume and source.is_file():
            text = source.read_bytes().decode("utf-8", "surrogateescape")
            written = read_written(text)
            check_resumable(written, fmt, source)
            if lock.previous and lock.previous != identity:
                raise UsageError(f"--resume: {source} was written {describe_change(lock.previous, identity)}; "
                                 "run without --resume to start over")
            kept, done = text[:written.end].encode("utf-8", "surrogateescape"), written.records
        lock.note(identity)
        # Unbuffered below the text layer: a write that fails (a full disk) leaves nothing pending to fail again.
        with open(partial, "r+b" if kept and source == partial else "wb", buffering=0) as raw:
            if source != partial:
                raw.write(kept)
            raw.truncate(len(kept))  # a cut-off record or a closing footer goes; complete records stay
            raw.seek(len(kept))
            out = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="", write_through=True)

            def finish() -> None:
                out.flush()
                os.fsync(raw.fileno())
                os.replace(partial, output)
                lock.remove = True

            try:
                yield Target(out, str(partial), done, finish)
            finally:
                out.detach()


def describe_change(before: str, now: str) -> str:
    """`with --topk 3; this run asks for --topk 5` for two run identities (JSON) that differ."""
    old, new = json.loads(before), json.loads(now)
    if old.get("model") != new["model"]:
        return f"by another model ({old.get('model')}); this run uses {new['model']}"
    for key in ("format", "topk"):
        if old.get(key) != new[key]:
            return f"with --{key} {old.get(key)}; this run asks for --{key} {new[key]}"
    return "by another version of the model file (its size or time changed)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("infer", lambda: run(args), entry=argv is None)
