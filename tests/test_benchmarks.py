"""Benchmark harness and report on a tiny real DeiT artifact: schema, table, plot, agreement, flags."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.__main__ import main as bench_main
from conftest import SAMPLE_DIR, needs_sample
from benchmarks.harness import (
    CONTENDED, BenchSpec, Settings, default_labels, least_disturbed, resolve, run_benchmark, time_batches,
)
from benchmarks.report import markdown, write_report
from runtime.backends.ort_cpu import OrtCpuBackend

QUICK = Settings(batch_sizes=(1, 2), warmup=1, min_iters=3, min_time_s=0.0, retries=0)


class ReversedLogitsBackend(OrtCpuBackend):
    """Fast and wrong: the right model, but every class score lands on the wrong class."""

    name = "reversed"

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[:, ::-1].copy() for k, v in super().run(pixel_values).items()}


class RecordingBackend(OrtCpuBackend):
    """Remembers which input buffers it was given, to check the harness rotates them."""

    name = "recording"

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        self.seen.append(pixel_values.ctypes.data)
        return super().run(pixel_values)

    seen: list[int]


class EventTimedBackend(OrtCpuBackend):
    """Stands in for a GPU backend that reports device-measured milliseconds."""

    name = "event-timed"

    def time_runs(self, pixel_values: np.ndarray, iterations: int) -> list[float]:
        return [float(len(pixel_values)) * 7.0 for _ in range(iterations)]


@pytest.fixture(scope="module")
def results(tiny_artifact: Path) -> dict[str, Any]:
    specs = [resolve(label) for label in ("torch-eager", "torch-sdpa", "ort-cpu", "ort-cpu-int8", "trt", "ort-cpu-optimum-style")]
    specs.append(BenchSpec("reversed", ReversedLogitsBackend))
    return run_benchmark(tiny_artifact, specs, QUICK, progress=False)


def _rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["label"]: row for row in results["backends"]}


def _quiet(results: dict[str, Any]) -> dict[str, Any]:
    """The results as if nothing else had run meanwhile (this machine is shared; the tests must not care)."""
    quiet = copy.deepcopy(results)
    for row in quiet["backends"]:
        for t in row.get("timings", []):
            t["other_load_cores"] = 0.0
    return quiet


def test_results_schema(results: dict[str, Any], tiny_artifact: Path) -> None:
    assert results["schema"] == 1
    assert results["model"]["artifact"] == str(tiny_artifact) and results["model"]["synthetic"] is False
    env = results["environment"]
    assert env["cpu"] and env["cpu_cores_usable"] >= 1 and env["threads"] == Settings().threads
    assert {"torch", "onnxruntime", "numpy"} <= set(env["versions"])
    assert results["settings"]["batch_sizes"] == [1, 2]
    assert results["settings"]["agreement_batch"]["random"] == 16
    rows = _rows(results)
    for label in ("torch-eager", "torch-sdpa", "ort-cpu", "ort-cpu-optimum-style", "reversed"):
        row = rows[label]
        assert row["status"] == "ok", row
        assert row["precision"] == "fp32" and row["threads"] == env["threads"] and "monotonic" in row["clock"]
        assert [t["batch_size"] for t in row["timings"]] == [1, 2]
        for t in row["timings"]:
            assert t["iterations"] >= 3
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["p90_ms"] <= t["p99_ms"]
            assert t["images_per_s"] == pytest.approx(t["batch_size"] * 1000 / t["median_ms"], rel=1e-2)
    assert rows["ort-cpu-optimum-style"]["info"]["exporter"].startswith("torch.onnx.export(dynamo=False")


def test_backends_that_cannot_run_are_listed_with_the_reason(results: dict[str, Any]) -> None:
    rows = _rows(results)
    assert rows["ort-cpu-int8"]["status"] == "unavailable"
    assert rows["ort-cpu-int8"]["precision"] == "int8" and "model.int8.onnx not found" in rows["ort-cpu-int8"]["reason"]
    assert rows["trt"]["status"] == "unavailable" and rows["trt"]["reason"]


def test_agreement_flags_the_wrong_backend_only(results: dict[str, Any]) -> None:
    rows = _rows(results)
    assert rows["reversed"]["agreement"]["top1_agreement"] == 0.0 and rows["reversed"]["agreement"]["flagged"]
    for label in ("torch-eager", "torch-sdpa", "ort-cpu", "ort-cpu-optimum-style"):
        agreement = rows[label]["agreement"]
        assert agreement["top1_agreement"] == 1.0 and not agreement["flagged"], label
        assert agreement["max_abs_diff"] < 1e-4 and agreement["samples"] == 16


def test_report_files(results: dict[str, Any], tmp_path: Path) -> None:
    results = _quiet(results)
    paths = write_report(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results, default=str))
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000
    md = paths["markdown"].read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| Batch size |"))
    assert header.split(" | ")[1:3] == ["torch-eager", "torch-sdpa"]
    eager_ms = {t["batch_size"]: t["median_ms"] for t in _rows(results)["torch-eager"]["timings"]}
    row1 = next(line for line in lines if line.startswith("| 1 |")).split(" | ")
    assert row1[1] == f"{eager_ms[1]:.1f} (1.00x)"
    ort_ms = _rows(results)["ort-cpu"]["timings"][0]["median_ms"]
    assert row1[3] == f"{ort_ms:.1f} ({eager_ms[1] / ort_ms:.2f}x)"
    agreement = next(line for line in lines if line.startswith("| top-1 agreement |"))
    assert agreement.count("100%") == 4 and "**0% WRONG**" in agreement
    assert "- `ort-cpu-int8` (unavailable):" in md and "- `trt` (unavailable):" in md
    assert "†" not in md and not list((tmp_path / "out").glob(".*.tmp"))


def test_timer_rotates_buffers_and_prefers_device_clock(tiny_artifact: Path) -> None:
    settings = replace(QUICK, min_iters=8, buffers=4)
    buffers = [np.random.default_rng(i).standard_normal((2, 3, 32, 32)).astype(np.float32) for i in range(4)]
    backend = RecordingBackend(tiny_artifact)
    backend.seen = []
    with backend:
        timing = time_batches(backend, buffers, settings)
    assert timing.iterations >= 8
    assert set(backend.seen) == {b.ctypes.data for b in buffers}
    rows = run_benchmark(tiny_artifact, [BenchSpec("event-timed", EventTimedBackend)], settings, progress=False)["backends"]
    assert rows[0]["clock"] == "CUDA events (device)"
    assert [t["median_ms"] for t in rows[0]["timings"]] == [7.0, 14.0]


def test_other_processes_load_is_measured_and_marked(tiny_artifact: Path, results: dict[str, Any]) -> None:
    buffers = [np.zeros((1, 3, 32, 32), np.float32)] * 2
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with OrtCpuBackend(tiny_artifact, threads=1) as backend:
            timing = least_disturbed(backend, buffers, replace(QUICK, min_time_s=0.7, retries=1))
    finally:
        hog.kill()
        hog.wait()
    assert timing.other_load_cores is not None and timing.other_load_cores > CONTENDED
    assert timing.attempts == 2  # measured again because the first attempt was disturbed
    loaded = _quiet(results)
    _rows(loaded)["ort-cpu"]["timings"][0] = asdict(timing) | {"batch_size": 1}
    md = markdown(loaded)
    row1 = next(line for line in md.splitlines() if line.startswith("| 1 |")).split(" | ")
    assert row1[3].endswith(" †") and "† other processes kept" in md


@needs_sample()
def test_end_to_end_mode(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e"
    args = ["--model", str(tiny_artifact), "--batch-sizes", "4", "--backends", "ort-cpu", "--min-iters", "2",
            "--min-time", "0", "--retries", "0", "--out", str(out), "--no-progress", "--end-to-end", str(SAMPLE_DIR),
            "--end-to-end-backends", "ort-cpu,ort-cpu-optimum-style", "--end-to-end-limit", "12"]
    assert bench_main(args) == 0
    rows = {row["label"]: row for row in json.loads((out / "results.json").read_text())["end_to_end"]}
    assert rows["ort-cpu"]["status"] == "ok" and rows["ort-cpu"]["decoded"] == 12 and rows["ort-cpu"]["batch_size"] == 4
    assert rows["ort-cpu"]["end_to_end_images_per_s"] > 0 and rows["ort-cpu"]["backend_threads"] == Settings().threads
    assert rows["ort-cpu-optimum-style"]["status"] == "unavailable"
    md = (out / "results.md").read_text()
    assert "End to end:" in md and "| ort-cpu | 12 | 4 |" in md


def test_resolve_names() -> None:
    assert resolve("ort-cpu-int8").precision == "int8" and resolve("ort-cpu-int8").cls is OrtCpuBackend
    assert resolve("ort-cpu").precision is None
    assert default_labels()[:2] == ["torch-eager", "torch-sdpa"] and "ort-cpu-optimum-style" in default_labels()
    with pytest.raises(ValueError, match="unknown backend 'ort-gpu'"):
        resolve("ort-gpu")


def test_cli(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res"
    args = ["--model", str(tiny_artifact), "--batch-sizes", "1,2", "--backends", "ort-cpu,ort-cpu-int8",
            "--min-iters", "2", "--min-time", "0", "--retries", "0", "--out", str(out), "--no-progress"]
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    assert "| Batch size | ort-cpu |" in printed and "ort-cpu-int8" in printed
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "latency.png"}
    assert bench_main(["--model", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "benchmarks: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--model", str(tiny_artifact), "--backends", "ort-gpu"])
    assert exit_info.value.code == 2
