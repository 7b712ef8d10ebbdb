"""The one interface every inference backend implements (after Polygraphy's runners).

A backend is built from an artifact folder, used as a context manager (`__enter__` loads the model,
`__exit__` frees it) and runs float32 NCHW batches, returning named numpy outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import numpy as np

from runtime.artifact import ArtifactMeta, model_path, read_onnx_meta


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # "batch" for the dynamic axis


class Backend(ABC):
    name: ClassVar[str]
    default_precision: ClassVar[str] = "fp32"
    device: ClassVar[str] = "cpu"

    def __init__(self, artifact_dir: str | Path, precision: str | None = None, max_batch: int = 8) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.precision = precision or self.default_precision
        self.max_batch = max_batch
        self.model_file = self.model_file_for(self.artifact_dir, self.precision)
        self.meta: ArtifactMeta = self.read_meta()
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
        path = cls.model_file_for(artifact_dir, precision or cls.default_precision)
        return None if path.is_file() else f"{path} not found"

    def read_meta(self) -> ArtifactMeta:
        return read_onnx_meta(self.model_file)

    def __enter__(self) -> Backend:
        reason = self.unavailable_reason()
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
