"""Benchmark harness, timing core and report on a tiny real DeiT artifact: schema, tables, plot, agreement, flags."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.__main__ import main as bench_main
from benchmarks.harness import BenchSpec, Settings, default_labels, resolve, run_benchmark
from benchmarks.optimum_style import ORT_CPU_OPTIMUM_STYLE
from benchmarks.report import markdown, write_report
from conftest import SAMPLE_DIR, needs_sample
from runtime.backends import ModelSource
from runtime.backends.onnxruntime import ORT_CPU, OrtBackend, OrtKind
from runtime.backends.timing import CONTENDED, Timing, measure


class FakeLoad:
    """Other processes' load, as a scripted sequence of readings (the real one depends on the machine)."""

    def __init__(self, *readings: float) -> None:
        self.readings = list(readings)

    def start(self) -> None:
        pass

    def stop(self, wall_s: float) -> float | None:
        return self.readings.pop(0)


QUICK = Settings(batch_sizes=(1, 2), warmup=1, min_iters=3, min_time_s=0.0, retries=0, threads=1, load=None)


class ScriptedKind(OrtKind):
    """ort-cpu with a twist in `run`, to stand in for a wrong, failing or GPU-timed backend."""

    def __init__(self, name: str, backend_class: type[OrtBackend]) -> None:
        super().__init__(replace(ORT_CPU.config, name=name))
        self.backend_class = backend_class

    def backend(self, source: ModelSource, *, max_batch: int = 8, threads: int | None = None) -> OrtBackend:
        return self.backend_class(source, self, max_batch=max_batch, threads=threads)


class Reversed(OrtBackend):
    """Fast and wrong: the right model, but every class score lands on the wrong class."""

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[:, ::-1].copy() for k, v in super().run(pixel_values).items()}


class Failing(OrtBackend):
    """Loads, answers the correctness batch, then fails like ONNX Runtime's Fail does mid-benchmark."""

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        if len(pixel_values) == 2:
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node")
        return super().run(pixel_values)


