"""The one interface every inference backend implements (after Polygraphy's runners).

A backend is built from an artifact folder (or one model file in it), used as a context manager
(`__enter__` loads the model, `__exit__` frees it) and runs float32 NCHW batches, returning named
numpy outputs. What the registry holds for each name is a `BackendKind`: a Backend class (its
classmethods answer the questions) or a configured factory such as ONNX Runtime's, which answers
them from its settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

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


class BackendKind(Protocol):
    """What the registry knows about a backend before building one (a Backend class, or a configured factory)."""

    @property
    def name(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def default_precision(self) -> str: ...

    @property
    def precisions(self) -> tuple[str, ...]: ...

    def unavailable_reason(self) -> str | None: ...

    def model_file_for(self, artifact_dir: Path, precision: str) -> Path: ...

    def missing_files(self, artifact_dir: Path, precision: str | None = None) -> str | None: ...

    def __call__(self, artifact_dir: str | Path, *, precision: str | None = None, max_batch: int = 8,
                 threads: int | None = None, model_file: Path | None = None) -> Backend: ...


class Backend(ABC):
    name: str
    default_precision: str = "fp32"
    device: str = "cpu"  # "cuda" for GPU backends; torch's depends on what it finds
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    clock: str = "host"  # "cuda-events": the backend has time_runs(), timing device-resident runs on the GPU

    def __init__(self, artifact_dir: str | Path, precision: str | None = None, max_batch: int = 8,
                 threads: int | None = None, model_file: Path | None = None, kind: BackendKind | None = None) -> None:
        self.kind: BackendKind = kind or type(self)
        self.name, self.device, self.precisions = self.kind.name, self.kind.device, self.kind.precisions
        self.default_precision = self.kind.default_precision
        self.artifact_dir = Path(artifact_dir)
        self.threads = threads
        check_batch_size(max_batch)
        self.max_batch = max_batch
        if model_file is not None:
            self.model_file = Path(model_file)
            self.precision, self.meta = self.open_file(precision)
        else:
            self.precision = precision or self.default_precision
            if self.precision not in self.precisions:
                raise UsageError(f"backend {self.name!r} runs {', '.join(self.precisions)}, not {self.precision}")
            self.model_file = self.kind.model_file_for(self.artifact_dir, self.precision)
            self.meta = self.read_meta()
        h, w = self.meta.preprocessing.input_size
        self.input = InputSpec("pixel_values", "float32", ("batch", 3, h, w))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this machine can run the backend, else what is missing and how to install it."""
        return None

    @classmethod
    def model_file_for(cls, artifact_dir: Path, precision: str) -> Path:
        """The file in an artifact folder that this backend runs at `precision`."""
        return model_path(artifact_dir, precision)

    @classmethod
    def missing_files(cls, artifact_dir: Path, precision: str | None = None) -> str | None:
        precision = precision or cls.default_precision
        if precision not in cls.precisions:
            return f"{cls.name} does not run {precision}"
        path = cls.model_file_for(artifact_dir, precision)
        return None if path.is_file() else f"{path} not found"

    def open_file(self, asked: str | None) -> tuple[str, ArtifactMeta]:
        """The precision and metadata of a model file named by the user: that file runs, or a usage error says why not."""
        if self.model_file.suffix != ".onnx":
            raise UsageError(f"{self.model_file}: backend {self.name!r} runs ONNX files, not {self.model_file.suffix} files")
        meta = self.read_meta()
        if asked is not None and asked not in self.precisions:
            raise UsageError(f"backend {self.name!r} runs {', '.join(self.precisions)}, not {asked}")
        if asked is not None and asked != meta.precision and not (asked == "bf16" and meta.precision == "fp32"):
            raise UsageError(f"{self.model_file} is a {meta.precision} model; --precision {asked} would run another file "
                             f"(pass the artifact folder {self.artifact_dir} instead)")
        return asked or meta.precision, meta

    def read_meta(self) -> ArtifactMeta:
        return read_onnx_meta(self.model_file)

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
        return {"backend": self.name, "device": self.device, "precision": self.precision,
                "model_file": self.model_file.name, "threads": self.threads}


def check_batch_size(batch: int) -> None:
    if not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"batch size {batch}: must be between 1 and {MAX_BATCH}")
