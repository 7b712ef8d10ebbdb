"""`python -m export.triton`: a model repository for NVIDIA Triton Inference Server on a GPU machine.

    python -m export.triton --model artifacts/deit-base-distilled-patch16-224 --out model_repository/
    python -m export.triton --model artifacts/deit-base-distilled-patch16-224 --out model_repository/ --max-batch-size 16

One Triton model per runtime file the artifact holds: ONNX Runtime (platform `onnxruntime_onnx`, the CUDA
execution provider on a KIND_GPU instance) on each ONNX Runtime graph (`model.ort.fp16.onnx`,
`model.ort.onnx`), TensorRT (`tensorrt_plan`) on each engine (`model.fp16.plan`, `model.int8.plan`, whose
sidecar caps the batch size at the engine's profile). Each gets `config.pbtxt` (inputs and outputs read
from the file itself, max_batch_size, dynamic batching with preferred sizes, instance group, version
policy), `labels.txt` for Triton's classification extension, and `1/model.onnx` or `1/model.plan`
(a hard link to the artifact's file where the file system allows). The tensor names are the ones
`runtime.serve` uses (`pixel_values` in, `logits` out), so a `tritonclient` program moves between them; a
TensorRT model also declares every other I/O tensor its engine has (a distilled DeiT's `cls_logits` and
`distillation_logits`), because Triton's TensorRT backend refuses a config that leaves one out. Each
config.pbtxt starts with comments saying which Triton can load it (ONNX Runtime version for the opset, the
exact TensorRT version of a plan), and the command prints the same.
Every config is checked against Triton's own protobuf schema (from `tritonclient`) when it is installed.

It writes only inside --out, and replaces only model folders it wrote itself: each carries a marker file
with the sha256 of its config.pbtxt, and a folder without it, or whose config.pbtxt was edited since, is
kept and the run stops (exit 2) unless --force.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from runtime.artifact import ORT_FUSED_FILES, ArtifactError, ArtifactMeta, find_model, read_onnx_meta
from runtime.backends.trt import ENGINE_FILES, EngineSidecar, read_sidecar
from runtime.errors import ArgumentParser, UsageError, doc_parser, run_cli
from runtime.labels import resolve_labels
from runtime.serve.protocol import io_config
from runtime.paths import check_output_dir

PROG = "triton"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
MARKER_FILE = ".deit-deploy-model.json"  # what says "this command wrote this folder" (Triton ignores it)
ENUM_FIELDS = {"data_type", "kind"}  # protobuf enums: written bare, not quoted
# ONNX TensorProto element types -> Triton's
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32"}
# numpy dtype names (an engine sidecar's) -> Triton's
NUMPY_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                   "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
# A Triton model name that is one plain folder name: no separators, quotes, leading dot or spaces.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# ONNX Runtime release that first runs each default-domain opset (ORT's versioning table); the exports use 23.
ORT_FOR_OPSET = {23: "1.23", 24: "1.24"}


@dataclass(frozen=True)
class RepoModel:
    name: str
    platform: str  # onnxruntime_onnx | tensorrt_plan
    source: Path
    target: str  # Triton's default file name for the platform
    max_batch: int
    onnx: Path  # the ONNX file whose inputs and outputs the model has (a plan's source)
    engine: EngineSidecar | None = None  # a plan's sidecar: its I/O tensors and TensorRT version


def plan_models(artifact_dir: Path, name: str, max_batch: int) -> list[RepoModel]:
    """The Triton models this artifact yields, fp16 first; an artifact with none is a ModelError."""
    models = []
    for precision in ("fp16", "fp32"):
        onnx_file = artifact_dir / ORT_FUSED_FILES[precision]
        if onnx_file.is_file():
            models.append(RepoModel(f"{name}-ort-{precision}", "onnxruntime_onnx", onnx_file, "model.onnx", max_batch, onnx_file))
    for precision, plan_name in ENGINE_FILES.items():
        plan = artifact_dir / plan_name
        if plan.is_file():
            sidecar = read_sidecar(plan)
            models.append(RepoModel(f"{name}-trt-{precision}", "tensorrt_plan", plan, "model.plan",
                                    min(max_batch, sidecar.max_batch), artifact_dir / sidecar.source_onnx, sidecar))
    if not models:
        raise ArtifactError(f"{artifact_dir}: no file Triton can run ({', '.join(ORT_FUSED_FILES.values())} or "
                            f"{', '.join(ENGINE_FILES.values())}); re-export with `python -m export`, or `make engines`")
    return models


def _io_types(model: RepoModel) -> dict[str, str]:
    """Tensor name -> Triton datatype: the engine's I/O for a plan, else the ONNX graph's inputs and outputs."""
    if model.engine is not None:
        return {t.name: NUMPY_TO_TRITON.get(t.dtype, "TYPE_FP32") for t in model.engine.io}
    import onnx

    graph = onnx.load(str(model.onnx), load_external_data=False).graph
    return {v.name: ONNX_TO_TRITON.get(v.type.tensor_type.elem_type, "TYPE_FP32") for v in [*graph.input, *graph.output]}


def _onnx_opset(onnx_file: Path) -> int:
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def requirements(model: RepoModel) -> list[str]:
    """Which Triton can load this model, one sentence each (the config's comments and the command's output)."""
    if model.engine is not None:
        gpu = model.engine.gpu
        return [f"a TensorRT plan: loads only in a Triton whose TensorRT is {model.engine.tensorrt_version} (the version "
                f"that built it), on a GPU of compute capability {gpu.get('compute_capability')} ({gpu.get('name')}); "
                "otherwise rebuild it there with `make engines`"]
    opset = _onnx_opset(model.onnx)
    ort = ORT_FOR_OPSET.get(opset, f"one that supports opset {opset}")
    return [f"ONNX opset {opset}: needs a Triton whose onnxruntime backend has ONNX Runtime {ort} or newer",
            "runs on the CUDA execution provider of a KIND_GPU instance"]


def preferred_sizes(max_batch: int) -> list[int]:
    """The batch sizes Triton should aim for: the largest power of two below max_batch, and max_batch itself."""
    sizes = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length())} | {max_batch})
    return sizes[-2:]


def model_config(model: RepoModel, meta: ArtifactMeta, classes: int | None, delay_us: int, instances: int) -> dict[str, Any]:
    """Triton's ModelConfig as a dict (field names of model_config.proto)."""
    io = io_config(meta, classes, LABELS_FILE)
    types = _io_types(model)
    where = model.source if model.engine is not None else model.onnx
    for tensor in [*io["input"], *io["output"]]:
        if tensor["name"] not in types:
            raise ArtifactError(f"{where}: has no tensor {tensor['name']!r} (it has {', '.join(types)}); re-export it")
        tensor["data_type"] = types[tensor["name"]]
    if model.engine is not None:  # Triton's TensorRT backend wants every engine tensor declared
        declared = {t["name"] for t in [*io["input"], *io["output"]]}
        for t in model.engine.io:
            if t.name not in declared:
                io[t.mode].append({"name": t.name, "data_type": types[t.name], "dims": list(t.shape[1:])})
    return {
        "name": model.name, "platform": model.platform, "max_batch_size": model.max_batch,
        "input": io["input"], "output": io["output"],
        "dynamic_batching": {"preferred_batch_size": preferred_sizes(model.max_batch), "max_queue_delay_microseconds": delay_us},
        "instance_group": [{"count": instances, "kind": "KIND_GPU"}],
        "version_policy": {"latest": {"num_versions": 1}},
    }


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a dict of scalars, lists and nested dicts."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            blocks = ",\n".join(f"{pad}  {{\n{to_pbtxt(v, indent + 2)}{pad}  }}" for v in value)
            lines.append(f"{pad}{key} [\n{blocks}\n{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(key, v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(key, value)}")
    return "".join(line + "\n" for line in lines)


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    return text if key in ENUM_FIELDS else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def triton_schema() -> ModuleType | None:
    """Triton's model_config_pb2 from the tritonclient package, or None when it is not installed.

    Loaded from its file: importing `tritonclient.grpc` would need grpcio, which this project does not use.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    if not path.is_file() or module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_config(text: str, schema: ModuleType) -> Any:
    """A config.pbtxt parsed with Triton's schema (a ParseError names the line and field when it does not fit)."""
    from google.protobuf import text_format

    return text_format.Parse(text, schema.ModelConfig())


