"""Time backends side by side on one artifact, and check each one's answers against a reference.

A latency without a correctness check rewards a backend for being wrong quickly, so every backend
also runs one shared input batch whose outputs are compared with the fp32 reference (torch-eager by
default, on the GPU when there is one); the report shows top-1 agreement next to the latency and
flags backends below a threshold.

Timing goes through the one core (`runtime.backends.timing.measure`). Each backend says which clock it is
timed with: CPU backends on the host clock around `Backend.run`; GPU backends (`clock ==
"cuda-events"`) on CUDA events around runs on a device-resident input (`time_runs`), optionally
with a second host-clock column that includes the copies. A table never mixes the two clocks. A
backend that raises anything becomes a row with the error, and the run goes on.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.verify import verification_inputs
from runtime.artifact import MODEL_FILES, SYNTHETIC_WARNING, ArtifactMeta, read_onnx_meta
from runtime.backends import BACKENDS, PRECISIONS, Backend, BackendKind, backend_kind
from export.compare import compare
from runtime.console import progress_bar
from runtime.cpuinfo import describe_cpu, usable_cores
from runtime.errors import DeitError, UsageError, first_line
from runtime.backends.timing import LoadMeter, host_ms, measure

# Backends that exist only to be compared against (not part of the runtime registry).
BENCH_ONLY: dict[str, str] = {
    "ort-cpu-optimum-style": "benchmarks.optimum_style:ORT_CPU_OPTIMUM_STYLE",
    "ort-cuda-optimum-style": "benchmarks.optimum_style:ORT_CUDA_OPTIMUM_STYLE",
    "ort-cuda-sln16": "benchmarks.optimum_style:ORT_CUDA_SLN16",
}
DEFAULT_REFERENCE = "torch-eager"
CPU_DEFAULTS = ("torch-eager", "torch-sdpa", "ort-cpu", "ort-cpu-int8", "openvino-cpu", "openvino-cpu-bf16",
                "openvino-cpu-int8", "ort-cpu-optimum-style")
GPU_DEFAULTS = ("torch-eager", "torch-sdpa", "torch-eager-fp16", "torch-sdpa-fp16", "torch-sdpa-graph-fp16",
                "torch-compile-fp16", "ort-cuda", "ort-cuda-sln16", "ort-cuda-fp32", "ort-cuda-optimum-style", "trt", "trt-int8", "ort-trt")


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark row: a backend kind at a precision, or the reason it cannot exist here."""

    label: str
    kind: BackendKind | None
    precision: str | None = None
    unavailable: str | None = None


@dataclass
class Settings:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    warmup: int = 3
    min_iters: int = 10
    min_time_s: float = 1.0
    max_iters: int = 1000
    buffers: int = 4  # distinct input batches rotated through while timing (host clock)
    threads: int | None = None  # CPU threads per backend; None: one per usable core
    reference: str = DEFAULT_REFERENCE
    agreement_images: Path | None = None  # photos for the shared batch (random tensors are always included)
    agreement_limit: int = 32
    min_agreement: float = 0.9  # a backend whose top-1 agrees less often than this is flagged
    seed: int = 0
    retries: int = 2  # re-measure a cell that other processes disturbed up to this often
    with_copies: bool = False  # GPU rows: also time host->device copy + run + device->host on the host clock
    load: LoadMeter | None = None  # how other processes' load is measured (tests pass a fake)


def resolve(label: str) -> BenchSpec:
    """`ort-cpu`, `ort-cpu-int8` (a registry name with a precision suffix) or a benchmark-only backend.

    A known backend whose module cannot be imported here becomes a row with the reason; an unknown
    name is a UsageError.
    """
    name, precision = label, None
    for prec in PRECISIONS:
        base = label.removesuffix(f"-{prec}")
        if base != label and (base in BACKENDS or base in BENCH_ONLY):
            name, precision = base, prec
    if name not in BACKENDS and name not in BENCH_ONLY:
        known = ", ".join([*BACKENDS, *BENCH_ONLY])
        raise UsageError(f"unknown backend {label!r}; choose from {known} (optionally ending in -fp16, -bf16 or -int8)")
    try:
        if name in BENCH_ONLY:
            module, attr = BENCH_ONLY[name].split(":")
            return BenchSpec(label, getattr(importlib.import_module(module), attr), precision)
        return BenchSpec(label, backend_kind(name), precision)
    except (DeitError, ImportError) as err:
        return BenchSpec(label, None, precision, str(err))


def default_labels(gpu: bool | None = None) -> list[str]:
    """The rows `make bench` shows: on a GPU machine every row runs on the GPU; elsewhere the CPU rows."""
    if gpu is None:
        gpu = gpu_present()
    return list(GPU_DEFAULTS if gpu else CPU_DEFAULTS)


def gpu_present() -> bool:
    from runtime.backends.cudart import gpu_unavailable_reason
    from runtime.backends.pytorch import cuda_available

    return cuda_available() or gpu_unavailable_reason() is None


