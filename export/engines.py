"""ONNX -> TensorRT engines: artifacts/<name>/model.fp16.plan and model.int8.plan, each with a JSON sidecar.

One code path for TensorRT 10.x and 11.x: a STRONGLY_TYPED network, no precision builder flags and no
calibrators (TensorRT 11 removed them). Precision comes from the ONNX file itself: `model.fp16.onnx`
carries fp16 weights and casts, `model.int8.onnx` explicit Q/DQ nodes. TensorRT parses the standard
ONNX `Attention` op from 10.14; older TensorRT builds from an `--attention decomposed` export.

`python -m export.engines` is the CLI (`make engines`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm  # the type of the bar the progress monitor drives

from runtime.artifact import ArtifactMeta, atomic_path, read_onnx_meta
from runtime.backends import cudart
from runtime.backends.base import BackendUnavailable
from runtime.backends.trt import (
    EngineError,
    EngineSidecar,
    EngineTensor,
    engine_path,
    engine_source,
    make_sidecar,
    require_tensorrt,
    version_tuple,
    write_sidecar,
)
from runtime.console import progress_bar
from runtime.errors import ArgumentParser, Unavailable, run_cli

if TYPE_CHECKING:  # typed from tensorrt-stubs; imported for real only inside the builder
    import tensorrt as trt

FUSED_ATTENTION_MIN = (10, 14)  # first TensorRT whose ONNX parser maps `Attention` to IAttention
# Engine inspector evidence of fused attention: the layer type, or the chosen kernel's name. Layer
# *names* are not used: they repeat ONNX node names, which say "attention" whether fused or not.
ATTENTION_TYPE = re.compile(r"attention|mha", re.IGNORECASE)
ATTENTION_KERNEL = re.compile(r"fmha|_mha|mha_|flash", re.IGNORECASE)


@dataclass
class EngineOptions:
    max_batch: int = 8
    opt_batch: int | None = None  # default: max_batch
    workspace_gib: float = 4.0
    optimization_level: int = 3  # TensorRT's default; 5 searches longest
    timing_cache: Path | None = None  # default: <artifact root>/tensorrt-timing.cache
    progress: bool = True


def missing_prerequisites(artifact_dir: Path | None, precisions: tuple[str, ...] = ("fp16", "int8")) -> list[str]:
    """Everything that stops engines being built here, each with how to get it (empty: ready)."""
    missing: list[str] = []
    try:
        require_tensorrt()
    except BackendUnavailable as err:
        missing.append(str(err))
    reason = cudart.gpu_unavailable_reason()
    if reason:
        missing.append(reason)
    if artifact_dir is not None and not any(engine_source(artifact_dir, p).is_file() for p in precisions):
        missing.append(f"none of {', '.join(engine_source(artifact_dir, p).name for p in precisions)} in {artifact_dir}; "
                       "run `make export` (and `make calibrate` for int8) first")
    return missing


def plan_engines(artifact_dir: Path, precisions: tuple[str, ...]) -> tuple[list[tuple[str, Path]], list[str]]:
    """Which (precision, source ONNX) pairs can be built now, and a note for each that cannot."""
    todo, notes = [], []
    for precision in precisions:
        onnx_path = engine_source(artifact_dir, precision)
        if onnx_path.is_file():
            todo.append((precision, onnx_path))
        elif precision == "int8":
            notes.append(f"{onnx_path} not found, so no int8 engine: make it with `make calibrate` "
                         f"(python -m calibration --model {artifact_dir} --calib-dir PHOTOS), then run `make engines` again")
        else:
            notes.append(f"{onnx_path} not found, so no {precision} engine: run `make export`")
    return todo, notes


def attention_note(trt_version: str, meta: ArtifactMeta, onnx_path: Path) -> str:
    """Say how attention reaches TensorRT; EngineError when this TensorRT cannot parse the export."""
    old = version_tuple(trt_version)[:2] < FUSED_ATTENTION_MIN
    if meta.attention == "fused" and old:
        synthetic = " --weights synthetic" if meta.synthetic else ""
        raise EngineError(
            f"{onnx_path}: TensorRT {trt_version} cannot parse the ONNX Attention op (needs 10.14+); re-export with "
            f"`python -m export --model {meta.checkpoint}{synthetic} --attention decomposed`, then `make engines`")
    if meta.attention == "fused":
        return "ONNX Attention op -> TensorRT IAttention (TensorRT 10.14+)"
    if old:
        return (f"built from the --attention decomposed export because TensorRT {trt_version} < 10.14 has no ONNX "
                "Attention support; TensorRT fuses MatMul-Softmax-MatMul itself when it can")
    return "decomposed MatMul-Softmax-MatMul export (this TensorRT could also take the default fused export)"


def count_fused_attention(engine_information: str) -> dict[str, Any]:
    """Fused attention layers seen in the engine inspector's JSON (built with DETAILED verbosity)."""
    layers = json.loads(engine_information).get("Layers", [])
    types: Counter[str] = Counter()
    fused = 0
    for layer in layers:
        if not isinstance(layer, dict):  # LAYER_NAMES_ONLY verbosity: names only, nothing to judge by
            continue
        layer_type = str(layer.get("LayerType", ""))
        types[layer_type] += 1
        if ATTENTION_TYPE.search(layer_type) or ATTENTION_KERNEL.search(str(layer.get("TacticName", ""))):
            fused += 1
    return {"fused_attention_layers": fused, "layers": len(layers), "layer_types": dict(types)}