class EventTimed(OrtBackend):
    """Stands in for a GPU backend that reports device-measured milliseconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = "cuda-events"

    def time_runs(self, pixel_values: np.ndarray, iterations: int) -> list[float]:
        return [float(len(pixel_values)) * 7.0 for _ in range(iterations)]


@pytest.fixture(scope="module")
def results(tiny_artifact: Path) -> dict[str, Any]:
    specs = [resolve(label) for label in ("torch-eager", "torch-sdpa", "ort-cpu", "ort-cpu-int8", "trt",
                                          "ort-cpu-optimum-style")]
    specs += [BenchSpec(name, ScriptedKind(name, cls)) for name, cls in
              (("reversed", Reversed), ("failing", Failing), ("event-timed", EventTimed))]
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
    assert results["schema"] == 2
    assert results["model"]["artifact"] == str(tiny_artifact) and results["model"]["synthetic"] is False
    env = results["environment"]
    assert env["cpu"] and env["cpu_cores_usable"] >= 1 and isinstance(env["cpu_features"], list)
    assert {"torch", "onnxruntime", "numpy"} <= set(env["versions"])
    assert results["settings"]["batch_sizes"] == [1, 2] and results["settings"]["agreement_batch"]["random"] == 16
    rows = _rows(results)
    for label in ("torch-eager", "torch-sdpa", "ort-cpu", "ort-cpu-optimum-style", "reversed"):
        row = rows[label]
        assert row["status"] == "ok", row
        assert (row["precision"], row["device"], row["clock"], row["threads"]) == ("fp32", "cpu", "host", 1)
        assert [t["batch_size"] for t in row["timings"]] == [1, 2] and all(t["iterations"] >= 3 for t in row["timings"])
    assert rows["ort-cpu"]["model_file"] == "model.onnx" and rows["ort-cpu"]["providers"] == ["CPUExecutionProvider"]
    assert rows["torch-eager"]["device_note"].startswith("CPU")
    assert rows["ort-cpu-optimum-style"]["built"]["exporter"].startswith("torch.onnx.export(dynamo=False")


def test_backends_that_cannot_run_or_fail_are_rows_with_the_reason(results: dict[str, Any]) -> None:
    rows = _rows(results)
    assert rows["ort-cpu-int8"]["status"] == "unavailable"
    assert rows["ort-cpu-int8"]["precision"] == "int8" and "model.int8.onnx not found" in rows["ort-cpu-int8"]["reason"]
    assert rows["trt"]["status"] == "unavailable" and rows["trt"]["reason"]
    assert rows["failing"]["status"] == "failed" and "FAIL : Non-zero status" in rows["failing"]["reason"]
    assert rows["event-timed"]["status"] == "ok", "the rows after a failure are still measured"


def test_agreement_flags_the_wrong_backend_only(results: dict[str, Any]) -> None:
    rows = _rows(results)
    assert rows["reversed"]["agreement"]["top1_agreement"] == 0.0 and rows["reversed"]["agreement"]["flagged"]
    for label in ("torch-eager", "torch-sdpa", "ort-cpu", "ort-cpu-optimum-style"):
        agreement = rows[label]["agreement"]
        assert agreement["top1_agreement"] == 1.0 and not agreement["flagged"], label
        assert agreement["max_abs_diff"] < 1e-4 and agreement["samples"] == 16


def test_one_table_per_clock(results: dict[str, Any]) -> None:
    rows = _rows(results)
    assert rows["event-timed"]["clock"] == "cuda-events"
    assert [t["median_ms"] for t in rows["event-timed"]["timings"]] == [7.0, 14.0]
    md = markdown(_quiet(results))
    host, device = md.split("Median latency, ms, ")[1:3]
    assert host.startswith("host clock") and "speed-up over torch-eager" in host and "event-timed" not in host
    assert device.startswith("GPU, CUDA events") and "speed-up over event-timed" in device and "torch-eager" not in device.split("Reference")[0]
    assert "eager 8/9/9/8 ms, SDPA 6/6/6/6 ms" in device  # the transformers docs' A100 line beside the GPU table


def test_gpu_rows_that_sync_on_the_host_say_so_under_their_table(results: dict[str, Any], tiny_artifact: Path) -> None:
    from runtime.backends import create

    note = create("ort-cuda", tiny_artifact).describe()["timing_note"]  # ORT's IOBinding rows (constructed, not run)
    assert "synchronises the host inside run_with_iobinding" in str(note)
    assert "timing_note" not in create("ort-cpu", tiny_artifact).describe()
    quiet = _quiet(results)
    next(row for row in quiet["backends"] if row["label"] == "event-timed")["timing_note"] = note
    host, device = markdown(quiet).split("Median latency, ms, ")[1:3]
    assert f"`event-timed`: {note}." in device.split("Reference")[0] and str(note) not in host


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
    assert row1[1] == f"{eager_ms[1]:.2f} (1.00x)"
    agreement = next(line for line in lines if line.startswith("| top-1 agreement |"))
    assert agreement.count("100%") == 4 and "**0% WRONG**" in agreement
    assert "- `ort-cpu-int8` (unavailable):" in md and "- `trt` (unavailable):" in md and "- `failing` (failed):" in md
    assert "†" not in md and not list((tmp_path / "out").glob(".*.tmp"))


def test_timing_core_statistics_and_retries() -> None:
    samples = iter(range(1, 100))
    timing = measure(lambda: float(next(samples)), batch_size=4, warmup=2, min_iters=10, min_time_s=0.0, max_iters=10,
                     retries=0, load=FakeLoad(0.0))
    # warm-up consumed 1 and 2; the timed runs were 3..12
    assert (timing.iterations, timing.min_ms, timing.median_ms, timing.p90_ms) == (10, 3.0, 7.5, 11.1)
    assert timing.images_per_s == round(4 * 1000 / 7.5, 2) and not timing.contended
    quieter = measure(lambda: 1.0, 1, warmup=0, min_iters=2, min_time_s=0.0, retries=2, load=FakeLoad(0.9, 0.1))
    assert quieter.attempts == 2 and quieter.other_load_cores == 0.1  # re-measured once, then quiet enough
    busy = measure(lambda: 1.0, 1, warmup=0, min_iters=2, min_time_s=0.0, retries=2, load=FakeLoad(0.9, 0.5, 0.7))
    assert busy.attempts == 3 and busy.other_load_cores == 0.5 and busy.contended  # the quietest of three, still flagged


def test_disturbed_cells_are_marked(results: dict[str, Any]) -> None:
    loaded = _quiet(results)
    disturbed = Timing(1, 10, 5.0, 6.0, 7.0, 5.5, 4.0, 200.0, other_load_cores=CONTENDED + 0.5, attempts=3)
    _rows(loaded)["ort-cpu"]["timings"][0] = disturbed.__dict__
    md = markdown(loaded)
    row1 = next(line for line in md.splitlines() if line.startswith("| 1 |")).split(" | ")
    assert row1[3].endswith(" †") and "† other processes kept" in md


def test_optimum_style_backend_honours_threads(tiny_artifact: Path) -> None:
    """Regression: the Optimum-style row used to ignore --threads."""
    with ORT_CPU_OPTIMUM_STYLE(tiny_artifact, threads=1) as backend:
        assert backend.session.get_session_options().intra_op_num_threads == 1
        assert backend.source.info["fused_ops"]  # ORT's optimizer fused something (SkipLayerNormalization at least)


@needs_sample()
def test_end_to_end_mode(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "e2e"
    args = ["--model", str(tiny_artifact), "--batch-sizes", "4", "--backends", "ort-cpu", "--min-iters", "2",
            "--min-time", "0", "--retries", "0", "--out", str(out), "--no-progress", "--end-to-end", str(SAMPLE_DIR),
            "--end-to-end-backends", "ort-cpu,ort-cpu-optimum-style", "--end-to-end-limit", "12", "--threads", "1",
            "--no-ceilings", "--no-auto"]
    assert bench_main(args) == 0
    rows = {row["label"]: row for row in json.loads((out / "results.json").read_text())["end_to_end"]}
    assert rows["ort-cpu"]["status"] == "ok" and rows["ort-cpu"]["decoded"] == 12 and rows["ort-cpu"]["batch_size"] == 4
    assert rows["ort-cpu"]["end_to_end_images_per_s"] > 0 and rows["ort-cpu"]["backend_threads"] == 1
    assert rows["ort-cpu-optimum-style"]["status"] == "unavailable"
    md = (out / "results.md").read_text()
    assert "End to end:" in md and "| ort-cpu | 12 | 4 |" in md


def test_resolve_names() -> None:
    assert resolve("ort-cpu-int8").precision == "int8" and resolve("ort-cpu-int8").kind is ORT_CPU
    assert resolve("openvino-cpu-bf16").precision == "bf16"
    assert resolve("ort-cpu").precision is None
    assert default_labels(gpu=False)[:2] == ["torch-eager", "torch-sdpa"] and "ort-cpu-optimum-style" in default_labels(gpu=False)
    gpu = default_labels(gpu=True)
    assert "ort-cuda-optimum-style" in gpu and "torch-sdpa-graph-fp16" in gpu and "ort-cpu" not in gpu
    with pytest.raises(Exception, match="unknown backend 'ort-gpu'") as err:
        resolve("ort-gpu")
    assert getattr(err.value, "exit_code", None) == 2


def test_cli(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res"
    args = ["--model", str(tiny_artifact), "--batch-sizes", "1,2", "--backends", "ort-cpu,ort-cpu-int8",
            "--min-iters", "2", "--min-time", "0", "--retries", "0", "--out", str(out), "--no-progress", "--no-ceilings",
            "--no-auto"]
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    assert "| Batch size | ort-cpu |" in printed and "ort-cpu-int8" in printed
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "latency.png"}
    assert bench_main(["--model", str(tmp_path / "nope"), "--out", str(out)]) == 5
    assert capsys.readouterr().err.startswith("benchmarks: error:")
    assert bench_main(["--model", str(tiny_artifact), "--backends", "ort-gpu", "--out", str(out)]) == 2


def test_cpu_report_with_ceilings_and_auto(tiny_artifact: Path, tmp_path: Path) -> None:
    """The CPU report: MatMul ceilings measured in the same run, GFLOP/s and share per cell, and auto's pick."""
    out = tmp_path / "cpu"
    assert bench_main(["--model", str(tiny_artifact), "--batch-sizes", "1,4", "--backends", "ort-cpu,openvino-cpu",
                       "--min-iters", "3", "--min-time", "0", "--retries", "0", "--out", str(out), "--no-progress",
                       "--threads", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    engines = {(c["engine"], c["dtype"]) for c in results["cpu_ceilings"]["entries"]}
    assert {("onnxruntime", "fp32"), ("torch", "fp32")} <= engines and all(c["gflops"] > 0 for c in results["cpu_ceilings"]["entries"])
    best = max(c["gflops"] for c in results["cpu_ceilings"]["entries"] if c["dtype"] == "fp32")
    ort = _rows(results)["ort-cpu"]
    for t in ort["timings"]:
        cell = results["cpu_efficiency"]["ort-cpu"][str(t["batch_size"])]
        want = results["gflop_per_image"] * t["batch_size"] / (t["median_ms"] / 1000)
        assert cell["gflops"] == pytest.approx(want, rel=1e-2) and cell["share_of_ceiling"] == pytest.approx(want / best, rel=1e-2)
    assert [a["batch_size"] for a in results["auto"]] == [1, 4]
    for a in results["auto"]:
        assert a["picked"].split()[0] in ("ort-cpu", "openvino-cpu", "torch-sdpa") and "verdict" in a
    md = (out / "results.md").read_text()
    assert "MatMul ceilings of this CPU" in md and "GFLOP/s" in md and "What `--backend auto` picks" in md
