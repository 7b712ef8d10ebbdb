"""ONNX Runtime, one backend configured per execution provider: ort-cpu, ort-cuda, ort-trt.

Each registry entry is an `OrtKind` holding an `OrtConfig`: which providers, which artifact file
each precision runs (in order of preference), whether outputs stay on the GPU behind IOBinding and
whether each batch size is captured into a CUDA graph. The entries below are configurations, not
subclasses, so a setting cannot leak from one provider to another.

- ort-cpu runs the standard files, and at int8 prefers `model.int8-cpu.onnx` (ORT's dynamic int8:
  its u8 x s8 kernels are the fast CPU path) over the TensorRT Q/DQ file.
- ort-cuda prefers ONNX Runtime's own fused-op graph (`model.ort.fp16.onnx`: com.microsoft
  Attention, SkipLayerNormalization, BiasGelu), which its CUDA kernels run 2-3x faster than the
  standard `Attention` op; inputs and outputs live on the GPU (IOBinding), and each batch size is
  captured once into a CUDA graph and replayed (`gpu_graph_id`), falling back to plain runs, with a
  note, when capture is impossible.
- ort-trt gets the standard-op files (TensorRT parses the ONNX `Attention` op) and, at int8, the
  explicit Q/DQ file TensorRT needs (its fp16 high-precision version, `model.int8-trt.onnx`, when present). ORT's TensorRT provider builds weakly typed networks (it has no
  strongly typed option), so the precision is asked for with its flags: `trt_fp16_enable` for fp16,
  `trt_int8_enable` (with fp16 for the layers left unquantized) for the Q/DQ file. Its shared library
  links one TensorRT major (`libnvinfer.so.N`), which nothing puts on the loader path in a pip install:
  the backend reads N from the provider library and loads TensorRT's libraries from pip's
  `tensorrt_libs` before the session is created, or says which TensorRT to install.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.artifact import INT8_CPU_FILE, MODEL_FILES, ORT_FUSED_FILES, ArtifactError, file_sha256
from runtime.backends import cudart
from runtime.backends.base import Backend, BackendKind, BackendUnavailable, ModelSource
from runtime.backends.trt import INT8_TRT_FILE
from runtime.cpuinfo import usable_cores
from runtime.errors import first_line

CPU_EP, CUDA_EP, TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
TRT_WORKSPACE_BYTES = 4 << 30
# What a reader of a CUDA-event table must know about the IOBinding rows (printed under the table).
HOST_SYNC_NOTE = ("ONNX Runtime synchronises the host inside run_with_iobinding and CUDA-graph replay, so the end event "
                  "is recorded after that sync: the time includes the host's return from the run, which the torch and "
                  "trt rows (asynchronous launches) do not")


@dataclass(frozen=True)
class OrtConfig:
    name: str
    device: str  # "cpu" | "cuda"
    providers: tuple[str, ...]  # the provider that must run the model first, fallbacks after
    default_precision: str
    files: dict[str, tuple[str, ...]]  # precision -> artifact files, preferred first
    io_binding: bool = False  # inputs copied once into GPU buffers, outputs bound on the GPU
    cuda_graphs: bool = False  # one captured CUDA graph per batch size
    cuda_options: tuple[tuple[str, str], ...] = ()  # further CUDA provider options (name, value)
    notes: tuple[str, ...] = field(default_factory=tuple)


# What onnxruntime's preload_dlls prints (to stdout, without raising) for a library it needed and could not load.
PRELOAD_FAILURE = re.compile(r"^Failed to load (\S+?):? (.*)$")


def preload_cuda_libraries() -> str | None:
    """Load CUDA and cuDNN before a CUDA session, as onnxruntime-gpu's `preload_dlls` does (from torch or pip's
    `nvidia-*` wheels); None when done, else a note saying why not.

    `make install-gpu` installs onnxruntime-gpu with --no-deps, so those libraries come from torch's wheels; a
    process that has not imported torch would otherwise get the CPU provider with only a log line.
    `preload_dlls` reports a library it cannot load by printing to stdout, where it would land among
    `runtime.infer`'s predictions and in front of `runtime.serve`'s banner: its output is captured, what is
    not a failure goes to stderr, and a failed library is BackendUnavailable naming it (exit status 6).
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return f"onnxruntime {ort.__version__} has no preload_dlls (1.21+): CUDA and cuDNN must be on the library path"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as err:  # a missing library is reported by the provider check that follows
        return f"onnxruntime.preload_dlls() failed ({first_line(err)})"
    failed = []
    for line in printed.getvalue().splitlines():
        match = PRELOAD_FAILURE.match(line.strip())
        if match:
            failed.append(f"{match.group(1)} ({match.group(2)[:160]})")
        elif line.strip() and not line.startswith("Please follow"):
            print(line, file=sys.stderr)
    if failed:
        raise BackendUnavailable(f"onnxruntime {ort.__version__} cannot load the CUDA libraries it needs: "
                                 f"{'; '.join(failed)}; {cudart.INSTALL_HINT}")
    return None


