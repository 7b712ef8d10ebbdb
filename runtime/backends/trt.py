"""TensorRT engines (`model.fp16.plan`, `model.int8.plan`) run through the TensorRT Python runtime.

An engine only runs on the TensorRT version and GPU architecture it was built for, and a wrong or
truncated plan can crash the process inside TensorRT. So every engine has a JSON sidecar written by
`export/engines.py`, and the backend checks it (size, sha256, TensorRT version, compute capability)
before handing the bytes to TensorRT, turning those cases into a one-line "rebuild it" error. The
sidecar also records the sha256 of the ONNX file the engine was built from: an engine whose ONNX has
changed since (re-exported, re-calibrated) is stale and refused, since it would run the old weights
or scales and report the old accuracy.

CUDA goes through `runtime.backends.cudart` (cuda-python, as TensorRT's own samples since 10.14;
pycuda is source-only and needs the CUDA toolkit to install). TensorRT and CUDA are imported lazily.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.artifact import MODEL_FILES, ArtifactError, ArtifactMeta, file_sha256, write_json
from runtime.backends import cudart
from runtime.backends.base import Backend, BackendKind, BackendUnavailable, ModelSource
from runtime.errors import UsageError

if TYPE_CHECKING:  # typed from tensorrt-stubs; imported for real only inside activate()
    import tensorrt as trt

ENGINE_FILES = {"fp16": "model.fp16.plan", "int8": "model.int8.plan"}
# The Q/DQ file the int8 engine is built from: `model.int8.onnx` with fp16, not fp32, as the high-precision type
# (NVIDIA's recipe, ModelOpt's --high_precision_dtype fp16). A strongly typed network keeps every layer without
# Q/DQ (attention, GELU, residual adds) in the graph's own type: from the fp32 Q/DQ file those would run in fp32.
INT8_TRT_FILE = "model.int8-trt.onnx"
# What each engine is built from.
ENGINE_SOURCES = {"fp16": MODEL_FILES["fp16"], "int8": INT8_TRT_FILE}
# 2: the engine's I/O tensors (`io`) are recorded, and source_sha256 is required (format 1 had neither for sure).
SIDECAR_FORMAT = 2
REBUILD = "rebuild it with `make engines`"


class EngineError(ArtifactError):
    """An engine or its sidecar cannot be used here; the message names the file and says to rebuild."""


def engine_path(artifact_dir: str | Path, precision: str) -> Path:
    if precision not in ENGINE_FILES:
        raise ArtifactError(f"no TensorRT engine for precision {precision!r}; choose one of {', '.join(ENGINE_FILES)}")
    return Path(artifact_dir) / ENGINE_FILES[precision]


def engine_source(artifact_dir: str | Path, precision: str) -> Path:
    """The ONNX file the `precision` engine is built from."""
    if precision not in ENGINE_SOURCES:
        raise ArtifactError(f"no TensorRT engine for precision {precision!r}; choose one of {', '.join(ENGINE_SOURCES)}")
    return Path(artifact_dir) / ENGINE_SOURCES[precision]


def sidecar_path(plan: str | Path) -> Path:
    return Path(f"{plan}.json")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def rebuild_command(plan: str | Path, precision: str | None = None) -> str:
    """The exact command that rebuilds `plan` (its precision read from the file name when not given)."""
    precision = precision or next((p for p, name in ENGINE_FILES.items() if Path(plan).name == name), None)
    suffix = f" --precision {precision}" if precision else ""
    return f"python -m export.engines --model {Path(plan).parent}{suffix}"


@dataclass(frozen=True)
class EngineTensor:
    """One I/O tensor of an engine as TensorRT reports it: Triton's config must declare every one of them."""

    name: str
    mode: str  # "input" | "output"
    dtype: str  # numpy's name: float32, float16, int64, ...
    shape: tuple[int, ...]  # -1 for the dynamic batch axis


