"""`python -m runtime.infer`: classify image files and folders with an exported DeiT artifact.

    python -m runtime.infer images/
    python -m runtime.infer images/ --model artifacts/deit-small-distilled-patch16-224 --backend ort-cpu --topk 5
    python -m runtime.infer photo.jpg other.png --format json > predictions.json

Predictions go to stdout (or --output, written atomically); progress, warnings, per-file errors and
the summary go to stderr. Exit status: 0 every file predicted, 1 some files failed (listed at the
end), 2 usage errors (no such path, no images found, no model artifact, corrupt model, backend
unavailable).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from runtime.artifact import MODEL_FILES, SYNTHETIC_WARNING, ArtifactError, atomic_path, find_artifact
from runtime.backends import BACKENDS, BackendUnavailable, create, pick_auto
from runtime.classify import ClassifyOptions, Prediction, Summary, classify, default_workers, display_path
from runtime.preprocess import list_images

USAGE_ERROR = 2


class UsageError(Exception):
    """Nothing can be classified: the message says why; exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    title, _, usage = (__doc__ or "").partition("\n")
    p = argparse.ArgumentParser(prog="python -m runtime.infer", description=title, epilog=usage,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    p.add_argument("--model", help="artifact folder or .onnx file (default: the newest under --artifacts)")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where to look for the newest artifact")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="auto: TensorRT engine > ORT CUDA > ORT CPU, whichever is present")
    p.add_argument("--precision", choices=list(MODEL_FILES), help="model precision (default: the backend's own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--format", choices=["text", "json", "csv"], default="text")
    p.add_argument("--output", type=Path, help="write predictions here instead of stdout (atomically)")
    p.add_argument("--recursive", "-r", action="store_true", help="also look inside sub-folders")
    p.add_argument("--workers", type=int, default=default_workers(), help="decode threads (default: one per core)")
    p.add_argument("--draft", action="store_true",
                   help="decode big JPEGs at reduced scale: faster, pixels not identical to DeiTImageProcessor")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    args = p.parse_args(argv)
    for name in ("batch_size", "topk", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def find_files(paths: list[Path], recursive: bool) -> list[Path]:
    missing = [display_path(p) for p in paths if not os.path.lexists(p)]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    files = list_images(paths, recursive=recursive)
    if not files:
        hint = "" if recursive else " (use --recursive for sub-folders)"
        raise UsageError(f"no images found in {', '.join(display_path(p) for p in paths)}{hint}")
    return files


class Writer:
    """Streams predictions in one format, so what is done is on disk even if the run stops early."""

    def __init__(self, out: IO[str], fmt: str, topk: int) -> None:
        self.out, self.fmt, self.first = out, fmt, True
        self.csv = csv.writer(out) if fmt == "csv" else None
        if self.csv:
            ranks = range(1, topk + 1)
            self.csv.writerow(["path", "error", *[f"{c}{r}" for r in ranks for c in ("index", "label", "prob")]])
        elif fmt == "json":
            out.write('{"predictions": [\n')

    def __call__(self, pred: Prediction) -> None:
        name = display_path(pred.path)
        if self.fmt == "text":
            if pred.top is not None:
                self.out.write(f"{name}\t" + "\t".join(f"{label} {p:.4f}" for _, label, p in pred.top) + "\n")
        elif self.csv:
            self.csv.writerow([name, pred.error or "", *[v for t in pred.top or [] for v in (t[0], t[1], f"{t[2]:.6f}")]])
        else:
            entry = {"path": name, "error": pred.error} if pred.top is None else {
                "path": name, "top": [{"index": i, "label": label, "prob": p} for i, label, p in pred.top]}
            self.out.write(("" if self.first else ",\n") + json.dumps(entry))
        self.first = False
        self.out.flush()

    def close(self, summary: Summary) -> None:
        if self.fmt == "json":
            self.out.write(f'\n], "summary": {json.dumps(summary.to_dict())}}}\n')


@contextlib.contextmanager
def output(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        yield f


def run(args: argparse.Namespace) -> int:
    files = find_files(args.paths, args.recursive)
    artifact = find_artifact(args.model, args.artifacts)
    name = args.backend
    if name == "auto":
        name, skipped = pick_auto(artifact)
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        print(f"backend: {name} (auto{'; passed over ' + why if why else ''})", file=sys.stderr)
    backend = create(name, artifact, precision=args.precision, max_batch=args.batch_size)
    if backend.meta.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    opts = ClassifyOptions(batch_size=args.batch_size, topk=args.topk, workers=args.workers, draft=args.draft)
    from tqdm import tqdm

    with backend, output(args.output) as out, tqdm(total=len(files), unit="img", file=sys.stderr,
                                                    disable=None if args.progress else True) as bar:
        writer = Writer(out, args.format, args.topk)

        def on_prediction(pred: Prediction) -> None:
            writer(pred)
            bar.update()
            if pred.error:
                bar.write(f"infer: error: {pred.error}", file=sys.stderr)

        summary = classify(files, backend, opts, on_prediction)
        writer.close(summary)
    print_summary(summary)
    return 1 if summary.failed else 0


def print_summary(s: Summary) -> None:
    print(f"{s.images} images, {s.predicted} predicted, {len(s.failed)} failed, {s.images_per_s:.1f} images/s, "
          f"backend {s.backend} ({s.precision}), model {s.model}", file=sys.stderr)
    if s.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    if s.failed:
        print("failed files:", file=sys.stderr)
        for pred in s.failed:
            print(f"  {pred.error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, ArtifactError, BackendUnavailable) as err:
        print(f"infer: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
