"""Classify many image files: decoding overlapped with inference, bad files reported, never fatal.

A thread pool decodes and preprocesses ahead of the model through a bounded window of pending
futures, so memory stays flat however many files there are (Pillow's decoders, resizing and ONNX
Runtime all release the GIL, so threads overlap for real). Results come back in input order; a
file that cannot be read becomes a `Prediction` with an `error` instead of stopping the run.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifact import ArtifactError, ArtifactMeta
from runtime.backends import Backend
from runtime.labels import resolve_labels
from runtime.preprocess import DEFAULT_MAX_PIXELS, ImageError, Preprocessing, load_and_preprocess, regular_file_error


def default_workers() -> int:
    """Decode threads: one per core. On 2 cores they share the CPU with the model's own threads,
    which is fine because decoding a batch costs a fraction of running it (see README)."""
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class ClassifyOptions:
    batch_size: int = 8
    topk: int = 5
    workers: int = field(default_factory=default_workers)
    draft: bool = False  # decode big JPEGs at reduced scale (>= 2x the resize target): faster, not exact
    prefetch: int | None = None  # files decoded ahead of the model; default 4 batches
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from their header, before decoding


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[int, str, float]] | None = None  # (class index, label, probability), best first
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


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

    @property
    def predicted(self) -> int:
        return self.images - len(self.failed)

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
            "failed": [{"path": display_path(p.path), "error": p.error} for p in self.failed],
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "resumed": self.resumed,
            "interrupted": self.interrupted,
        }


def display_path(path: Path) -> str:
    """A file name that can always be printed: undecodable bytes become `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_classifier(meta: ArtifactMeta, model_file: Path) -> None:
    if "logits" not in meta.output_names:
        raise ArtifactError(f"{model_file}: a '{meta.task}' model has no logits output; export with --task classification")


def decode_file(path: Path, spec: Preprocessing, draft: bool, max_pixels: int) -> np.ndarray | str:
    """One file -> pixel array, or the one-line reason it cannot be read (the message names the file)."""
    # A FIFO or device named like a picture would block or never end; refuse before opening it.
    reason = regular_file_error(path)
    if reason:
        return f"{display_path(path)}: {reason}"
    try:
        return load_and_preprocess(path, spec, draft=draft, max_pixels=max_pixels)
    except ImageError as err:
        return str(err).replace(str(path), display_path(path), 1)
    except (OSError, ValueError, MemoryError) as err:  # anything else Pillow/numpy raise on a hostile file
        return f"{display_path(path)}: {type(err).__name__}: {err}"


def decoded(
    files: Iterable[Path], spec: Preprocessing, workers: int, prefetch: int, draft: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(file, pixels or error) in input order, decoded by `workers` threads at most `prefetch` files ahead."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[Path, Future[np.ndarray | str]]] = deque()
        it = iter(files)
        try:
            for path in it:
                pending.append((path, pool.submit(decode_file, path, spec, draft, max_pixels)))
                if len(pending) >= prefetch:
                    break
            while pending:
                path, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(decode_file, nxt, spec, draft, max_pixels)))
                yield path, fut.result()
        finally:  # a consumer that stops early must not wait for work nobody will read
            for _, fut in pending:
                fut.cancel()


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[list[tuple[int, str, float]]]:
    """Softmax over classes, then the k best per row (ties keep the lower index)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(int(i), labels[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


def iter_predictions(
    files: Iterable[Path], backend: Backend, opts: ClassifyOptions = ClassifyOptions()
) -> Iterator[Prediction]:
    """Predictions for `files` in order, from an activated backend; unreadable files carry an error."""
    check_classifier(backend.meta, backend.model_file)
    prefetch = opts.prefetch or 4 * opts.batch_size
    labels: list[str] | None = None
    batch: list[tuple[Path, np.ndarray]] = []
    waiting: list[Prediction | int] = []  # errors, and positions in `batch`, in input order

    def flush() -> Iterator[Prediction]:
        nonlocal labels
        tops: list[list[tuple[int, str, float]]] = []
        if batch:
            logits = backend.infer(np.stack([x for _, x in batch]))["logits"]
            if labels is None:
                labels = resolve_labels(backend.meta.id2label, logits.shape[1])
            tops = top_k(logits, labels, opts.topk)
        for item in waiting:
            yield item if isinstance(item, Prediction) else Prediction(batch[item][0], top=tops[item])
        batch.clear()
        waiting.clear()

    spec = backend.meta.preprocessing
    for path, result in decoded(files, spec, opts.workers, prefetch, opts.draft, opts.max_pixels):
        if isinstance(result, str):
            waiting.append(Prediction(path, error=result))
        else:
            waiting.append(len(batch))
            batch.append((path, result))
            if len(batch) == opts.batch_size:
                yield from flush()
    yield from flush()


def classify(
    files: Iterable[Path],
    backend: Backend,
    opts: ClassifyOptions = ClassifyOptions(),
    on_prediction: Callable[[Prediction], None] | None = None,
) -> Summary:
    """Classify `files` with an activated backend and return the run's figures.

    Predictions are handed to `on_prediction` as they are ready rather than collected, so a run over
    100,000 files holds no more than a few batches (pass `list.append` to keep them).
    """
    summary = Summary(backend.name, backend.precision, str(backend.artifact_dir), backend.meta.synthetic)
    start = time.perf_counter()
    try:
        for pred in iter_predictions(files, backend, opts):
            summary.add(pred)
            if on_prediction is not None:
                on_prediction(pred)
    finally:
        summary.seconds = time.perf_counter() - start
    return summary