def tensorrt_provider_major(capi_dir: Path | None = None) -> int | None:
    """The TensorRT major that onnxruntime-gpu's TensorRT provider library links (`libnvinfer.so.N`), None when
    this onnxruntime has no such library. Read from the library's bytes (its DT_NEEDED strings), like readelf."""
    if capi_dir is None:
        import onnxruntime as ort

        capi_dir = Path(ort.__file__).parent / "capi"
    library = capi_dir / "libonnxruntime_providers_tensorrt.so"
    if not library.is_file():
        return None
    majors = {int(m) for m in re.findall(rb"libnvinfer\.so\.(\d+)", library.read_bytes())}
    return max(majors) if majors else None


def tensorrt_library_dirs() -> list[Path]:
    """Where pip's TensorRT wheels put libnvinfer: the `tensorrt_libs` package (tensorrt-cu13-libs and kin)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_libs")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def tensorrt_provider_unavailable(capi_dir: Path | None = None, dirs: list[Path] | None = None) -> str | None:
    """Why ORT's TensorRT provider cannot start here (None: the TensorRT major it links is installed), without
    loading anything: ORT lists the provider whenever the library is in the wheel, TensorRT or not."""
    major = tensorrt_provider_major(capi_dir)
    if major is None:
        return f"this onnxruntime has no TensorRT provider library; {cudart.INSTALL_HINT}"
    name = f"libnvinfer.so.{major}"
    dirs = tensorrt_library_dirs() if dirs is None else dirs
    if any((d / name).is_file() for d in dirs) or ctypes.util.find_library("nvinfer") == name:
        return None
    return (f"onnxruntime's TensorRT provider links {name} (TensorRT {major}), which is not installed: "
            f"`pip install --extra-index-url {cudart.NVIDIA_INDEX} 'tensorrt-cu13>={major},<{major + 1}'`; {cudart.TENSORRT_HINT}")


def preload_tensorrt_libraries(major: int, dirs: list[Path] | None = None) -> list[str]:
    """Load TensorRT `major`'s libraries (global symbols) so that ORT's TensorRT provider, which links them by
    soname, finds them; returns the files loaded. BackendUnavailable saying what to install when they are absent."""
    names = [f"libnvinfer.so.{major}", f"libnvinfer_plugin.so.{major}", f"libnvonnxparser.so.{major}"]
    dirs = tensorrt_library_dirs() if dirs is None else dirs
    loaded = []
    for name in names:
        candidates = [str(d / name) for d in dirs if (d / name).is_file()] or [name]  # else the loader's own path
        try:
            ctypes.CDLL(candidates[0], mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            raise BackendUnavailable(
                f"onnxruntime's TensorRT provider links {name}, which cannot be loaded ({first_line(err, 160)}): install "
                f"TensorRT {major} (`pip install --extra-index-url {cudart.NVIDIA_INDEX} 'tensorrt-cu13>={major},"
                f"<{major + 1}'`); {cudart.TENSORRT_HINT}") from None
        loaded.append(candidates[0])
    return loaded


class OrtKind(BackendKind):
    """A registry entry: answers the registry's questions from an OrtConfig and builds OrtBackends."""

    def __init__(self, config: OrtConfig) -> None:
        self.config = config
        self.name, self.device, self.default_precision = config.name, config.device, config.default_precision
        self.precisions = tuple(config.files)

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return f"onnxruntime is not installed; {cudart.INSTALL_HINT}"
        main = self.config.providers[0]
        if main not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no {main} (a CPU-only build?); {cudart.INSTALL_HINT}"
        gpu = cudart.gpu_unavailable_reason() if self.device == "cuda" else None
        return gpu or (tensorrt_provider_unavailable() if main == TRT_EP else None)

    def model_file_for(self, artifact_dir: Path, precision: str) -> Path:
        names = self.config.files.get(precision) or (MODEL_FILES.get(precision, f"model.{precision}.onnx"),)
        for name in names:
            if (Path(artifact_dir) / name).is_file():
                return Path(artifact_dir) / name
        return Path(artifact_dir) / names[-1]

    def backend(self, source: ModelSource, *, max_batch: int = 8, threads: int | None = None) -> OrtBackend:
        return OrtBackend(source, self, max_batch=max_batch, threads=threads)


