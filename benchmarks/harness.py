"""Time backends side by side on one artifact, and check each one's answers against a reference.

A latency without a correctness check rewards a backend for being wrong quickly, so every backend
also runs one shared input batch whose outputs are compared with the fp32 reference (torch-eager by
default); the report shows top-1 agreement next to the latency and flags backends below a threshold.

Timing: warm-up runs, then runs until both a minimum count and a minimum measuring time are
reached; inputs rotate among several buffers so no run reads its input from cache. CPU backends are
timed with a monotonic clock around `Backend.run`. A GPU backend may expose `time_runs(x, iterations) -> [ms]`
(CUDA events around its copies and launch or CUDA-graph replay, as the trt backend does); the
harness then uses those numbers, and says so in each row's `clock`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tqdm import tqdm

from export.verify import compare, verification_inputs
from runtime.artifact import MODEL_FILES, SYNTHETIC_WARNING, ArtifactMeta, read_onnx_meta
from runtime.backends import BACKENDS, Backend, BackendUnavailable, backend_class

# Backends that exist only to be compared against (not part of the runtime registry).
BENCH_ONLY: dict[str, str] = {"ort-cpu-optimum-style": "benchmarks.optimum_style:OptimumStyleBackend"}
DEFAULT_REFERENCE = "torch-eager"
CONTENDED = 0.25  # cores of other processes' load during a cell that make its timing suspect


@runtime_checkable
class DeviceTimed(Protocol):
    """What a GPU backend implements so that it is timed on the device instead of the host clock."""

    def time_runs(self, pixel_values: np.ndarray, iterations: int) -> list[float]:
        """Run the batch `iterations` times; the milliseconds of each run as the device measured them."""
        ...


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark row: a backend class at a precision, or the reason it cannot exist here."""

    label: str
    cls: type[Backend] | None
    precision: str | None = None
    unavailable: str | None = None


@dataclass
class Settings:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    warmup: int = 3
    min_iters: int = 10
    min_time_s: float = 1.0
    max_iters: int = 1000
    buffers: int = 4  # distinct input batches rotated through while timing
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    reference: str = DEFAULT_REFERENCE
    agreement_images: Path | None = None  # photos for the shared batch (random tensors are always included)
    agreement_limit: int = 32
    min_agreement: float = 0.9  # a backend whose top-1 agrees less often than this is flagged
    seed: int = 0
    retries: int = 2  # re-measure a cell that other processes disturbed (see CONTENDED) up to this often


@dataclass
class Timing:
    batch_size: int
    iterations: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float
    # Cores other processes kept busy while this cell was measured: above CONTENDED the number is suspect.
    other_load_cores: float | None = None
    attempts: int = 1  # how many times the cell was measured (see `least_disturbed`)


def resolve(label: str) -> BenchSpec:
    """`ort-cpu`, `ort-cpu-int8` (a registry name with a precision suffix) or a benchmark-only backend.

    A known backend whose module cannot be imported here becomes a row with the reason; an unknown
    name is a ValueError.
    """
    name, precision = label, None
    for prec in MODEL_FILES:
        if label.endswith(f"-{prec}") and label[: -len(prec) - 1] in BACKENDS:
            name, precision = label[: -len(prec) - 1], prec
    if name not in BACKENDS and name not in BENCH_ONLY:
        known = ", ".join([*BACKENDS, *BENCH_ONLY])
        raise ValueError(f"unknown backend {label!r}; choose from {known} (a registry name may end in -fp16 or -int8)")
    try:
        if name in BENCH_ONLY:
            module, cls_name = BENCH_ONLY[name].split(":")
            return BenchSpec(label, getattr(importlib.import_module(module), cls_name), precision)
        return BenchSpec(label, backend_class(name), precision)
    except (BackendUnavailable, ImportError) as err:
        return BenchSpec(label, None, precision, str(err))


def default_labels() -> list[str]:
    """Every backend the project knows, the PyTorch baselines first (as in the HF table), plus the
    int8 CPU model and the Optimum-style comparison."""
    labels = [name for name in BACKENDS if name.startswith("torch")] + [name for name in BACKENDS if not name.startswith("torch")]
    labels.insert(labels.index("ort-cpu") + 1, "ort-cpu-int8")
    return labels + list(BENCH_ONLY)


