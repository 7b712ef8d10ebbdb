"""End-to-end images/s of the classify pipeline on a folder, against the model alone on the same images.

    python -m benchmarks.pipeline_throughput artifacts/deit-small-distilled-patch16-224 ../shared/imagenet-sample

Model-only: the folder is decoded once into memory, then only `Backend.infer` is timed, in batches.
End-to-end: `runtime.classify.classify` on the files (decode + preprocess in the worker pool,
inference, top-k), timed from the first file to the last result. Both use the same warm session and
the one timing core (`runtime.backends.timing.measure`: `repeats` passes each, the best kept, re-measured
when other processes loaded the machine).
Draft mode (reduced-scale JPEG decoding) is measured the same way, and how far it moves the
preprocessed pixels is reported (max/mean absolute difference against the exact path).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import SYNTHETIC_WARNING, find_artifact, write_json
from runtime.backends import Backend, create
from runtime.classify import ClassifyOptions, classify, decoded, default_workers
from runtime.predictor import Predictor
from runtime.console import progress_bar
from runtime.errors import ArgumentParser, UsageError, run_cli
from runtime.decode import DecodeFailure
from runtime.inputs import list_images
from runtime.preprocess import Preprocessing
from runtime.backends.timing import host_ms, measure


def _decode_all(files: list[Path], spec: Preprocessing, draft: bool, workers: int = 1) -> tuple[list[Path], np.ndarray, float]:
    """The files that decode, their pixels, and decode+preprocess images/s with `workers` threads."""
    start = time.perf_counter()
    done = [(f, x) for f, x in decoded(files, spec, workers, 4 * workers, draft) if not isinstance(x, DecodeFailure)]
    return [f for f, _ in done], np.stack([x for _, x in done]), len(done) / (time.perf_counter() - start)


def _model_only(backend: Backend, pixels: np.ndarray, batch_size: int) -> None:
    for i in range(0, len(pixels), batch_size):
        backend.infer(pixels[i : i + batch_size])


def _best_rate(images: int, one_pass: Any, repeats: int) -> float:
    """Images/s of the best of `repeats` passes, from the timing core (re-measured under other load)."""
    timing = measure(lambda: host_ms(one_pass), images, warmup=0, min_iters=repeats, min_time_s=0.0,
                     max_iters=repeats, retries=1)
    return images * 1000.0 / timing.min_ms


def measure_pipeline(
    artifact_dir: str | Path,
    images: str | Path,
    backend: str = "ort-cpu",
    precision: str | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    threads: int | None = None,
    limit: int | None = None,
    repeats: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """End-to-end vs model-only images/s (exact and draft decoding) and draft mode's pixel difference.

    `threads` sets the backend's own intra-op threads where it has them (ort-cpu, torch); None keeps
    its default. Returns plain data (JSON-serialisable).
    """
    files = list_images([Path(images)], recursive=True)[:limit]
    if not files:
        raise UsageError(f"no images found in {images}")
    workers = workers or default_workers()
    be = create(backend, find_artifact(artifact_dir), precision=precision, max_batch=batch_size, threads=threads)
    opts = {draft: ClassifyOptions(batch_size=batch_size, workers=workers, draft=draft) for draft in (False, True)}
    best: dict[str, float] = {}
    with be:
        spec = be.meta.preprocessing
        _decode_all(files, spec, draft=False, workers=workers)  # warm the file cache for both timings
        ok_files, exact, decode_exact = _decode_all(files, spec, draft=False)
        _, draft_pixels, decode_draft = _decode_all(files, spec, draft=True)
        _model_only(be, exact[: 2 * batch_size], batch_size)  # warm-up: first runs allocate
        with progress_bar(total=3, desc="pipeline throughput", enabled=progress) as steps:
            best["model_only"] = _best_rate(len(exact), lambda: _model_only(be, exact, batch_size), repeats)
            steps.update()
            for key, draft in (("end_to_end", False), ("end_to_end_draft", True)):
                best[key] = _best_rate(len(exact), lambda d=draft: classify(files, Predictor(be), opts[d]), repeats)
                steps.update()
    diff = np.abs(exact - draft_pixels).reshape(len(exact), -1)
    changed = [f for f, d in zip(ok_files, diff.max(axis=1)) if d > 0]
    big_speedup = None
    if changed:  # the files draft mode actually decodes smaller: its speed-up where it acts
        big_speedup = _decode_all(changed, spec, draft=True)[2] / _decode_all(changed, spec, draft=False)[2]
    return {
        "model": be.meta.checkpoint,
        "synthetic_weights": be.meta.synthetic,
        "backend": be.name,
        "precision": be.precision,
        "batch_size": batch_size,
        "decode_workers": workers,
        "backend_threads": be.threads,
        "images": len(files),
        "decoded": len(exact),
        "repeats": repeats,
        "model_only_images_per_s": round(best["model_only"], 2),
        "end_to_end_images_per_s": round(best["end_to_end"], 2),
        "end_to_end_ratio": round(best["end_to_end"] / best["model_only"], 3),
        "end_to_end_draft_images_per_s": round(best["end_to_end_draft"], 2),
        "decode_images_per_s_1_thread": {"exact": round(decode_exact, 1), "draft": round(decode_draft, 1)},
        "draft_decode_speedup": round(decode_draft / decode_exact, 2),
        "draft_pixel_abs_diff": {"max": round(float(diff.max()), 4), "mean": round(float(diff.mean()), 5),
                                 "mean_over_changed_images": round(float(diff[diff.max(axis=1) > 0].mean()), 5)
                                 if changed else 0.0},
        "draft_images_changed": len(changed),
        "draft_decode_speedup_on_changed": round(big_speedup, 2) if big_speedup else None,
    }


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.pipeline_throughput", description=(__doc__ or "").split("\n")[0])
    p.add_argument("model", help="artifact folder (or its model.onnx)")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--precision")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, help="decode threads (default: one per core)")
    p.add_argument("--threads", type=int, help="backend intra-op threads (default: the backend's own)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("pipeline_throughput", lambda: report(args), entry=argv is None)


def report(args: Any) -> int:
    r = measure_pipeline(args.model, args.images, args.backend, args.precision, args.batch_size, args.workers,
                         args.threads, args.limit, args.repeats)
    if r["synthetic_weights"]:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    print(f"{r['model']} on {r['backend']} ({r['precision']}), batch {r['batch_size']}, {r['images']} images, "
          f"{r['decode_workers']} decode workers, {r['backend_threads']} backend threads")
    print(f"  model only:         {r['model_only_images_per_s']:8.2f} images/s")
    print(f"  end to end:         {r['end_to_end_images_per_s']:8.2f} images/s  ({r['end_to_end_ratio']:.1%} of model only)")
    print(f"  end to end (draft): {r['end_to_end_draft_images_per_s']:8.2f} images/s")
    d = r["draft_pixel_abs_diff"]
    print(f"  decode+preprocess, 1 thread: exact {r['decode_images_per_s_1_thread']['exact']} images/s, "
          f"draft {r['decode_images_per_s_1_thread']['draft']} images/s ({r['draft_decode_speedup']}x); draft moves "
          f"pixels by max {d['max']}, mean {d['mean']} (normalised units)")
    if r["draft_images_changed"]:
        print(f"  draft mode decodes {r['draft_images_changed']} of the images smaller: on those, decode+preprocess is "
              f"{r['draft_decode_speedup_on_changed']}x faster and pixels move by {d['mean_over_changed_images']} on average")
    if args.json:
        write_json(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