def network_flags() -> int:
    """STRONGLY_TYPED: required for fp16/Q-DQ precision from the ONNX on 10.x, always on in 11.x."""
    import tensorrt as trt

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        raise EngineError(f"TensorRT {trt.__version__} has no strongly typed networks; install TensorRT 10.14+ "
                          "(`make install-gpu`)")
    return 1 << int(flag)


def _progress_monitor(desc: str) -> tuple[Any, tqdm]:
    """A TensorRT IProgressMonitor driving one tqdm bar over the top-level build phases."""
    import tensorrt as trt

    bar = progress_bar(desc=desc, unit="step")
    lock = threading.Lock()  # TensorRT may call from several threads

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.top: str | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with lock:
                if parent_phase is None:
                    self.top = phase_name
                    bar.reset(total=num_steps)
                bar.set_postfix_str(phase_name[:40])

        def step_complete(self, phase_name: str, step: int) -> bool:
            with lock:
                if phase_name == self.top:
                    bar.update(1)
            return True

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor(), bar


def engine_io(engine: trt.ICudaEngine) -> tuple[EngineTensor, ...]:
    """Every I/O tensor of a built engine (the dynamic batch axis as -1), in the engine's order."""
    import tensorrt as trt

    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = engine.get_tensor_shape(name)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        tensors.append(EngineTensor(name, mode, dtype, tuple(int(shape[d]) for d in range(len(shape)))))
    return tuple(tensors)