def time_batches(backend: Backend, buffers: list[np.ndarray], settings: Settings) -> Timing:
    """Latency statistics of `backend.run` on batches rotated from `buffers`."""
    run = _timer(backend)
    for i in range(settings.warmup):
        run(buffers[i % len(buffers)])
    samples: list[float] = []
    start, busy_start, own_start = time.perf_counter(), _cpu_busy_s(), _own_cpu_s()
    while len(samples) < settings.min_iters or (
        time.perf_counter() - start < settings.min_time_s and len(samples) < settings.max_iters
    ):
        samples.append(run(buffers[len(samples) % len(buffers)]))
    wall, busy_end = time.perf_counter() - start, _cpu_busy_s()
    other = None
    if busy_start is not None and busy_end is not None:
        other = round(max(0.0, (busy_end - busy_start) - (_own_cpu_s() - own_start)) / wall, 2)
    ms = np.asarray(samples)
    median = float(np.median(ms))
    batch = len(buffers[0])
    return Timing(
        batch_size=batch,
        iterations=len(samples),
        median_ms=round(median, 4),
        p90_ms=round(float(np.percentile(ms, 90)), 4),
        p99_ms=round(float(np.percentile(ms, 99)), 4),
        mean_ms=round(float(ms.mean()), 4),
        min_ms=round(float(ms.min()), 4),
        images_per_s=round(batch * 1000.0 / median, 2),
        other_load_cores=other,
    )


def least_disturbed(backend: Backend, buffers: list[np.ndarray], settings: Settings) -> Timing:
    """Time a cell again while other processes loaded the CPU during it; keep the quietest attempt.

    On a shared machine a neighbour's burst can double a latency; a retry is cheaper than a wrong
    table. The attempt kept still records the load it saw, so a cell that never got quiet shows it.
    """
    best = time_batches(backend, buffers, settings)
    attempts = 1
    while attempts <= settings.retries and best.other_load_cores is not None and best.other_load_cores > CONTENDED:
        again = time_batches(backend, buffers, settings)
        attempts += 1
        if again.other_load_cores is not None and again.other_load_cores < best.other_load_cores:
            best = again
    best.attempts = attempts
    return best


def _cpu_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat; None elsewhere."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def clock_name(backend: Backend) -> str:
    return "CUDA events (device)" if isinstance(backend, DeviceTimed) else "perf_counter (monotonic, host)"


def _timer(backend: Backend) -> Callable[[np.ndarray], float]:
    if isinstance(backend, DeviceTimed):
        return lambda x: backend.time_runs(x, 1)[0]

    def host_ms(x: np.ndarray) -> float:
        t0 = time.perf_counter()
        backend.run(x)
        return (time.perf_counter() - t0) * 1000.0

    return host_ms


def make_buffers(meta: ArtifactMeta, batch: int, settings: Settings) -> list[np.ndarray]:
    h, w = meta.preprocessing.input_size
    rng = np.random.default_rng(settings.seed + batch)
    return [rng.standard_normal((batch, 3, h, w)).astype(np.float32) for _ in range(settings.buffers)]


def construct(spec: BenchSpec, artifact_dir: Path, settings: Settings) -> Backend:
    """The backend with the benchmark's fixed thread count, where the backend takes one."""
    assert spec.cls is not None
    kwargs: dict[str, Any] = {"precision": spec.precision, "max_batch": max(settings.batch_sizes)}
    if "threads" in inspect.signature(spec.cls).parameters:
        kwargs["threads"] = settings.threads
    return spec.cls(artifact_dir, **kwargs)


def unavailable_reason(spec: BenchSpec, artifact_dir: Path) -> str | None:
    if spec.cls is None:
        return spec.unavailable
    return spec.cls.unavailable_reason() or spec.cls.missing_files(artifact_dir, spec.precision)


