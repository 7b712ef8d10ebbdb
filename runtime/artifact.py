"""Artifact folders and the metadata that makes each file in them self-describing.

Every ONNX file carries one `metadata_props` entry, `deit`, holding `ArtifactMeta` as JSON; engines
and reports carry the same fields in JSON sidecars. A later stage reads these instead of
re-deriving what an earlier one knew. A folder is an artifact only once the export finished and
wrote its report (`export.json`), so a half-written export is never picked up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime import __version__
from runtime.errors import ModelError, UsageError
from runtime.preprocess import Preprocessing

METADATA_KEY = "deit"
META_SCHEMA = 1
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
# int8 built for ONNX Runtime CPU speed (model.int8.onnx is the TensorRT Q/DQ one); ort-cpu prefers it.
INT8_CPU_FILE = "model.int8-cpu.onnx"
# ONNX Runtime's own fused-op graph (com.microsoft Attention, SkipLayerNormalization, BiasGelu):
# what its CUDA provider runs fastest. The standard-op files above stay the input for TensorRT.
ORT_FUSED_FILES = {"fp32": "model.ort.onnx", "fp16": "model.ort.fp16.onnx"}
# The same fp16 graph with SkipLayerNormalization in fp16 too (as Optimum's fp16 conversion leaves it), run with
# ONNX Runtime's strict mode (fp32 accumulation inside the op): a benchmark row beside ort-cuda's, so a GPU run
# decides which of the two ort-cuda prefers.
ORT_FP16_SLN_FILE = "model.ort.fp16-sln.onnx"
REPORT_FILE = "export.json"
INPUT_NAME = "pixel_values"  # the one input every exported model takes
SYNTHETIC_WARNING = (
    "WARNING: this model has SYNTHETIC (random) weights: fine for latency and numerics, "
    "but its predictions and labels are meaningless."
)


class ArtifactError(ModelError):
    """A missing or unreadable artifact; the message names the file."""


@dataclass
class ArtifactMeta:
    """What a model file is: where it came from, how to feed it, what it outputs."""

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
    writer: str = f"deit-deploy {__version__}"
    schema: int = META_SCHEMA

    @property
    def synthetic(self) -> bool:
        return self.weights == "synthetic"

    @property
    def name(self) -> str:
        return self.checkpoint.rstrip("/").split("/")[-1]

    @property
    def num_labels(self) -> int | None:
        if isinstance(self.id2label, list):
            return len(self.id2label)
        return 1000 if self.id2label == "imagenet-1k" else self.config.get("num_labels")

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        return json.dumps(data, sort_keys=True)

    def copy(self, **changes: Any) -> ArtifactMeta:
        return dataclasses.replace(ArtifactMeta.from_json(self.to_json()), **changes)

    @classmethod
    def from_json(cls, text: str, where: str = "metadata") -> ArtifactMeta:
        """Parse metadata written by this or another version: unknown keys are ignored, a missing
        or malformed one is a one-line ArtifactError naming `where`, the key and the writer."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as err:
            raise ArtifactError(f"{where}: metadata is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{where}: metadata is not a JSON object")
        writer = data.get("writer", "a deit-deploy version before 0.2")
        known = {f.name: f for f in dataclasses.fields(cls)}
        required = [n for n, f in known.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ArtifactError(f"{where}: metadata lacks {', '.join(missing)} (written by {writer}); re-export it")
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
            return cls(**kwargs)
        except (TypeError, KeyError, ValueError) as err:
            raise ArtifactError(f"{where}: malformed metadata ({err}; written by {writer}); re-export it") from None


def read_onnx_meta(path: str | Path) -> ArtifactMeta:
    """The metadata of an ONNX file this project wrote (weights are not loaded), once the file is known
    to be the bytes its export recorded and to take and give what the runtime feeds and reads."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file")
    check_recorded_sha256(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and friends
        raise ArtifactError(f"{path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ArtifactError(f"{path}: ONNX file has no '{METADATA_KEY}' metadata; export it with `python -m export`")
    meta = ArtifactMeta.from_json(props[METADATA_KEY], str(path))
    weights = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or not set(meta.output_names) <= set(outputs):
        raise ArtifactError(f"{path}: the model takes {inputs} and gives {outputs}; the runtime feeds ['{INPUT_NAME}'] "
                            f"and reads {meta.output_names} (export it with `python -m export`)")
    return meta


def check_recorded_sha256(path: Path) -> None:
    """A model file must hold the bytes its export recorded (the sha256 in export.json): a damaged file
    otherwise runs and answers with confidence. Files the report does not list are not checked. Each
    version of a file (path, size, mtime) is hashed once: the result is kept in this process and in
    the user's cache folder."""
    try:
        want = json.loads((path.parent / REPORT_FILE).read_text())["files"][path.name]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no report, or one that records no hash for this file
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deit-deploy" / "verified-sha256.json"
    if _VERIFIED.get(key) == want:
        return
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or known.get(key) != want:
        got = file_sha256(path)
        if got != want:
            raise ArtifactError(f"{path}: contents differ from what the export recorded (sha256 {got[:12]}..., "
                                f"{path.parent / REPORT_FILE} says {want[:12]}...): the file is damaged or was changed; "
                                "export it again")
        known = {k: v for k, v in (known.items() if isinstance(known, dict) else ())} | {key: got}
        try:
            write_json(cache, dict(list(known.items())[-256:]))
        except OSError:
            pass  # a read-only home: hash again next time
    _VERIFIED[key] = want


_VERIFIED: dict[str, str] = {}


def set_onnx_meta(model: Any, meta: ArtifactMeta) -> None:
    """Store `meta` in an in-memory `onnx.ModelProto`, replacing any previous entry."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()


def model_path(artifact_dir: str | Path, precision: str = "fp32") -> Path:
    if precision not in MODEL_FILES:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(MODEL_FILES)}")
    return Path(artifact_dir) / MODEL_FILES[precision]


def is_artifact(folder: Path) -> bool:
    """A finished export: the fp32 model and the export report (written last) are both there."""
    return (folder / MODEL_FILES["fp32"]).is_file() and (folder / REPORT_FILE).is_file()


def find_model(model: str | Path | None, root: str | Path = "artifacts") -> tuple[Path, Path | None]:
    """(artifact folder, the model file the user named or None) for a `--model` argument.

    None means the newest finished artifact under `root`; hidden folders (an export's staging
    folder) and folders without an export report are never candidates.
    """
    if model is None:
        found = [p.parent for p in Path(root).glob(f"*/{MODEL_FILES['fp32']}") if not p.parent.name.startswith(".")]
        candidates = sorted((d for d in found if is_artifact(d)), key=lambda d: (d / REPORT_FILE).stat().st_mtime)
        if not candidates:
            raise ArtifactError(f"no finished model artifact under {root}/; run `make export` or pass --model")
        return candidates[-1], None
    path = Path(model)
    if path.is_file():
        if path.suffix not in (".onnx", ".plan"):
            raise UsageError(f"{path}: not a model file (.onnx or .plan) or artifact folder")
        return path.parent, path
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact folder or model file; run `make export`")
    if not (path / MODEL_FILES["fp32"]).is_file():
        raise ArtifactError(f"{path}: no model artifact (expected {path / MODEL_FILES['fp32']}); run `make export`")
    if not (path / REPORT_FILE).is_file():
        raise ArtifactError(f"{path}: unfinished export (no {REPORT_FILE}); run `make export` again")
    return path, None


def find_artifact(model: str | Path | None, root: str | Path = "artifacts") -> Path:
    """An artifact folder, for stages that read the whole folder (a path to its model.onnx names it too)."""
    folder, file = find_model(model, root)
    if file is not None and file.name != MODEL_FILES["fp32"]:
        raise UsageError(f"{file}: this command reads a whole artifact folder; pass {folder}")
    return folder


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def write_hf_configs(folder: Path, meta: ArtifactMeta) -> list[str]:
    """config.json and preprocessor_config.json, so transformers/Optimum tools can open the folder."""
    if meta.config:
        write_json(folder / "config.json", meta.config)
    write_json(folder / "preprocessor_config.json", meta.preprocessing.to_hf_config())
    return ["config.json", "preprocessor_config.json"] if meta.config else ["preprocessor_config.json"]