@dataclass(frozen=True)
class EngineSidecar:
    """`model.<precision>.plan.json`: what `export.engines` knew when it built the engine, and what the
    `trt` backend and `export.triton` need before they touch the plan. One schema, written and read here,
    so the writer and the readers cannot drift apart."""

    engine: str
    engine_bytes: int
    engine_sha256: str
    source_onnx: str
    source_sha256: str  # the ONNX file's hash at build time: a changed ONNX means a stale engine
    precision: str
    tensorrt_version: str
    gpu: dict[str, Any]  # cudart.GpuInfo.to_dict()
    profile: dict[str, Any]  # {"input": name, "min"/"opt"/"max": [b, 3, h, w]}
    io: tuple[EngineTensor, ...]
    artifact_meta: dict[str, Any]
    cuda: dict[str, int] = field(default_factory=dict)
    builder: dict[str, Any] = field(default_factory=dict)
    build_time_s: float = 0.0
    built_at: str = ""
    attention: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    format: int = SIDECAR_FORMAT

    @property
    def max_batch(self) -> int:
        return int(self.profile["max"][0])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["io"] = [asdict(t) | {"shape": list(t.shape)} for t in self.io]
        data["warnings"] = list(self.warnings)
        return data

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> EngineSidecar:
        """EngineError naming the file and the rebuild command for anything that is not this format."""
        plan = Path(str(path).removesuffix(".json"))
        rebuild = f"rebuild it with `{rebuild_command(plan)}`"
        if not isinstance(data, dict):
            raise EngineError(f"{path}: not an engine sidecar of this project; {rebuild}")
        if data.get("format") != SIDECAR_FORMAT:
            raise EngineError(f"{path}: sidecar format {data.get('format')} is not {SIDECAR_FORMAT}; {rebuild}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if not data.get(k)]
        if missing:
            raise EngineError(f"{path}: not an engine sidecar of this project (missing {', '.join(missing)}); {rebuild}")
        known = {f.name for f in fields(cls)}
        try:
            io = tuple(EngineTensor(str(t["name"]), str(t["mode"]), str(t["dtype"]), tuple(int(d) for d in t["shape"]))
                       for t in data["io"])
            return cls(**{k: v for k, v in data.items() if k in known} | {"io": io, "warnings": tuple(data.get("warnings", ()))})
        except (KeyError, TypeError, ValueError) as err:
            raise EngineError(f"{path}: malformed engine sidecar ({type(err).__name__}: {err}); {rebuild}") from None


def make_sidecar(plan: Path, onnx_path: Path, precision: str, *, tensorrt_version: str, gpu: cudart.GpuInfo,
                 profile: dict[str, Any], io: tuple[EngineTensor, ...], meta: ArtifactMeta, **extra: Any) -> EngineSidecar:
    """The sidecar of a plan that has just been written from `onnx_path`: sizes and hashes are taken here."""
    return EngineSidecar(
        engine=plan.name, engine_bytes=plan.stat().st_size, engine_sha256=file_sha256(plan),
        source_onnx=onnx_path.name, source_sha256=file_sha256(onnx_path), precision=precision,
        tensorrt_version=tensorrt_version, gpu=gpu.to_dict(), profile=profile, io=io,
        artifact_meta=json.loads(meta.to_json()), **extra)


def write_sidecar(plan: Path, sidecar: EngineSidecar) -> Path:
    path = sidecar_path(plan)
    write_json(path, sidecar.to_dict())
    return path


def require_tensorrt() -> str:
    """The installed TensorRT version, or BackendUnavailable saying how to get TensorRT.

    Callers then `import tensorrt` themselves, so that the checker types it from `tensorrt-stubs`.
    Those stubs make `import tensorrt` succeed with an empty namespace package, so a missing
    `__version__` also means "not installed".
    """
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed; {cudart.TENSORRT_HINT}") from None
    version = getattr(tensorrt, "__version__", None)
    if not isinstance(version, str):
        raise BackendUnavailable(f"TensorRT is not installed (only its type stubs are); {cudart.TENSORRT_HINT}")
    return version


def tensorrt_unavailable_reason() -> str | None:
    try:
        require_tensorrt()
    except BackendUnavailable as err:
        return str(err)
    return None


def read_sidecar(plan: str | Path) -> EngineSidecar:
    path = sidecar_path(plan)
    rebuild = f"rebuild it with `{rebuild_command(plan)}`"
    if not path.is_file():
        raise EngineError(f"{path}: engine sidecar is missing; {rebuild}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EngineError(f"{path}: unreadable engine sidecar ({err}); {rebuild}") from None
    return EngineSidecar.from_dict(data, path)


def stale_reason(plan: str | Path, sidecar: EngineSidecar) -> str | None:
    """Why the engine no longer matches the ONNX file it was built from (None: it does, or that file is gone)."""
    onnx_path = Path(plan).parent / sidecar.source_onnx
    if not onnx_path.is_file():
        return None
    stat = onnx_path.stat()
    if _sha256_of(str(onnx_path), stat.st_size, stat.st_mtime_ns) == sidecar.source_sha256:
        return None
    return (f"{plan} is stale: {onnx_path.name} changed after the engine was built from it; rebuild it with "
            f"`{rebuild_command(plan, sidecar.precision)}`")


@lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, hashed once per (size, mtime): `auto` and the backend both check the same ONNX file."""
    return file_sha256(Path(path))


def check_engine(plan: str | Path, sidecar: EngineSidecar, trt_version: str, gpu: cudart.GpuInfo) -> list[str]:
    """Refuse (EngineError) an engine TensorRT must not deserialize here; returns warnings for lesser mismatches.

    TensorRT engines are specific to the TensorRT version and the GPU architecture; a truncated plan
    is caught by its size and hash before TensorRT reads it.
    """
    plan = Path(plan)
    if not plan.is_file():
        raise EngineError(f"{plan}: no such engine file; build it with `make engines`")
    size = plan.stat().st_size
    if size != sidecar.engine_bytes:
        raise EngineError(f"{plan}: truncated or replaced ({size} bytes, its sidecar says {sidecar.engine_bytes}); {REBUILD}")
    if file_sha256(plan) != sidecar.engine_sha256:
        raise EngineError(f"{plan}: contents differ from what its sidecar recorded (sha256 mismatch); {REBUILD}")
    if sidecar.tensorrt_version != trt_version:
        raise EngineError(f"{plan}: built with TensorRT {sidecar.tensorrt_version}, this machine has "
                          f"TensorRT {trt_version}; {REBUILD}")
    built = sidecar.gpu
    if built.get("compute_capability") != gpu.compute_capability:
        raise EngineError(f"{plan}: built for {built.get('name')} (compute capability {built.get('compute_capability')}), "
                          f"this GPU is {gpu.name} ({gpu.compute_capability}); {REBUILD}")
    if built.get("name") != gpu.name:
        return [f"{plan}: built on {built.get('name')}, running on {gpu.name} (same compute capability); "
                "rebuild for best speed"]
    return []


class TensorRTKind(BackendKind):
    """The registry entry `trt`: engines and their sidecars in an artifact folder."""

    name = "trt"
    device = "cuda"
    default_precision = "fp16"
    precisions = ("fp16", "int8")
    suffix = ".plan"
    missing_hint = "; build it with `make engines`"

    def __init__(self, cuda_graphs: bool = True) -> None:
        self.cuda_graphs = cuda_graphs

    def unavailable_reason(self) -> str | None:
        return tensorrt_unavailable_reason() or cudart.gpu_unavailable_reason()

    def model_file_for(self, artifact_dir: Path, precision: str) -> Path:
        return engine_path(artifact_dir, precision)

    def needed_files(self, artifact_dir: Path, precision: str) -> tuple[Path, ...]:
        plan = self.model_file_for(artifact_dir, precision)
        return plan, sidecar_path(plan)

    def files_unusable(self, artifact_dir: Path, precision: str) -> str | None:
        plan = self.model_file_for(artifact_dir, precision)
        try:
            return stale_reason(plan, read_sidecar(plan))
        except EngineError as err:
            return str(err)

    def read_meta(self, file: Path) -> ArtifactMeta:
        """The metadata its sidecar carries; a stale engine is refused here, before anything runs."""
        sidecar = read_sidecar(file)
        stale = stale_reason(file, sidecar)
        if stale:
            raise EngineError(stale)
        return ArtifactMeta.from_json(json.dumps(sidecar.artifact_meta), str(sidecar_path(file)))

    def open_file(self, file: Path, artifact_dir: Path, asked: str | None) -> tuple[str, ArtifactMeta]:
        if file.suffix != self.suffix:
            raise UsageError(f"{file}: the trt backend runs TensorRT engines (.plan files built by "
                             "`make engines`), not ONNX files; use --backend ort-trt for ONNX on TensorRT")
        have = read_sidecar(file).precision
        if asked is not None and asked != have:
            raise UsageError(f"{file} is a {have} engine, not {asked}")
        return have, self.read_meta(file)

    def backend(self, source: ModelSource, *, max_batch: int = 8, threads: int | None = None) -> TensorRTBackend:
        return TensorRTBackend(source, self, max_batch=max_batch, threads=threads)


class TensorRTBackend(Backend):
    """Device buffers sized once for the largest batch, page-locked host buffers, one stream, and one
    execution context per batch size.

    Each batch size gets its own context, whose input shape is set once: TensorRT does shape-dependent setup
    on the first enqueue after a shape change, in the context's own state, and a CUDA graph captured on a
    context replays against that state. With one context switched between shapes, replaying batch n's graph
    after batch m ran would use m's state (TensorRT's guidance: one context per captured shape). All contexts
    share the I/O buffers (they run one at a time on the one stream); each has its own activation memory.
    With `cuda_graphs` (the kind's setting, default on) each context's enqueue is captured once into a CUDA
    graph and replayed, which removes per-layer launch overhead from small batches.
    """

    clock = "cuda-events"

    def __init__(self, source: ModelSource, kind: TensorRTKind, **kwargs: Any) -> None:
        super().__init__(source, kind, **kwargs)
        self.cuda_graphs = kind.cuda_graphs
        self.warnings: list[str] = []
        self.graph_error: str | None = None  # why graphs were turned off, if they were
        self._reset()

    def _reset(self) -> None:
        self._trt_runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._contexts: dict[int, trt.IExecutionContext] = {}  # batch size -> its context (shape set once)
        self._stream: Any = None
        self._device: dict[str, int] = {}
        self._pinned: dict[str, tuple[int, np.ndarray]] = {}
        self._graphs: dict[int, Any] = {}
        self.output_names: list[str] = []

    def activate(self) -> None:
        try:
            self._activate()
        except BaseException:
            self.deactivate()  # __exit__ does not run when __enter__ fails
            raise

    def _activate(self) -> None:
        require_tensorrt()
        import tensorrt as trt

        sidecar = read_sidecar(self.model_file)
        self.warnings = check_engine(self.model_file, sidecar, trt.__version__, cudart.gpu_info())
        runtime = self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.model_file.read_bytes())
        if engine is None:
            raise EngineError(f"{self.model_file}: TensorRT {trt.__version__} could not deserialize it; {REBUILD}")
        self._engine = engine
        self._stream = cudart.stream_create()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [self.input.name]:
            raise EngineError(f"{self.model_file}: engine inputs {inputs}, expected ['{self.input.name}']; {REBUILD}")
        profile_max = engine.get_tensor_profile_shape(self.input.name, 0)[2]
        self.max_batch = min(self.max_batch, int(profile_max[0]))
        self.output_names = [n for n in names if n not in inputs]
        largest = self._new_context(self.max_batch)  # its shapes size the buffers every context shares
        for name in names:
            shape = largest.get_tensor_shape(name)
            dims = tuple(int(shape[i]) for i in range(len(shape)))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            self._pinned[name] = cudart.pinned_empty(dims, dtype)
            self._device[name] = cudart.device_alloc(self._pinned[name][1].nbytes)
        self._contexts[self.max_batch] = self._bind(largest)

    def _new_context(self, n: int) -> trt.IExecutionContext:
        if self._engine is None:
            raise RuntimeError(f"backend {self.name!r} used outside its `with` block")
        context = self._engine.create_execution_context()
        if context is None:
            raise EngineError(f"{self.model_file}: TensorRT could not create an execution context for batch {n} "
                              "(out of GPU memory?)")
        if not context.set_input_shape(self.input.name, (n, *self.input.shape[1:])):
            raise EngineError(f"{self.model_file}: TensorRT refused batch size {n} (engine profile max {self.max_batch})")
        return context

    def _bind(self, context: trt.IExecutionContext) -> trt.IExecutionContext:
        for name, ptr in self._device.items():
            if not context.set_tensor_address(name, ptr):
                raise EngineError(f"{self.model_file}: TensorRT refused the buffer for tensor {name!r}")
        return context

    def _context(self, n: int) -> trt.IExecutionContext:
        """Batch `n`'s own context, made (shape set, buffers bound) the first time `n` runs."""
        if n not in self._contexts:
            self._contexts[n] = self._bind(self._new_context(n))
        return self._contexts[n]

    def _execute(self, n: int) -> None:
        """Enqueue the engine for batch `n` on the stream: a CUDA graph replay when one is captured."""
        context = self._context(n)
        if self.cuda_graphs and n not in self._graphs:
            self._capture(n, context)
        if n in self._graphs:
            cudart.graph_launch(self._graphs[n], self._stream)
        elif not context.execute_async_v3(cudart.stream_handle(self._stream)):
            raise EngineError(f"{self.model_file}: TensorRT execute_async_v3 failed at batch {n}")

    def _capture(self, n: int, context: trt.IExecutionContext) -> None:
        # TensorRT does shape-dependent setup on the first enqueue after a shape change; that must
        # happen outside the capture.
        if not context.execute_async_v3(cudart.stream_handle(self._stream)):
            raise EngineError(f"{self.model_file}: TensorRT execute_async_v3 failed at batch {n}")
        cudart.stream_synchronize(self._stream)
        try:
            cudart.capture_begin(self._stream)
            ok = context.execute_async_v3(cudart.stream_handle(self._stream))
            graph = cudart.capture_end(self._stream)
        except cudart.CudaError as err:
            self.cuda_graphs, self.graph_error = False, f"CUDA graph capture failed, running without graphs ({err})"
            return
        if not ok:
            cudart.graph_destroy(graph)
            raise EngineError(f"{self.model_file}: TensorRT execute_async_v3 failed during CUDA graph capture")
        self._graphs[n] = graph

    def _copy_in(self, pixel_values: np.ndarray) -> int:
        """Enqueue the batch's copy into the device input buffer (through pinned memory); returns the batch size."""
        n = len(pixel_values)
        in_ptr, in_host = self._pinned[self.input.name]
        np.copyto(in_host[:n], pixel_values)
        cudart.copy_to_device(self._device[self.input.name], in_ptr, in_host[:n].nbytes, self._stream)
        return n

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        n = self._copy_in(pixel_values)
        self._execute(n)
        for name in self.output_names:
            ptr, host = self._pinned[name]
            cudart.copy_to_host(ptr, self._device[name], host[:n].nbytes, self._stream)
        cudart.stream_synchronize(self._stream)
        return {name: self._pinned[name][1][:n].astype(np.float32) for name in self.output_names}

    def time_runs(self, pixel_values: np.ndarray, iterations: int) -> list[float]:
        """GPU milliseconds per execution on a device-resident input, from CUDA events: the input is copied in
        once, before the events, as every other CUDA-event row does; `run` (the with-copies column) adds the copies."""
        n = self._copy_in(pixel_values)
        self._execute(n)  # captures this batch size's graph outside the timed runs
        cudart.stream_synchronize(self._stream)
        return cudart.time_on_stream(self._stream, lambda: self._execute(n), iterations)

    def deactivate(self) -> None:
        if self._stream is not None:
            cudart.stream_synchronize(self._stream)
        for graph in self._graphs.values():
            cudart.graph_destroy(graph)
        self._graphs.clear()
        self._contexts.clear()  # before the buffers they point at are freed
        for ptr in self._device.values():
            cudart.device_free(ptr)
        for ptr, _ in self._pinned.values():
            cudart.pinned_free(ptr)
        if self._stream is not None:
            cudart.stream_destroy(self._stream)
        self._reset()


TRT = TensorRTKind()
