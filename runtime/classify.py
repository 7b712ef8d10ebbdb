"""Classify many image files: decoding overlapped with inference, bad files reported, never fatal.

A thread pool decodes and preprocesses ahead of the model through a bounded window of pending
futures, so memory stays flat however many files there are (Pillow's decoders, resizing and ONNX
Runtime all release the GIL, so threads overlap for real). Results come back in input order; a
file that cannot be read becomes a `Prediction` with an `error` instead of stopping the run.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifact import SYNTHETIC_WARNING
from runtime.cpuinfo import usable_cores
from runtime.errors import signals_deferred
from runtime.decode import (DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, DecodeBudget, DecodeFailure, decode_file,
                            display_path)
from runtime.predictor import Prediction, Predictor
from runtime.preprocess import Preprocessing


def default_workers() -> int:
    """Decode threads: one per core. On 2 cores they share the CPU with the model's own threads,
    which is fine because decoding a batch costs a fraction of running it (see README)."""
    return usable_cores()


def default_decode_memory() -> int:
    """Decoded pixels all decode threads may hold at once: a quarter of the machine's memory, between
    512 MiB and 8 GiB (one 15,000 x 15,000 photo holds about 1.7 GiB while it is decoded)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(512 * 2**20, min(total // 4, 8 * 2**30))


@dataclass(frozen=True)
class ClassifyOptions:
    batch_size: int = 8
    workers: int = field(default_factory=default_workers)
    draft: bool = False  # decode big JPEGs at reduced scale (>= 2x the resize target): faster, not exact
    prefetch: int | None = None  # files decoded ahead of the model; default 4 batches
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from their header, before decoding
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger files are refused before they are opened
    decode_memory: int = field(default_factory=default_decode_memory)  # bytes all decode threads may hold


@dataclass
class Summary:
    backend: str
    precision: str
    model: str
    synthetic: bool
    images: int = 0
    failed: list[Prediction] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0  # predictions carried over from an interrupted run (--resume), not recomputed
    interrupted: bool = False
    more_failed: int = 0  # failures counted but not kept in `failed` (a Ray job keeps the first few; its output has all)
    workers: int | None = None  # inference actors of a Ray job
    first_row_s: float | None = None  # a Ray job's start-up: actors started, model loaded, first block classified

    @property
    def failures(self) -> int:
        return len(self.failed) + self.more_failed

    @property
    def predicted(self) -> int:
        return self.images - self.failures

    @property
    def images_per_s(self) -> float:
        return (self.predicted - self.resumed) / self.seconds if self.seconds > 0 else 0.0

    def add(self, pred: Prediction) -> None:
        self.images += 1
        if not pred.ok:
            self.failed.append(pred)

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "model": self.model,
            "synthetic_weights": self.synthetic,
            "images": self.images,
            "predicted": self.predicted,
            "failed": [{"path": display_path(p.source), "error": p.error} for p in self.failed],
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "resumed": self.resumed,
            "interrupted": self.interrupted,
        }


def print_summary(s: Summary) -> None:
    """The one summary every runner prints on stderr: counts, rate, what ran, then each failed file."""
    resumed = f" ({s.resumed} from earlier runs)" if s.resumed else ""
    workers = f" x {s.workers} workers" if s.workers else ""
    first = f", first row after {s.first_row_s:.1f} s" if s.first_row_s is not None else ""
    print(f"{s.images} images, {s.predicted} predicted{resumed}, {s.failures} failed, {s.images_per_s:.1f} images/s, "
          f"backend {s.backend} ({s.precision}){workers}{first}, model {s.model}", file=sys.stderr)
    if s.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    if s.failures:
        print("failed files:", file=sys.stderr)
        for pred in s.failed:
            print(f"  {pred.error}", file=sys.stderr)
        if s.more_failed:
            print(f"  ... and {s.more_failed} more (the output's `error` column has them all)", file=sys.stderr)


def decoded(
    files: Iterable[Path], spec: Preprocessing, workers: int, prefetch: int, draft: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, decode_memory: int | None = None,
) -> Iterator[tuple[Path, np.ndarray | DecodeFailure]]:
    """(file, pixels or error) in input order, decoded by `workers` threads at most `prefetch` files ahead,
    which together hold at most `decode_memory` bytes of decoded pixels (a bigger picture is decoded alone).

    A consumer that stops early (an interrupt) does not wait for the decodes under way: a file that
    stalls the decoder must not hold the run (the threads are left to finish, or to the process exit).
    """
    budget = DecodeBudget(decode_memory or default_decode_memory())
    limits = (draft, max_pixels, max_file_bytes, budget)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: deque[tuple[Path, Future[np.ndarray | DecodeFailure]]] = deque()
    it = iter(files)
    finished = False
    try:
        for path in it:
            pending.append((path, pool.submit(decode_file, path, spec, *limits)))
            if len(pending) >= prefetch:
                break
        while pending:
            path, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(decode_file, nxt, spec, *limits)))
            yield path, fut.result()
        finished = True
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)


def iter_predictions(
    files: Iterable[Path], predictor: Predictor, opts: ClassifyOptions = ClassifyOptions()
) -> Iterator[Prediction]:
    """Predictions for `files` in order, from a predictor on an activated backend; unreadable files carry an error."""
    prefetch = opts.prefetch or 4 * opts.batch_size
    batch: list[tuple[Path, np.ndarray | DecodeFailure]] = []
    ready = 0  # decoded images in `batch`; errors ride along so records stay in input order
    for path, result in decoded(files, predictor.spec, opts.workers, prefetch, opts.draft, opts.max_pixels,
                                opts.max_file_bytes, opts.decode_memory):
        batch.append((path, result))
        ready += not isinstance(result, DecodeFailure)
        if ready == opts.batch_size:
            yield from predictor.predict(*zip(*batch))
            batch, ready = [], 0
    if batch:
        yield from predictor.predict(*zip(*batch))


def classify(
    files: Iterable[Path],
    predictor: Predictor,
    opts: ClassifyOptions = ClassifyOptions(),
    on_prediction: Callable[[Prediction], None] | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Classify `files` with a predictor on an activated backend and return the run's figures.

    Predictions are handed to `on_prediction` as they are ready rather than collected, so a run over
    100,000 files holds no more than a few batches (pass `list.append` to keep them). A caller that
    must report on an interrupted run passes its own `summary`: it holds what was counted when the
    interrupt arrives, and `seconds` is set however the run ends.
    """
    backend = predictor.backend
    if summary is None:
        summary = Summary(backend.name, backend.precision, str(backend.artifact_dir), backend.meta.synthetic)
    start = time.perf_counter() - summary.seconds
    try:
        for pred in iter_predictions(files, predictor, opts):
            with signals_deferred():  # a record and the count of it go together, whatever signal arrives meanwhile
                summary.add(pred)
                if on_prediction is not None:
                    on_prediction(pred)
    finally:
        summary.seconds = time.perf_counter() - start
    return summary