def measure(
    spec: BenchSpec,
    artifact_dir: Path,
    settings: Settings,
    shared_batch: np.ndarray,
    progress: tqdm | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """One backend's row (timings, threads, clock) and its outputs on the shared batch."""
    row: dict[str, Any] = {"label": spec.label, "precision": spec.precision, "status": "unavailable"}
    reason = unavailable_reason(spec, artifact_dir)
    if reason:
        return row | {"reason": reason}, None
    try:
        backend = construct(spec, artifact_dir, settings)
        row |= {"backend": backend.name, "precision": backend.precision, "device": backend.device}
        with backend:
            # After activation: a backend may build the file it runs (optimum-style). The torch
            # backends name the artifact whose checkpoint they rebuild.
            row |= {"model_file": str(backend.model_file), "threads": _threads(backend), "clock": clock_name(backend)}
            if hasattr(backend, "info"):  # how a backend built its model, where it says (optimum-style)
                row["info"] = getattr(backend, "info")
            outputs = backend.infer(shared_batch)
            timings = []
            for batch in settings.batch_sizes:
                if progress is not None:
                    progress.set_postfix_str(f"{spec.label} batch {batch}")
                timings.append(asdict(least_disturbed(backend, make_buffers(backend.meta, batch, settings), settings)))
                if progress is not None:
                    progress.update(1)
    except (BackendUnavailable, OSError, RuntimeError, ValueError) as err:
        return row | {"status": "failed", "reason": f"{type(err).__name__}: {str(err).splitlines()[0]}"}, None
    return row | {"status": "ok", "timings": timings}, outputs


def _threads(backend: Backend) -> int | None:
    threads = getattr(backend, "threads", None)
    if threads is None and backend.name.startswith("torch"):
        import torch

        threads = torch.get_num_threads()
    return threads


def run_benchmark(
    artifact_dir: str | Path, specs: list[BenchSpec], settings: Settings, progress: bool = True
) -> dict[str, Any]:
    """Measure every spec on one artifact; returns the results document (see `benchmarks.report`).

    The reference backend runs on the shared batch even when it is not among `specs`.
    """
    artifact_dir = Path(artifact_dir)
    ref_spec = resolve(settings.reference)
    meta = read_onnx_meta(artifact_dir / MODEL_FILES["fp32"])
    shared, n_photos = verification_inputs(
        meta.preprocessing, settings.agreement_images, settings.agreement_limit, n_random=16, seed=settings.seed
    )
    rows: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, np.ndarray]] = {}
    timed = sum(unavailable_reason(s, artifact_dir) is None for s in specs) * len(settings.batch_sizes)
    with tqdm(total=timed, desc="benchmark", unit="cell", disable=not progress) as bar:
        for spec in specs:
            row, out = measure(spec, artifact_dir, settings, shared, bar)
            rows.append(row)
            if out is not None:
                outputs[spec.label] = out
    reference = outputs.get(settings.reference)
    if reference is None:
        reference = _reference_outputs(ref_spec, artifact_dir, settings, shared)
    for row in rows:
        if row["label"] in outputs:
            row["agreement"] = agreement(reference, outputs[row["label"]], settings.min_agreement)
    return {
        "schema": 1,
        "model": {
            "artifact": str(artifact_dir),
            "checkpoint": meta.checkpoint,
            "weights": meta.weights,
            "synthetic": meta.synthetic,
            "architecture": meta.architecture,
            "num_layers": meta.num_layers,
            "image_size": meta.image_size,
        },
        "warning": SYNTHETIC_WARNING if meta.synthetic else None,
        "environment": environment(settings.threads),
        "settings": _settings_dict(settings) | {
            "agreement_batch": {"random": int(len(shared) - n_photos), "photos": n_photos},
        },
        "backends": rows,
    }


def end_to_end(
    artifact_dir: str | Path, images: Path, labels: list[str], settings: Settings, limit: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """What the whole pipeline (decode + preprocess + infer, `runtime.classify`) delivers, images/s per backend.

    Uses the runtime engineer's `benchmarks.pipeline_throughput.measure_pipeline`, which also times
    the model alone on the same images, so the two numbers are directly comparable.
    """
    from benchmarks.pipeline_throughput import measure_pipeline

    rows: list[dict[str, Any]] = []
    for label in labels:
        spec = resolve(label)
        reason = unavailable_reason(spec, Path(artifact_dir))
        if not reason and spec.cls is not None and spec.cls.name not in BACKENDS:
            reason = "end-to-end mode runs registry backends only"
        if reason:
            rows.append({"label": label, "status": "unavailable", "reason": reason})
            continue
        assert spec.cls is not None
        result = measure_pipeline(
            artifact_dir, images, backend=spec.cls.name, precision=spec.precision, batch_size=max(settings.batch_sizes),
            threads=settings.threads, limit=limit, repeats=1, progress=progress,
        )
        rows.append({"label": label, "status": "ok", "images_dir": str(images)} | result)
    return rows


def agreement(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], min_agreement: float) -> dict[str, Any]:
    """How far a backend's first output is from the reference's, and whether that is too far to trust."""
    key = next(iter(reference))
    result: dict[str, Any] = compare({key: reference[key]}, {key: candidate[key]})
    result["output"] = key
    result["flagged"] = bool(result["top1_agreement"] < min_agreement)
    return result


def _reference_outputs(spec: BenchSpec, artifact_dir: Path, settings: Settings, shared: np.ndarray) -> dict[str, np.ndarray]:
    reason = unavailable_reason(spec, artifact_dir)
    if reason:
        raise BackendUnavailable(f"reference backend {spec.label!r} cannot run: {reason}")
    with construct(spec, artifact_dir, settings) as backend:
        return backend.infer(shared)


def _settings_dict(settings: Settings) -> dict[str, Any]:
    data = asdict(settings)
    data["batch_sizes"] = list(settings.batch_sizes)
    data["agreement_images"] = str(settings.agreement_images) if settings.agreement_images else None
    return data


def environment(threads: int) -> dict[str, Any]:
    """What the numbers depend on: hardware, thread budget and library versions."""
    versions = {}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpu_model(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "gpu": _gpu_name(),
        "threads": threads,
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
