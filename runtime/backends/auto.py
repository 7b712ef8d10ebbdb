"""`--backend auto`: the fastest backend that can run this artifact on this machine, and why.

On a GPU machine the order is fixed, fastest first: a TensorRT engine, then ONNX Runtime CUDA (see
the README's GPU table). On a CPU the fastest backend depends on the CPU (ONNX Runtime's MLAS wins
on one machine, OpenVINO or PyTorch's oneDNN on another, int8 only pays where VNNI/AMX exist), so
`auto` measures: each CPU backend that can run the artifact at the requested precision runs a few
batches of the requested size, the fastest wins, and the choice is cached beside the artifact
(`auto-choice.json`) keyed by the CPU, the files and the settings, so the next run starts at once.
An int8 file is a candidate only if its accuracy gate passed (calibration.json).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifact import read_onnx_meta, write_json
from runtime.backends import GPU_ORDER, BackendUnavailable, backend_kind
from runtime.cpuinfo import cpu_features, cpu_model
from runtime.errors import UsageError
from runtime.backends.timing import host_ms, measure

CPU_CANDIDATES = ("ort-cpu", "openvino-cpu", "torch-sdpa")
CACHE_FILE = "auto-choice.json"
CALIBRATION_REPORT = "calibration.json"


@dataclass
class Choice:
    backend: str
    precision: str
    reason: str
    passed_over: dict[str, str] = field(default_factory=dict)  # "backend precision" -> why not
    timings_ms: dict[str, float] = field(default_factory=dict)  # "backend precision" -> median ms at the batch size

    def describe(self) -> str:
        over = "; ".join(f"{k}: {v}" for k, v in self.passed_over.items())
        return f"{self.backend} {self.precision} ({self.reason}{'; passed over ' + over if over else ''})"


def int8_gate_passed(artifact_dir: Path) -> bool:
    """The artifact's int8 files passed their accuracy gate on real labels/agreement (not just 'written')."""
    try:
        report = json.loads((artifact_dir / CALIBRATION_REPORT).read_text())
    except (OSError, ValueError):
        return False
    gate = report.get("gate", {}) if isinstance(report, dict) else None
    if not isinstance(gate, dict):  # `[]`, a string, a gate of another shape: not a report this project wrote
        return False
    return bool(report.get("passed")) and bool(gate.get("applied")) and not gate.get("failures")


def _reason_not(name: str, artifact_dir: Path, precision: str, model_file: Path | None) -> str | None:
    try:
        kind = backend_kind(name)
    except BackendUnavailable as err:
        return str(err)
    if precision not in kind.precisions:
        return f"does not run {precision}"
    if model_file is not None and (model_file.suffix == ".plan") != (name == "trt"):
        return f"cannot run {model_file.name}"
    return kind.unavailable_reason() or (None if model_file is not None else kind.missing_files(artifact_dir, precision))


def choose(artifact_dir: Path, precision: str | None = None, batch_size: int = 8, threads: int | None = None,
           model_file: Path | None = None, measure_s: float = 0.5) -> Choice:
    """Pick a backend (and precision) for this artifact here; see the module docstring."""
    passed_over: dict[str, str] = {}
    if precision is None and model_file is not None and model_file.suffix == ".onnx":
        precision = read_onnx_meta(model_file).precision
    for name in GPU_ORDER:
        prec = precision or "fp16"  # what a GPU runs fastest, when nothing was asked
        reason = _reason_not(name, artifact_dir, prec, model_file)
        if reason is None:
            return Choice(name, prec, "GPU: the fastest backend present", passed_over)
        passed_over[f"{name} {prec}"] = reason
    candidates: list[tuple[str, str]] = []
    wanted = [precision] if precision else ["fp32"] + (["int8"] if int8_gate_passed(artifact_dir) else [])
    if precision is None and not int8_gate_passed(artifact_dir):
        passed_over["int8"] = "no int8 file passed its accuracy gate (python -m calibration)"
    for prec in wanted:
        for name in CPU_CANDIDATES:
            reason = _reason_not(name, artifact_dir, prec, model_file)
            if reason is None:
                candidates.append((name, prec))
            else:
                passed_over[f"{name} {prec}"] = reason
    if not candidates:
        raise BackendUnavailable("no backend can run this artifact here: " + "; ".join(f"{k}: {v}" for k, v in passed_over.items()))
    if len(candidates) == 1:
        name, prec = candidates[0]
        return Choice(name, prec, "the only CPU backend that can run it here", passed_over)
    return _measured(artifact_dir, candidates, batch_size, threads, model_file, measure_s, passed_over)


def _signature(artifact_dir: Path, candidates: list[tuple[str, str]], batch_size: int, threads: int | None,
               model_file: Path | None) -> str:
    """What the measurement depends on: the CPU, the files measured (size, mtime) and the settings."""
    files = sorted({str(backend_kind(n).model_file_for(artifact_dir, p).name) for n, p in candidates}
                   | ({model_file.name} if model_file else set()))
    stamps = [(f, (artifact_dir / f).stat().st_size, (artifact_dir / f).stat().st_mtime_ns) for f in files]
    return json.dumps([cpu_model(), cpu_features(), candidates, batch_size, threads, stamps])


def _measured(artifact_dir: Path, candidates: list[tuple[str, str]], batch_size: int, threads: int | None,
              model_file: Path | None, measure_s: float, passed_over: dict[str, str]) -> Choice:
    key = _signature(artifact_dir, candidates, batch_size, threads, model_file)
    cache = artifact_dir / CACHE_FILE
    try:
        cached = json.loads(cache.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        cached = None
    if cached:
        choice = Choice(**cached)
        choice.reason += " (cached)"
        return choice
    timings: dict[str, float] = {}
    for name, prec in candidates:
        label = f"{name} {prec}"
        try:
            timings[label] = _time_one(name, artifact_dir, prec, batch_size, threads, model_file, measure_s)
        except UsageError:
            raise
        except Exception as err:  # a backend that fails here is simply not chosen
            passed_over[label] = f"failed while measured ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not timings:
        raise BackendUnavailable("no CPU backend could run this artifact: " + "; ".join(f"{k}: {v}" for k, v in passed_over.items()))
    best = min(timings, key=lambda k: timings[k])
    name, prec = best.split(" ")
    ranking = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(timings.items(), key=lambda kv: kv[1]))
    reason = (f"fastest measured on {cpu_model()} at batch {batch_size} ({ranking}; median, "
              f"{time.strftime('%Y-%m-%d')})")
    choice = Choice(name, prec, reason, passed_over, timings)
    _save(cache, key, choice)
    return choice


def _time_one(name: str, artifact_dir: Path, precision: str, batch_size: int, threads: int | None,
              model_file: Path | None, measure_s: float) -> float:
    kind = backend_kind(name)
    backend = kind(artifact_dir, precision=None if model_file else precision, max_batch=batch_size, threads=threads,
                   model_file=model_file)
    h, w = backend.meta.preprocessing.input_size
    x = np.random.default_rng(0).standard_normal((batch_size, 3, h, w)).astype(np.float32)
    with backend:
        timing = measure(lambda: host_ms(lambda: backend.run(x)), batch_size, warmup=1, min_iters=3,
                         min_time_s=measure_s, retries=1)
    return timing.median_ms


def _save(cache: Path, key: str, choice: Choice) -> None:
    """Best effort: a read-only artifact folder just means measuring again next time."""
    try:
        entries = json.loads(cache.read_text()) if cache.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
        entries[key] = asdict(choice)
        write_json(cache, entries)
    except (OSError, ValueError):
        pass