def unavailable_reason(spec: BenchSpec, artifact_dir: Path) -> str | None:
    if spec.kind is None:
        return spec.unavailable
    return spec.kind.unavailable_reason() or spec.kind.missing_files(artifact_dir, spec.precision)


def construct(spec: BenchSpec, artifact_dir: Path, settings: Settings) -> Backend:
    assert spec.kind is not None
    threads = settings.threads or usable_cores()  # every CPU row at the same, recorded thread count (torch's too)
    return spec.kind(artifact_dir, precision=spec.precision, max_batch=max(settings.batch_sizes), threads=threads)


def make_buffers(meta: ArtifactMeta, batch: int, settings: Settings) -> list[np.ndarray]:
    h, w = meta.preprocessing.input_size
    rng = np.random.default_rng(settings.seed + batch)
    return [rng.standard_normal((batch, 3, h, w)).astype(np.float32) for _ in range(settings.buffers)]


def _run_once(backend: Backend, buffers: list[np.ndarray], device_clock: bool) -> Callable[[], float]:
    """One timed run: the device clock on a device-resident input, or the host clock around `run` (inputs rotate)."""
    if device_clock:
        return lambda: backend.time_runs(buffers[0], 1)[0]  # type: ignore[attr-defined]
    turn = iter(range(1 << 62))
    return lambda: host_ms(lambda: backend.run(buffers[next(turn) % len(buffers)]))


def time_cell(backend: Backend, batch: int, settings: Settings, device_clock: bool) -> dict[str, Any]:
    buffers = make_buffers(backend.meta, batch, settings)
    timing = measure(_run_once(backend, buffers, device_clock), batch, warmup=settings.warmup,
                     min_iters=settings.min_iters, min_time_s=settings.min_time_s, max_iters=settings.max_iters,
                     retries=settings.retries, load=settings.load)
    return asdict(timing)


