"""The one interface every inference backend implements (after Polygraphy's runners).

What to run is resolved once, outside the backend: a registry entry (`BackendKind`) turns an
artifact folder, a precision or a file the user named into a `ModelSource` (the file, its
metadata and precision), and the backend is built on that source, as Polygraphy's runners are
built on a loader. A backend is used as a context manager (`__enter__` loads the model,
`__exit__` frees it) and runs float32 NCHW batches, returning named numpy outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from runtime.artifact import ArtifactMeta, model_path, read_onnx_meta
from runtime.errors import Unavailable, UsageError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# The largest batch any backend accepts: 256 DeiT inputs are 154 MB of pixels; beyond that the
# activations of a base model take many GB before the first prediction (see README, bad input).
MAX_BATCH = 256


class BackendUnavailable(Unavailable):
    """The backend cannot run here; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # "batch" for the dynamic axis


@dataclass
class ModelSource:
    """What a backend runs: a model file in an artifact folder, its metadata and the precision it runs at.

    For backends that rebuild the model (PyTorch) `file` is the ONNX file whose metadata names the
    checkpoint. `load` is called when the backend activates; a source that makes its model then
    (a benchmark's differently exported model) overrides it and `release`, and says how in `info`.
    """

    artifact_dir: Path
    file: Path
    precision: str
    meta: ArtifactMeta
    info: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Path:
        """The file to run."""
        return self.file

    def release(self) -> None:
        """Free what `load` made."""


class BackendKind(ABC):
    """A registry entry: what is known about a backend before one is built, and how to build one.

    Subclasses set the class attributes and override the file rules they change; resolving a
    source and saying which files are missing are written here, once.
    """

    name: str
    device: str = "cpu"  # "cuda" for GPU backends; torch's depends on what it finds
    default_precision: str = "fp32"
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    suffix = ".onnx"  # the kind of model file a user may name
    missing_hint = ""  # appended to "<file> not found": how to make the file

    def unavailable_reason(self) -> str | None:
        """None when this machine can run the backend, else what is missing and how to install it."""
        return None

    def precision_unavailable(self, precision: str) -> str | None:
        """Why this machine cannot run `precision` although the backend supports it (None: it can)."""
        return None

    def model_file_for(self, artifact_dir: Path, precision: str) -> Path:
        """The file in an artifact folder that this backend runs at `precision`."""
        return model_path(artifact_dir, precision)

    def needed_files(self, artifact_dir: Path, precision: str) -> tuple[Path, ...]:
        """Every file the backend reads at `precision` (the model file first)."""
        return (self.model_file_for(artifact_dir, precision),)

    def missing_files(self, artifact_dir: str | Path, precision: str | None = None) -> str | None:
        """None when the artifact has what this backend needs at `precision`, else the first thing missing or unusable."""
        precision = precision or self.default_precision
        if precision not in self.precisions:
            return f"{self.name} does not run {precision}"
        reason = self.precision_unavailable(precision)
        if reason:
            return reason
        absent = [p for p in self.needed_files(Path(artifact_dir), precision) if not p.is_file()]
        return f"{absent[0]} not found{self.missing_hint}" if absent else self.files_unusable(Path(artifact_dir), precision)

    def files_unusable(self, artifact_dir: Path, precision: str) -> str | None:
        """Why files that are present must not be run (an engine built from an older ONNX), None if they may."""
        return None

    def read_meta(self, file: Path) -> ArtifactMeta:
        return read_onnx_meta(file)

    def open_file(self, file: Path, artifact_dir: Path, asked: str | None) -> tuple[str, ArtifactMeta]:
        """The precision and metadata of a model file named by the user: that file runs, or a usage error says why not."""
        if file.suffix != self.suffix:
            raise UsageError(f"{file}: backend {self.name!r} runs {self.suffix} files, not {file.suffix} files")
        meta = self.read_meta(file)
        if asked is not None and asked not in self.precisions:
            raise UsageError(f"backend {self.name!r} runs {', '.join(self.precisions)}, not {asked}")
        if asked is not None and asked != meta.precision and not (asked == "bf16" and meta.precision == "fp32"):
            raise UsageError(f"{file} is a {meta.precision} model; --precision {asked} would run another file "
                             f"(pass the artifact folder {artifact_dir} instead)")
        return asked or meta.precision, meta

    def source(self, artifact_dir: str | Path, precision: str | None = None, model_file: Path | None = None) -> ModelSource:
        """What to run: the file the user named, else this backend's file for `precision` in the artifact."""
        artifact_dir = Path(artifact_dir)
        if model_file is not None:
            model_file = Path(model_file)
            precision, meta = self.open_file(model_file, artifact_dir, precision)
            return ModelSource(artifact_dir, model_file, precision, meta)
        precision = precision or self.default_precision
        if precision not in self.precisions:
            raise UsageError(f"backend {self.name!r} runs {', '.join(self.precisions)}, not {precision}")
        file = self.model_file_for(artifact_dir, precision)
        return ModelSource(artifact_dir, file, precision, self.read_meta(file))

    @abstractmethod
    def backend(self, source: ModelSource, *, max_batch: int = 8, threads: int | None = None) -> Backend:
        """A backend (not yet activated) that runs `source`."""

    def __call__(self, artifact_dir: str | Path, *, precision: str | None = None, max_batch: int = 8,
                 threads: int | None = None, model_file: Path | None = None) -> Backend:
        """`backend` on the source this artifact, precision or named file resolves to."""
        return self.backend(self.source(artifact_dir, precision, model_file), max_batch=max_batch, threads=threads)


