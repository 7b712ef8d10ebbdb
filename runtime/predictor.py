"""One predictor for every runner: decoded images in, one record per input out.

The folder runner (runtime.classify), the Ray actor (runtime.distributed) and the server
(runtime.serve) differ only in where inputs come from and where records go; decoding, batching
through the backend and turning logits into top-k records happen here, once, so the three give the
same answer for the same file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.artifact import ArtifactError
from runtime.backends import Backend
from runtime.errors import UsageError
from runtime.labels import resolve_labels
from runtime.preprocess import (DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, DecodeBudget, ImageError, Preprocessing,
                                file_error, load_and_preprocess)

Top = list[tuple[int, str, float]]  # (class index, label, probability), best first


@dataclass(frozen=True)
class Prediction:
    source: Path | str  # a file, a URI, a request item: what the record is about
    top: Top | None = None
    error: str | None = None  # one line naming the source and the problem

    @property
    def ok(self) -> bool:
        return self.error is None


def display_path(path: Path | str) -> str:
    """A file name that can always be printed: undecodable bytes become `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[Top]:
    """Softmax over classes, then the k best per row (ties keep the lower index)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(int(i), labels[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


def decode_file(path: Path, spec: Preprocessing, draft: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, budget: DecodeBudget | None = None) -> np.ndarray | str:
    """One file -> pixel array, or the one-line reason it cannot be read (the message names the file).
    `budget`: the decoded-pixel memory this decode shares with the other decode threads."""
    reason = file_error(path, max_file_bytes)
    if reason:
        return f"{display_path(path)}: {reason}"
    try:
        return load_and_preprocess(path, spec, draft=draft, max_pixels=max_pixels, budget=budget)
    except ImageError as err:
        return str(err).replace(str(path), display_path(path), 1)
    except (OSError, ValueError, MemoryError) as err:  # anything else Pillow/numpy raise on a hostile file
        return f"{display_path(path)}: {type(err).__name__}: {err}"


@contextmanager
def _as_file(data: bytes) -> Iterator[Path]:
    """Bytes as a file name the loader opens: an anonymous in-memory file on Linux (nothing is left
    behind if the process is killed), a temporary file elsewhere."""
    if hasattr(os, "memfd_create"):
        with os.fdopen(os.memfd_create("deit-input"), "wb") as f:
            f.write(data)
            f.flush()
            yield Path(f"/proc/self/fd/{f.fileno()}")
    else:
        with tempfile.NamedTemporaryFile(prefix="deit-input-") as f:
            f.write(data)
            f.flush()
            yield Path(f.name)


def decode_bytes(data: bytes, name: str, spec: Preprocessing, draft: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, budget: DecodeBudget | None = None) -> np.ndarray | str:
    """Encoded image bytes (a URI's content, a request item) -> pixels or "<name>: <reason>", through
    the same loader as a file, so the answer is the one runtime.infer gives for that file."""
    with _as_file(data) as local:
        result = decode_file(local, spec, draft, max_pixels, max_file_bytes, budget)
    return result.replace(display_path(local), name, 1) if isinstance(result, str) else result


class Predictor:
    """A backend's logits as top-k records; the backend may be entered before or after this is built."""

    def __init__(self, backend: Backend, topk: int = 5) -> None:
        meta = backend.meta
        if "logits" not in meta.output_names:
            raise ArtifactError(f"{backend.model_file}: a '{meta.task}' model has no logits output; "
                                "export with --task classification")
        classes = meta.num_labels
        if topk < 1:
            raise UsageError(f"--topk {topk}: must be at least 1")
        if classes is not None and topk > classes:
            raise UsageError(f"--topk {topk}: the model has only {classes} classes")
        self.backend, self.topk = backend, topk
        self.spec: Preprocessing = meta.preprocessing
        self._labels: list[str] | None = None

    def labels(self, num_classes: int) -> list[str]:
        if self._labels is None:
            self._labels = resolve_labels(self.backend.meta.id2label, num_classes)
        return self._labels

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, list[Top | str]]:
        """Logits [N, classes] and, per row, its top-k or why there is none (non-finite logits are never a prediction)."""
        logits = self.backend.infer(pixels)["logits"]
        finite = np.isfinite(logits).all(axis=1)
        tops = top_k(np.where(finite[:, None], logits, 0.0), self.labels(logits.shape[1]), self.topk)
        return logits, [top if ok else "the model's output is not finite (NaN or infinity); the model file may be damaged"
                        for top, ok in zip(tops, finite)]

    def predict(self, sources: Sequence[Path | str], decoded: Sequence[np.ndarray | str]) -> list[Prediction]:
        """One record per source, in order: `decoded[i]` is its pixels, or why it could not be decoded."""
        good = [i for i, x in enumerate(decoded) if not isinstance(x, str)]
        tops: dict[int, Top | str] = {}
        if good:
            _, rows = self.run(np.stack([np.asarray(decoded[i]) for i in good]))
            tops = dict(zip(good, rows))
        records = []
        for i, source in enumerate(sources):
            decode_error, top = decoded[i], tops.get(i)
            if isinstance(decode_error, str):
                records.append(Prediction(source, error=decode_error))
            elif isinstance(top, str):
                records.append(Prediction(source, error=f"{display_path(source)}: {top}"))
            else:
                records.append(Prediction(source, top=top))
        return records