def measure_row(spec: BenchSpec, artifact_dir: Path, settings: Settings, shared_batch: np.ndarray,
                on_cell: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """One backend's row (timings, clock, how it ran) and its outputs on the shared batch.

    Any exception a backend raises (ORT's Fail, a CUDA error, out of memory) ends that row with the
    error; the other rows are still measured.
    """
    row: dict[str, Any] = {"label": spec.label, "precision": spec.precision, "status": "unavailable"}
    reason = unavailable_reason(spec, artifact_dir)
    if reason:
        return row | {"reason": reason}, None
    try:
        backend = construct(spec, artifact_dir, settings)
        row |= {"precision": backend.precision, "device": backend.device, "clock": backend.clock}
        with backend:
            outputs = backend.infer(shared_batch)
            timings, with_copies = [], []
            for batch in settings.batch_sizes:
                if on_cell is not None:
                    on_cell(f"{spec.label} batch {batch}")
                timings.append(time_cell(backend, batch, settings, backend.clock == "cuda-events"))
                if backend.clock == "cuda-events" and settings.with_copies:
                    with_copies.append(time_cell(backend, batch, settings, device_clock=False))
            row |= backend.describe()
    except Exception as err:  # the row says what went wrong; the benchmark goes on
        return row | {"status": "failed", "reason": f"{type(err).__name__}: {first_line(err)}"}, None
    row |= {"status": "ok", "timings": timings, "label": spec.label}
    if with_copies:
        row["timings_with_copies"] = with_copies
    return row, outputs


def run_benchmark(artifact_dir: str | Path, specs: list[BenchSpec], settings: Settings, progress: bool = True,
                  cpu_ceilings: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Measure every spec on one artifact; returns the results document (see `benchmarks.report`).

    An interrupt ends the measuring: the document then holds the rows that finished and `interrupted`
    names the signal, for the caller to write before it stops.

    The reference backend runs on the shared batch even when it is not among `specs`.
    `cpu_ceilings`, when given, measures the CPU's MatMul ceilings in the same run (benchmarks/cpu.py).
    """
    artifact_dir = Path(artifact_dir)
    meta = read_onnx_meta(artifact_dir / MODEL_FILES["fp32"])
    shared, n_photos = verification_inputs(
        meta.preprocessing, settings.agreement_images, settings.agreement_limit, n_random=16, seed=settings.seed
    )
    rows: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, np.ndarray]] = {}
    cells = sum(unavailable_reason(s, artifact_dir) is None for s in specs) * len(settings.batch_sizes)
    with progress_bar(total=cells, desc="benchmark", unit="cell", enabled=progress) as bar:
        def on_cell(text: str) -> None:
            bar.set_postfix_str(text)
            bar.update(1)

        try:
            for spec in specs:
                row, out = measure_row(spec, artifact_dir, settings, shared, on_cell)
                rows.append(row)
                if out is not None:
                    outputs[spec.label] = out
        except KeyboardInterrupt as err:  # Ctrl-C / SIGTERM: report the rows that finished, measure nothing more
            interrupted: int | None = getattr(err, "signum", signal.SIGINT)
        else:
            interrupted = None
    reference = outputs.get(settings.reference)
    reference_note = None
    if reference is None and interrupted is None:
        reference, reference_note = _reference_outputs(resolve(settings.reference), artifact_dir, settings, shared)
    for row in rows:
        if row["label"] in outputs and reference is not None:
            row["agreement"] = agreement(reference, outputs[row["label"]], settings.min_agreement)
    results: dict[str, Any] = {
        "schema": 2,
        "model": {
            "artifact": str(artifact_dir),
            "checkpoint": meta.checkpoint,
            "weights": meta.weights,
            "synthetic": meta.synthetic,
            "architecture": meta.architecture,
            "num_layers": meta.num_layers,
            "image_size": meta.image_size,
            "config": meta.config,
        },
        "warning": SYNTHETIC_WARNING if meta.synthetic else None,
        "environment": environment(settings.threads),
        "settings": _settings_dict(settings) | {"agreement_batch": {"random": int(len(shared) - n_photos), "photos": n_photos}},
        "reference_note": reference_note,
        "backends": rows,
        "interrupted": signal.Signals(interrupted).name if interrupted is not None else None,
    }
    if interrupted is None and cpu_ceilings is not None and any(r.get("device") == "cpu" and r["status"] == "ok" for r in rows):
        results["cpu_ceilings"] = cpu_ceilings()
    return results


def agreement(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], min_agreement: float) -> dict[str, Any]:
    """How far a backend's first output is from the reference's, and whether that is too far to trust."""
    key = next(iter(reference))
    result: dict[str, Any] = compare({key: reference[key]}, {key: candidate[key]})
    result["output"] = key
    result["flagged"] = bool(result["top1_agreement"] < min_agreement)
    return result


def _reference_outputs(spec: BenchSpec, artifact_dir: Path, settings: Settings,
                       shared: np.ndarray) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The reference's outputs when it was not a measured row; None (and why) when it cannot run."""
    reason = unavailable_reason(spec, artifact_dir)
    if reason:
        return None, f"reference backend {spec.label!r} cannot run here ({reason}): no agreement figures"
    try:
        with construct(spec, artifact_dir, settings) as backend:
            return backend.infer(shared), None
    except Exception as err:
        return None, f"reference backend {spec.label!r} failed ({type(err).__name__}: {first_line(err)}): no agreement figures"


def _settings_dict(settings: Settings) -> dict[str, Any]:
    data = asdict(settings)
    data.pop("load")
    data["batch_sizes"] = list(settings.batch_sizes)
    data["agreement_images"] = str(settings.agreement_images) if settings.agreement_images else None
    return data


def environment(threads: int | None) -> dict[str, Any]:
    """What the numbers depend on: hardware, thread budget and library versions."""
    versions = {}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    cpu = describe_cpu()
    return {
        "cpu": cpu["model"],
        "cpu_features": cpu["features"],
        "cpu_cores_usable": cpu["usable_cores"],
        "gpu": _gpu_name(),
        "threads": threads or cpu["usable_cores"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _gpu_name() -> str | None:
    try:
        from runtime.backends import cudart

        return None if cudart.gpu_unavailable_reason() else cudart.gpu_info().name
    except Exception:  # no cuda-python, or a driver that answers oddly: the report just says "no GPU"
        return None


@dataclass
class EndToEndRequest:
    images: Path
    labels: list[str] = field(default_factory=lambda: ["ort-cpu"])
    limit: int | None = 200


def end_to_end(artifact_dir: str | Path, request: EndToEndRequest, settings: Settings, progress: bool = True) -> list[dict[str, Any]]:
    """What the whole pipeline (decode + preprocess + infer, `runtime.classify`) delivers, images/s per backend,
    from `benchmarks.pipeline_throughput.measure_pipeline`, which also times the model alone on the same images."""
    from benchmarks.pipeline_throughput import measure_pipeline

    rows: list[dict[str, Any]] = []
    for label in request.labels:
        spec = resolve(label)
        reason = unavailable_reason(spec, Path(artifact_dir))
        if not reason and spec.kind is not None and spec.kind.name not in BACKENDS:
            reason = "end-to-end mode runs registry backends only"
        if reason:
            rows.append({"label": label, "status": "unavailable", "reason": reason})
            continue
        assert spec.kind is not None
        try:
            result = measure_pipeline(artifact_dir, request.images, backend=spec.kind.name, precision=spec.precision,
                                      batch_size=max(settings.batch_sizes), threads=settings.threads, limit=request.limit,
                                      repeats=1, progress=progress)
        except Exception as err:
            rows.append({"label": label, "status": "failed", "reason": f"{type(err).__name__}: {first_line(err)}"})
            continue
        rows.append({"label": label, "status": "ok", "images_dir": str(request.images)} | result)
    return rows
