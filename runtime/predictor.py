"""One predictor for every runner: decoded images in, one record per input out, and one way to open it.

The folder runner (runtime.classify), the Ray actor (runtime.distributed) and the server
(runtime.serve) differ only in where inputs come from and where records go; finding the model,
settling `--backend auto` and the precision, batching through the backend and turning logits into
top-k records happen here, once, so the three give the same answer for the same file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.artifact import ArtifactError, find_model
from runtime.backends.auto import choose
from runtime.backends import Backend, BackendUnavailable, backend_kind, create
from runtime.decode import DecodeFailure, display_path
from runtime.errors import UsageError
from runtime.labels import resolve_labels
from runtime.preprocess import Preprocessing

Top = list[tuple[int, str, float]]  # (class index, label, probability), best first
NOT_FINITE = "the model's output is not finite (NaN or infinity); the model file may be damaged"


@dataclass(frozen=True)
class Prediction:
    source: Path | str  # a file, a URI, a request item: what the record is about
    top: Top | None = None
    error: str | None = None  # one line naming the source and the problem

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ModelOptions:
    """What the classifying CLIs' model flags ask for (runtime.cli parses them into this)."""

    model: str | None = None  # an artifact folder or one model file in it; None: the newest under `artifacts`
    artifacts: str = "artifacts"
    backend: str = "auto"
    precision: str | None = None  # None: the backend's own (or the named file's)
    batch_size: int = 8
    threads: int | None = None
    topk: int = 5


@dataclass(frozen=True)
class Settled:
    """`ModelOptions` with the model found and `auto` decided: what every process of a run opens alike
    (a Ray job settles once, on a worker, and its actors open the same)."""

    options: ModelOptions
    artifact: Path
    model_file: Path | None  # the file the user named, or None for the artifact's file for the backend
    backend: str
    precision: str | None  # None: the named model file's own
    choice: str | None  # what `auto` chose and why; None when a backend was named


def settle(options: ModelOptions, where: str = "here") -> Settled:
    """Find the model, let `auto` choose, and refuse a backend this machine cannot run (naming `where`)."""
    artifact, model_file = find_model(options.model, options.artifacts)
    name, precision, choice = options.backend, options.precision, None
    if name == "auto":
        picked = choose(artifact, precision, options.batch_size, options.threads, model_file)
        name, precision, choice = picked.backend, (None if model_file else picked.precision), picked.describe()
    reason = backend_kind(name).unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {name!r} is unavailable {where}: {reason}")
    return Settled(options, artifact, model_file, name, precision, choice)


def open_predictor(settled: Settled | ModelOptions, threads: int | None = None) -> Predictor:
    """The predictor the options ask for, its backend constructed (not yet entered: `with predictor.backend`).
    `threads` overrides the options' (a Ray actor sizes its own to its node)."""
    if isinstance(settled, ModelOptions):
        settled = settle(settled)
    opts = settled.options if threads is None else replace(settled.options, threads=threads)
    backend = create(settled.backend, settled.artifact, precision=settled.precision, max_batch=opts.batch_size,
                     threads=opts.threads, model_file=settled.model_file)
    return Predictor(backend, opts.topk)


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[Top]:
    """Softmax over classes, then the k best per row (ties keep the lower index)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(int(i), labels[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


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

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, list[Top | None]]:
        """Logits [N, classes] and, per row, its top-k, or None where the logits are not finite (`NOT_FINITE`):
        such a row is never a prediction."""
        logits = self.backend.infer(pixels)["logits"]
        finite = np.isfinite(logits).all(axis=1)
        tops = top_k(np.where(finite[:, None], logits, 0.0), self.labels(logits.shape[1]), self.topk)
        return logits, [top if ok else None for top, ok in zip(tops, finite)]

    def predict(self, sources: Sequence[Path | str], decoded: Sequence[np.ndarray | DecodeFailure]) -> list[Prediction]:
        """One record per source, in order: `decoded[i]` is its pixels, or why it could not be decoded."""
        good = [i for i, x in enumerate(decoded) if not isinstance(x, DecodeFailure)]
        tops: dict[int, Top | None] = {}
        if good:
            _, rows = self.run(np.stack([np.asarray(decoded[i]) for i in good]))
            tops = dict(zip(good, rows))
        records = []
        for i, (source, pixels) in enumerate(zip(sources, decoded)):
            top = tops.get(i)
            if isinstance(pixels, DecodeFailure):
                records.append(Prediction(source, error=pixels.message))
            elif top is None:
                records.append(Prediction(source, error=f"{display_path(source)}: {NOT_FINITE}"))
            else:
                records.append(Prediction(source, top=top))
        return records