class OrtBackend(Backend):
    def __init__(self, source: ModelSource, kind: OrtKind, **kwargs: Any) -> None:
        super().__init__(source, kind, **kwargs)
        self.config = config = kind.config
        self.threads = self.threads or usable_cores()
        self.cuda_graphs = config.cuda_graphs
        self.clock = "cuda-events" if config.io_binding else "host"
        self.notes: list[str] = list(config.notes)
        self.session: Any = None
        self.output_names: list[str] = []
        self._bound: dict[int, tuple[Any, Any, list[Any], int]] = {}  # batch -> (IOBinding, input, outputs, graph id)
        self._stream: Any = None
        self.providers_used: list[str] = []  # what the session really got (ORT falls back silently)
        self.tensorrt_libraries: list[str] = []  # ort-trt: the TensorRT libraries loaded for the provider

    def session_options(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads or 0
        opts.inter_op_num_threads = 1
        if self.shares_cores:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only: ORT's warnings about CPU fallbacks are checked below
        return opts

    def provider_list(self) -> list[Any]:
        options = {CPU_EP: {}, CUDA_EP: self._cuda_options(), TRT_EP: self._trt_options()}
        return [(p, options[p]) for p in self.config.providers]

    def _cuda_options(self) -> dict[str, Any]:
        if self.device != "cuda":
            return {}
        opts: dict[str, Any] = {"device_id": 0, "use_tf32": "0" if self.precision == "fp32" else "1"}
        if self.config.io_binding:  # ORT runs on our stream, so CUDA events recorded there time it
            # A blocking stream (default flags): OrtValue.update_inplace copies the input with a synchronous
            # cudaMemcpy on the legacy default stream, which a non-blocking stream would not wait for.
            self._stream = self._stream or cudart.stream_create(blocking=True)
            opts["user_compute_stream"] = str(cudart.stream_handle(self._stream))
        if self.cuda_graphs:
            opts["enable_cuda_graph"] = "1"
        return opts | dict(self.config.cuda_options)

    def _trt_options(self) -> dict[str, Any]:
        if TRT_EP not in self.config.providers:
            return {}
        cache = self.artifact_dir / "ort-trt-cache" / f"{self.precision}-{file_sha256(self.model_file)[:16]}"
        cache.mkdir(parents=True, exist_ok=True)
        h, w = self.input.shape[2:]

        def shape(batch: int) -> str:
            return f"{self.input.name}:{batch}x3x{h}x{w}"

        return self.precision_flags() | {
            "device_id": 0,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_max_workspace_size": TRT_WORKSPACE_BYTES,
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(self.max_batch),
            "trt_profile_max_shapes": shape(self.max_batch),
        }

    def precision_flags(self) -> dict[str, bool]:
        """ORT's TensorRT provider builds weakly typed networks: without these an "fp16" row runs fp32 kernels and
        the Q/DQ file's int8 layers are not allowed. fp16 stays on at int8 for the layers left unquantized."""
        return {"trt_fp16_enable": self.precision in ("fp16", "int8"), "trt_int8_enable": self.precision == "int8"}

    def activate(self) -> None:
        try:
            self.model_file = self.source.load()
            self._open_session()
        except BaseException:
            self.deactivate()
            raise

    def _open_session(self) -> None:
        import onnxruntime as ort

        if self.device == "cuda":
            note = preload_cuda_libraries()
            if note and note not in self.notes:
                self.notes.append(note)
        if TRT_EP in self.config.providers and not self.tensorrt_libraries:
            major = tensorrt_provider_major()
            if major is None:
                raise BackendUnavailable(f"onnxruntime {ort.__version__} has no TensorRT provider library; {cudart.INSTALL_HINT}")
            self.tensorrt_libraries = preload_tensorrt_libraries(major)
        try:
            self.session = ort.InferenceSession(str(self.model_file), sess_options=self.session_options(),
                                                providers=self.provider_list())
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
            if self.cuda_graphs:  # e.g. a node that cannot run on the CUDA provider: no capture possible
                self.cuda_graphs = False
                self.notes.append(f"CUDA graphs off: the session could not be created with them ({first_line(err)})")
                return self._open_session()
            raise ArtifactError(f"{self.model_file}: ONNX Runtime cannot load it ({first_line(err)})") from None
        used = self.session.get_providers()
        if used[0] != self.config.providers[0]:
            # ORT falls back to the next provider, with only a log line, when libraries are missing.
            self.session = None
            raise BackendUnavailable(f"ONNX Runtime could not start {self.config.providers[0]} for {self.model_file} "
                                     f"(providers in use: {', '.join(used)}); {cudart.INSTALL_HINT}")
        self.providers_used = list(used)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        if not self.config.io_binding:
            outputs = self.session.run(self.output_names, {self.input.name: pixel_values})
            return dict(zip(self.output_names, outputs))
        self._launch(pixel_values)
        io = self._bound[len(pixel_values)][0]
        return dict(zip(self.output_names, io.copy_outputs_to_cpu()))

    def _binding(self, batch: int) -> tuple[Any, Any, list[Any], int]:
        """GPU buffers at fixed addresses for one batch size, and its CUDA graph id (ids from 1: 0 is ORT's).

        A captured graph replays the addresses it was captured with, so these buffers live as long as the
        session. Before a new batch size is captured it runs once uncaptured (graph id -1), so its memory
        is allocated and its kernels chosen outside the capture.
        """
        if batch not in self._bound:
            import onnxruntime as ort

            x_gpu = ort.OrtValue.ortvalue_from_shape_and_type(self.input_shape(batch), np.float32, "cuda", 0)
            io = self.session.io_binding()
            io.bind_ortvalue_input(self.input.name, x_gpu)
            outputs = []
            for out in self.session.get_outputs():
                shape = [batch if not isinstance(d, int) else d for d in out.shape]
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
                io.bind_ortvalue_output(out.name, value)
                outputs.append(value)
            if self.cuda_graphs:
                warm = ort.RunOptions()
                warm.add_run_config_entry("gpu_graph_id", "-1")
                self.session.run_with_iobinding(io, warm)
            self._bound[batch] = (io, x_gpu, outputs, len(self._bound) + 1)
        return self._bound[batch]

    def _launch(self, pixel_values: np.ndarray) -> None:
        """Copy the batch into its bound GPU input and run; a CUDA graph per batch size when enabled."""
        io, x_gpu, _, _ = self._binding(len(pixel_values))
        x_gpu.update_inplace(np.ascontiguousarray(pixel_values, dtype=np.float32))
        try:
            self.session.run_with_iobinding(io, self._run_options(len(pixel_values)))
        except Exception as err:
            if not self.cuda_graphs:
                raise
            self.notes.append(f"CUDA graphs off: capture failed at batch {len(pixel_values)} ({first_line(err)})")
            self.cuda_graphs = False
            self.deactivate_session()
            self._open_session()
            self._launch(pixel_values)

    def time_runs(self, pixel_values: np.ndarray, iterations: int) -> list[float]:
        """GPU milliseconds per run on a device-resident input (copied in once), from CUDA events on ORT's stream."""
        if not self.config.io_binding:
            raise NotImplementedError(f"{self.name} is timed on the host clock")
        self._launch(pixel_values)  # binds, copies the input in, and captures the graph if enabled
        io = self._bound[len(pixel_values)][0]
        options = self._run_options(len(pixel_values))
        return cudart.time_on_stream(self._stream, lambda: self.session.run_with_iobinding(io, options), iterations)

    def _run_options(self, batch: int) -> Any:
        import onnxruntime as ort

        options = ort.RunOptions()
        if self.cuda_graphs:
            options.add_run_config_entry("gpu_graph_id", str(self._bound[batch][3]))
        return options

    def deactivate_session(self) -> None:
        self._bound.clear()
        self.session = None

    def deactivate(self) -> None:
        self.deactivate_session()
        if self._stream is not None:
            cudart.stream_destroy(self._stream)
            self._stream = None
        self.source.release()

    def describe(self) -> dict[str, object]:
        info = super().describe() | {"providers": list(self.config.providers), "providers_used": self.providers_used,
                                     "cuda_graphs": self.cuda_graphs, "notes": self.notes}
        if TRT_EP in self.config.providers:
            flags = self.precision_flags()
            built = "int8 Q/DQ layers + fp16" if flags["trt_int8_enable"] else "fp16" if flags["trt_fp16_enable"] else "fp32"
            info["tensorrt"] = {"network": "weakly typed (ORT's TensorRT provider has no strongly typed option)",
                                "kernels_allowed": built, **flags, "libraries": self.tensorrt_libraries}
        return info | ({"timing_note": HOST_SYNC_NOTE} if self.config.io_binding else {})


ORT_CPU = OrtKind(OrtConfig(
    name="ort-cpu", device="cpu", providers=(CPU_EP,), default_precision="fp32",
    files={"fp32": (MODEL_FILES["fp32"],), "fp16": (MODEL_FILES["fp16"],), "int8": (INT8_CPU_FILE, MODEL_FILES["int8"])},
))
ORT_CUDA = OrtKind(OrtConfig(
    name="ort-cuda", device="cuda", providers=(CUDA_EP, CPU_EP), default_precision="fp16",
    files={"fp16": (ORT_FUSED_FILES["fp16"], MODEL_FILES["fp16"]), "fp32": (ORT_FUSED_FILES["fp32"], MODEL_FILES["fp32"]),
           "int8": (MODEL_FILES["int8"],)},
    io_binding=True, cuda_graphs=True,
))
ORT_TRT = OrtKind(OrtConfig(
    name="ort-trt", device="cuda", providers=(TRT_EP, CUDA_EP, CPU_EP), default_precision="fp16",
    files={"fp16": (MODEL_FILES["fp16"],), "fp32": (MODEL_FILES["fp32"],), "int8": (INT8_TRT_FILE, MODEL_FILES["int8"])},
))