class Backend(ABC):
    clock: str = "host"  # "cuda-events": the backend has time_runs(), timing device-resident runs on the GPU
    # Other work (decode tasks) runs on this backend's cores: threads that busy-wait between operators,
    # fastest alone, would take those cores from it. Set before activating; backends that spin heed it.
    shares_cores: bool = False

    def __init__(self, source: ModelSource, kind: BackendKind, *, max_batch: int = 8, threads: int | None = None) -> None:
        self.kind = kind
        self.name, self.device, self.precisions = kind.name, kind.device, kind.precisions
        self.default_precision = kind.default_precision
        self.source = source
        self.artifact_dir, self.model_file, self.precision, self.meta = source.artifact_dir, source.file, source.precision, source.meta
        self.threads = threads
        check_batch_size(max_batch)
        self.max_batch = max_batch
        h, w = self.meta.preprocessing.input_size
        self.input = InputSpec("pixel_values", "float32", ("batch", 3, h, w))

    def input_shape(self, batch: int) -> tuple[int, ...]:
        h, w = self.meta.preprocessing.input_size
        return (batch, 3, h, w)

    def __enter__(self) -> Backend:
        reason = self.kind.unavailable_reason()
        if reason:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {reason}")
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()

    @abstractmethod
    def activate(self) -> None:
        """Load the model and allocate what inference needs."""

    @abstractmethod
    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch of at most `max_batch` images."""

    def deactivate(self) -> None:
        """Free what `activate` allocated."""

    def infer(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run any number of images, split into batches of at most `max_batch`."""
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != self.input.shape[1:]:
            raise ValueError(f"expected pixel_values of shape (N, {', '.join(map(str, self.input.shape[1:]))}), got {x.shape}")
        chunks = [self.run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def describe(self) -> dict[str, object]:
        """What a report needs to say about how this backend ran (device, threads, file, options)."""
        info: dict[str, object] = {"backend": self.name, "device": self.device, "precision": self.precision,
                                   "model_file": self.model_file.name, "threads": self.threads}
        return info | ({"built": self.source.info} if self.source.info else {})


def check_batch_size(batch: int) -> None:
    if not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"batch size {batch}: must be between 1 and {MAX_BATCH}")