def build_engine(onnx_path: Path, plan: Path, precision: str, opts: EngineOptions) -> EngineSidecar:
    """Build one engine from `onnx_path` into `plan` and write its sidecar; returns the sidecar.

    The plan and sidecar are written atomically, so a failed build leaves the previous engine as it was.
    """
    require_tensorrt()
    import tensorrt as trt

    meta = read_onnx_meta(onnx_path)
    note = attention_note(trt.__version__, meta, onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it ({errors})")

    config = builder.create_builder_config()
    workspace = int(opts.workspace_gib * 2**30)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.builder_optimization_level = opts.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then reports layer types
    input_name = network.get_input(0).name
    h, w = meta.preprocessing.input_size
    batches = {"min": 1, "opt": opts.opt_batch or opts.max_batch, "max": opts.max_batch}
    shapes = {k: [b, 3, h, w] for k, b in batches.items()}
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    config.add_optimization_profile(profile)

    cache_file = opts.timing_cache or plan.parent.parent / "tensorrt-timing.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    cache_reused = cache_file.is_file() and config.set_timing_cache(cache, False)
    if not cache_reused:  # absent, or from another TensorRT/GPU: start a fresh one
        config.set_timing_cache(config.create_timing_cache(b""), False)

    monitor, bar = _progress_monitor(f"engine {plan.name}") if opts.progress else (None, None)
    if monitor is not None:  # TensorRT needs the monitor alive for the whole build: `monitor` keeps it
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if bar is not None:
            bar.close()
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT {trt.__version__} failed to build an engine (see its log above)")

    with atomic_path(cache_file) as tmp:
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(memoryview(serialized))
    inspector = engine.create_engine_inspector()
    attention = count_fused_attention(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    with atomic_path(plan) as tmp:
        tmp.write_bytes(memoryview(serialized))
    warnings = []
    if attention["fused_attention_layers"] == 0:
        warnings.append(f"{plan}: TensorRT fused no attention layer (engine inspector shows none of "
                        f"{meta.num_layers}); attention runs as separate MatMul/Softmax kernels, expect it slower")
    sidecar = make_sidecar(
        plan, onnx_path, precision, tensorrt_version=trt.__version__, gpu=cudart.gpu_info(),
        profile={"input": input_name, **shapes}, io=engine_io(engine), meta=meta, cuda=cudart.versions(),
        builder={"strongly_typed": True, "optimization_level": opts.optimization_level,
                 "workspace_bytes": workspace, "timing_cache": str(cache_file), "timing_cache_reused": cache_reused},
        build_time_s=round(build_s, 2), built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        attention={"onnx": meta.attention, "note": note, "expected_layers": meta.num_layers, **attention},
        warnings=tuple(warnings))
    write_sidecar(plan, sidecar)
    return sidecar


def build_engines(artifact_dir: Path, precisions: tuple[str, ...] = ("fp16", "int8"),
                  opts: EngineOptions | None = None) -> dict[str, Any]:
    """Build every engine whose source ONNX exists; returns sidecars per precision and notes on the rest."""
    opts = opts or EngineOptions()
    todo, notes = plan_engines(artifact_dir, precisions)
    sidecars = {p: build_engine(onnx_path, engine_path(artifact_dir, p), p, opts) for p, onnx_path in todo}
    return {"artifact_dir": str(artifact_dir), "engines": sidecars, "notes": notes}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m export.engines", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", help="artifact folder (default: the newest under artifacts/)")
    p.add_argument("--precision", default="fp16,int8", help="comma-separated: fp16,int8 (default both)")
    p.add_argument("--max-batch", type=int, default=8, help="optimization profile max (and opt) batch, default 8")
    p.add_argument("--opt-batch", type=int, help="batch size TensorRT tunes for (default: --max-batch)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit (default 4)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder optimization level 0-5 (default 3)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file (default: <artifact root>/tensorrt-timing.cache)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    """`make engines`. Exit status (the README's table): 0 built, 2 usage, 5 bad artifact, 6 TensorRT/GPU missing, 7 build failed."""
    import sys

    from runtime.artifact import find_artifact

    p = build_parser()
    args = p.parse_args(argv)
    precisions = tuple(x for x in args.precision.split(",") if x)
    if not precisions or set(precisions) - {"fp16", "int8"}:
        p.error(f"--precision {args.precision}: choose from fp16,int8")
    if not 1 <= (args.opt_batch or args.max_batch) <= args.max_batch <= 256:
        p.error("need 1 <= --opt-batch <= --max-batch <= 256")
    if args.workspace_gib <= 0:
        p.error("--workspace-gib must be positive")

    def work() -> int:
        artifact = find_artifact(args.model)
        missing = missing_prerequisites(artifact, precisions)
        if missing:
            raise Unavailable("cannot build TensorRT engines here: " + "; ".join(missing))
        opts = EngineOptions(max_batch=args.max_batch, opt_batch=args.opt_batch, workspace_gib=args.workspace_gib,
                             optimization_level=args.opt_level, timing_cache=args.timing_cache, progress=args.progress)
        report = build_engines(artifact, precisions, opts)
        for precision, sc in report["engines"].items():
            att = sc.attention
            print(f"{sc.engine}: {precision}, TensorRT {sc.tensorrt_version} on {sc.gpu['name']} "
                  f"(sm {sc.gpu['compute_capability']}), batch {sc.profile['min'][0]}-{sc.max_batch}, "
                  f"{sc.engine_bytes / 2**20:.1f} MiB, built in {sc.build_time_s:.1f} s, "
                  f"fused attention layers {att['fused_attention_layers']}/{att['expected_layers']}")
            print(f"  attention: {att['note']}")
            for warning in sc.warnings:
                print(f"WARNING: {warning}", file=sys.stderr)
        for note in report["notes"]:
            print(f"note: {note}", file=sys.stderr)
        return 0

    return run_cli("engines", work, entry=argv is None)


if __name__ == "__main__":
    raise SystemExit(main())
