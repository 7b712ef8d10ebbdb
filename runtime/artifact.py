"""Artifact folders and the metadata that makes each file in them self-describing.

Every ONNX file carries one `metadata_props` entry, `deit`, holding `ArtifactMeta` as JSON; engines
and reports carry the same fields in JSON sidecars. A later stage reads these instead of
re-deriving what an earlier one knew.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.preprocess import Preprocessing

METADATA_KEY = "deit"
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# int8 built for ONNX Runtime CPU speed (model.int8.onnx is the TensorRT Q/DQ one); ort-cpu prefers it.
INT8_CPU_FILE = "model.int8-cpu.onnx"
SYNTHETIC_WARNING = (
    "WARNING: this model has SYNTHETIC (random) weights: fine for latency and numerics, "
    "but its predictions and labels are meaningless."
)


class ArtifactError(ValueError):
    """A missing or unreadable artifact; the message names the file."""


@dataclass
class ArtifactMeta:
    checkpoint: str  # hub id or local folder
    weights: str  # "pretrained" | "synthetic"
    architecture: str
    task: str
    num_layers: int
    image_size: int
    preprocessing: Preprocessing
    preprocessing_source: str
    id2label: list[str] | str | None
    output_names: list[str]
    precision: str = "fp32"  # fp32 | fp16 | int8
    attention: str = "fused"  # fused (ONNX Attention op) | decomposed
    opset: int = 23
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the transformers config, to rebuild in PyTorch
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific facts (quantization, ...)

    @property
    def synthetic(self) -> bool:
        return self.weights == "synthetic"

    @property
    def name(self) -> str:
        return self.checkpoint.rstrip("/").split("/")[-1]

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactMeta:
        data = json.loads(text)
        data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
        return cls(**data)


def read_onnx_meta(path: str | Path) -> ArtifactMeta:
    """The metadata of an ONNX file this project wrote (weights are not loaded)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and friends
        raise ArtifactError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ArtifactError(f"{path}: ONNX file has no '{METADATA_KEY}' metadata; export it with `python -m export`")
    return ArtifactMeta.from_json(props[METADATA_KEY])


def set_onnx_meta(model: Any, meta: ArtifactMeta) -> None:
    """Store `meta` in an in-memory `onnx.ModelProto`, replacing any previous entry."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()


def model_path(artifact_dir: str | Path, precision: str = "fp32") -> Path:
    if precision not in MODEL_FILES:
        raise ArtifactError(f"unknown precision {precision!r}; choose one of {', '.join(MODEL_FILES)}")
    return Path(artifact_dir) / MODEL_FILES[precision]


def find_artifact(model: str | Path | None, root: str | Path = "artifacts") -> Path:
    """An artifact folder: the one given, or the newest folder under `root` holding a model.onnx."""
    if model is not None:
        path = Path(model)
        if path.is_file() and path.suffix == ".onnx":
            return path.parent
        if not (path / MODEL_FILES["fp32"]).is_file():
            raise ArtifactError(f"{path}: no model artifact (expected {path / MODEL_FILES['fp32']}); run `make export`")
        return path
    candidates = sorted(Path(root).glob(f"*/{MODEL_FILES['fp32']}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ArtifactError(f"no model artifact under {root}/; run `make export` or pass --model")
    return candidates[-1].parent


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; move it into place only if the block succeeds.

    A failed or interrupted write leaves `final` as it was (absent, or the previous good file).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; the result should look like any other file
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