def _place(source: Path, target: Path) -> None:
    """The model file in the repository: a hard link (no copy of a large file), else a copy."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def check_model_name(name: str) -> str:
    """`name` when it is one plain folder name, else a UsageError: a model name must not lead outside --out."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"--name {name!r}: not a plain model name (letters, digits, '_', '-', '.'; not starting "
                         "with '.' or '-', no '/', quotes or '..')")
    return name


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def foreign_reason(folder: Path) -> str | None:
    """Why an existing model folder is not ours to replace (None: absent, or written by this command and unchanged)."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} exists and is not a model folder this command wrote"
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
        config = (folder / CONFIG_FILE).read_text()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{folder} was not written by python -m export.triton (no marker {MARKER_FILE} or no {CONFIG_FILE})"
    if not isinstance(marker, dict) or marker.get("config_sha256") != _sha256_text(config):
        return f"{folder / CONFIG_FILE} was changed after python -m export.triton wrote it"
    return None


def write_repository(artifact_dir: Path, out: Path, name: str, max_batch: int = 8, delay_us: int = 100,
                     instances: int = 1, force: bool = False) -> list[tuple[Path, list[str]]]:
    """Write one model folder per runtime file into `out`; returns each config file and what Triton it needs.

    A model folder is built beside its final place and swapped in, so an interrupted run leaves the previous
    one whole. Folders this command did not write (or whose config was edited since) are refused, all of them
    checked before anything is written, unless `force`.
    """
    check_model_name(name)
    models = plan_models(artifact_dir, name, max_batch)
    if not force:
        foreign = [reason for m in models if (reason := foreign_reason(out / m.name))]
        if foreign:
            raise UsageError(f"{foreign[0]}; kept as it is (--force replaces it)")
    meta = read_onnx_meta(models[0].onnx)
    classes = meta.num_labels
    labels = resolve_labels(meta.id2label, classes) if classes else None
    schema = triton_schema()
    written = []
    for model in models:
        needs = requirements(model)
        text = "".join(f"# {line}\n" for line in [f"written by python -m export.triton from {model.source.name}", *needs])
        text += to_pbtxt(model_config(model, meta, classes, delay_us, instances))
        if schema is not None:
            parse_config(text, schema)  # what Triton would refuse to load fails here, before anything is replaced
        final = out / model.name
        staging = out / f".{model.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "1").mkdir(parents=True)
        _place(model.source, staging / "1" / model.target)
        (staging / CONFIG_FILE).write_text(text)
        if labels:
            (staging / LABELS_FILE).write_text("".join(label.replace("\n", " ") + "\n" for label in labels))
        (staging / MARKER_FILE).write_text(json.dumps({"written_by": "python -m export.triton",
                                                       "source": str(model.source), "config_sha256": _sha256_text(text)}))
        if final.is_symlink() or final.is_file():
            final.unlink()
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        written.append((final / CONFIG_FILE, needs))
    return written


def build_parser() -> ArgumentParser:
    p = doc_parser("python -m export.triton", __doc__)
    p.add_argument("--model", help="artifact folder (default: the newest under --artifacts)")
    p.add_argument("--artifacts", default="artifacts", help="where to look for the newest artifact")
    p.add_argument("--out", type=Path, default=Path("model_repository"), help="the repository folder (default model_repository)")
    p.add_argument("--name", help="model name prefix (default: the artifact folder's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="Triton's max_batch_size (engines: at most their profile's max)")
    p.add_argument("--max-queue-delay-us", type=int, default=100, help="dynamic batching delay in microseconds (default 100)")
    p.add_argument("--instances", type=int, default=1, help="model instances per GPU (default 1)")
    p.add_argument("--force", action="store_true",
                   help="replace model folders this command did not write, or whose config.pbtxt was edited")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("max_batch_size", "instances"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_queue_delay_us < 0:
        p.error("--max-queue-delay-us must be at least 0")

    def work() -> int:
        artifact, model_file = find_model(args.model, args.artifacts)
        if model_file is not None:
            raise UsageError(f"--model {args.model}: give the artifact folder; every runtime file in it becomes a model")
        check_model_name(args.name if args.name is not None else artifact.name)
        check_output_dir(args.out)
        configs = write_repository(artifact, args.out, args.name or artifact.name, args.max_batch_size,
                                   args.max_queue_delay_us, args.instances, args.force)
        checked = "checked with Triton's schema" if triton_schema() else "not checked: tritonclient is not installed"
        for config, needs in configs:
            print(config.parent)
            for line in needs:
                print(f"{PROG}: {config.parent.name}: {line}", file=sys.stderr)
        print(f"{PROG}: {len(configs)} models in {args.out} ({checked}); serve them with "
              f"tritonserver --model-repository={args.out.resolve()}", file=sys.stderr)
        return 0

    return run_cli(PROG, work, entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
