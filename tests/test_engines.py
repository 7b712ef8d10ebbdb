"""TensorRT engines and the trt / ort-trt backends.

Everything that needs no GPU runs here on real files (a tiny exported DeiT, fake plan bytes with sidecars
written by the writer `make engines` uses): sidecar reading, the one-line errors, feature detection, `make
engines` exit status. The `trt` backend's own logic (buffers, contexts, CUDA graphs, timing) runs on a
simulated GPU and TensorRT (tests/gpu_fakes.py), since it cannot start without them; building and running
real engines is marked `gpu` and skips with the reason on a machine without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from export.engines import attention_note, count_fused_attention, missing_prerequisites, plan_engines
from runtime.artifact import ArtifactError, file_sha256, model_path, read_onnx_meta
from runtime.backends.auto import choose
from runtime.backends import BackendUnavailable, create, cudart
from runtime.backends.onnxruntime import ORT_TRT
from runtime.backends.trt import (
    EngineError,
    TRT,
    TensorRTKind,
    check_engine,
    engine_path,
    read_sidecar,
    require_tensorrt,
    sidecar_path,
    tensorrt_unavailable_reason,
    write_sidecar,
)
from runtime.errors import MODEL, UsageError, exit_code
from gpu_fakes import H100, TRT_VERSION, FakeEngine, FakeGpu, fake_engine, fake_onnxruntime, fake_tensorrt, onnx_io

ROOT = Path(__file__).resolve().parents[1]
GPU_REASON = tensorrt_unavailable_reason() or cudart.gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs TensorRT and an NVIDIA GPU: {GPU_REASON}")


@pytest.fixture
def artifact(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny artifact's ONNX files, so engines written here stay here."""
    out = tmp_path / "tiny-deit"
    out.mkdir()
    for name in ("model.onnx", "model.fp16.onnx", "export.json"):
        (out / name).write_bytes((tiny_artifact / name).read_bytes())
    return out


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_sidecar_is_read_and_a_matching_engine_passes(artifact: Path) -> None:
    plan = fake_engine(artifact)
    sidecar = read_sidecar(plan)
    assert sidecar.tensorrt_version == TRT_VERSION and sidecar.gpu["compute_capability"] == "9.0"
    assert [t.name for t in sidecar.io][0] == "pixel_values" and "logits" in [t.name for t in sidecar.io]
    assert check_engine(plan, sidecar, TRT_VERSION, H100) == []


def test_same_architecture_other_gpu_model_only_warns(artifact: Path) -> None:
    plan = fake_engine(artifact)
    warnings = check_engine(plan, read_sidecar(plan), TRT_VERSION, cudart.GpuInfo("NVIDIA H200", "9.0", 0))
    assert len(warnings) == 1 and "NVIDIA H200" in warnings[0] and "H100" in warnings[0]


def test_missing_sidecar_says_rebuild(artifact: Path) -> None:
    plan = fake_engine(artifact)
    sidecar_path(plan).unlink()
    with pytest.raises(EngineError) as err:
        read_sidecar(plan)
    assert "model.fp16.plan.json" in one_line(err) and "sidecar is missing" in str(err.value)
    assert f"python -m export.engines --model {artifact} --precision fp16" in str(err.value)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "engine": "x"}), "[]"])
def test_unreadable_or_foreign_sidecar(artifact: Path, content: str) -> None:
    plan = fake_engine(artifact)
    sidecar_path(plan).write_text(content)
    with pytest.raises(EngineError) as err:
        read_sidecar(plan)
    assert "model.fp16.plan.json" in one_line(err) and "python -m export.engines" in str(err.value)


def test_a_sidecar_without_the_source_hash_is_refused_with_the_rebuild_command(artifact: Path) -> None:
    """Without source_sha256 nothing can tell a stale engine from a fresh one: refused (exit 5), never trusted."""
    plan = fake_engine(artifact)
    data = json.loads(sidecar_path(plan).read_text())
    del data["source_sha256"]
    sidecar_path(plan).write_text(json.dumps(data))
    rebuild = f"python -m export.engines --model {artifact} --precision fp16"
    reason = TRT.missing_files(artifact, "fp16")
    assert reason is not None and "source_sha256" in reason and rebuild in reason
    with pytest.raises(EngineError) as err:
        TRT(artifact)
    assert "source_sha256" in one_line(err) and rebuild in str(err.value) and exit_code(err.value) == MODEL


def test_the_sidecar_round_trips_through_its_writer(artifact: Path) -> None:
    plan = fake_engine(artifact)
    sidecar = read_sidecar(plan)
    write_sidecar(plan, sidecar)
    assert read_sidecar(plan) == sidecar
    assert json.loads(sidecar_path(plan).read_text())["io"][0] == {"name": "pixel_values", "mode": "input",
                                                                   "dtype": "float32", "shape": [-1, 3, 32, 32]}


def test_truncated_engine(artifact: Path) -> None:
    plan = fake_engine(artifact)
    sidecar = read_sidecar(plan)
    plan.write_bytes(plan.read_bytes()[:100])
    with pytest.raises(EngineError) as err:
        check_engine(plan, sidecar, TRT_VERSION, H100)
    assert "truncated" in one_line(err) and "100 bytes" in str(err.value) and str(plan) in str(err.value)


def test_modified_engine_of_the_same_size(artifact: Path) -> None:
    plan = fake_engine(artifact)
    sidecar = read_sidecar(plan)
    plan.write_bytes(b"\xff" * plan.stat().st_size)
    with pytest.raises(EngineError) as err:
        check_engine(plan, sidecar, TRT_VERSION, H100)
    assert "sha256" in one_line(err)


def test_engine_from_another_tensorrt_version(artifact: Path) -> None:
    plan = fake_engine(artifact, trt_version="10.13.0.35")
    with pytest.raises(EngineError) as err:
        check_engine(plan, read_sidecar(plan), "11.1.0.4", H100)
    text = one_line(err)
    assert "TensorRT 10.13.0.35" in text and "TensorRT 11.1.0.4" in text and "make engines" in text


def test_engine_for_another_gpu_architecture(artifact: Path) -> None:
    plan = fake_engine(artifact, gpu=cudart.GpuInfo("NVIDIA A100-SXM4-40GB", "8.0", 40 * 2**30))
    with pytest.raises(EngineError) as err:
        check_engine(plan, read_sidecar(plan), TRT_VERSION, H100)
    text = one_line(err)
    assert "A100" in text and "8.0" in text and "H100" in text and "9.0" in text


def test_missing_engine_file(artifact: Path) -> None:
    plan = fake_engine(artifact)
    sidecar = read_sidecar(plan)
    plan.unlink()
    with pytest.raises(EngineError, match="no such engine file"):
        check_engine(plan, sidecar, TRT_VERSION, H100)


def test_trt_backend_reads_meta_from_the_sidecar(artifact: Path) -> None:
    plan = fake_engine(artifact)
    backend = TRT(artifact, precision="fp16")
    assert backend.model_file == plan
    assert backend.meta == read_onnx_meta(model_path(artifact, "fp16"))
    assert backend.input.shape == ("batch", 3, 32, 32)
    assert TRT.missing_files(artifact) is None
    assert "model.int8.plan not found" in (TRT.missing_files(artifact, "int8") or "")


def test_trt_backend_without_sidecar_fails_at_construction(artifact: Path) -> None:
    sidecar_path(fake_engine(artifact)).unlink()
    assert "model.fp16.plan.json not found" in (TRT.missing_files(artifact) or "")
    with pytest.raises(ArtifactError, match="sidecar is missing"):
        TRT(artifact)


@pytest.mark.skipif(GPU_REASON is None, reason="this machine has TensorRT and a GPU")
def test_feature_detection_without_gpu(artifact: Path) -> None:
    assert TRT.unavailable_reason() == GPU_REASON
    fake_engine(artifact)
    with pytest.raises(BackendUnavailable, match="backend 'trt' is unavailable") as err:
        with TRT(artifact):
            pass
    assert "make install-gpu" in str(err.value) or "GPU" in str(err.value)
    choice = choose(artifact, batch_size=2)
    assert choice.backend != "trt" and choice.passed_over["trt fp16"] == GPU_REASON


def test_a_stale_engine_is_refused_and_auto_passes_it_over(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine built from an ONNX file that changed since (re-export, re-calibration) would run the old model."""
    plan = fake_engine(artifact, "fp16")
    assert TRT.missing_files(artifact, "fp16") is None and TRT(artifact).model_file == plan
    model = onnx.load(str(model_path(artifact, "fp16")))
    model.doc_string = "exported again"
    onnx.save(model, str(model_path(artifact, "fp16")))
    rebuild = f"python -m export.engines --model {artifact} --precision fp16"
    reason = TRT.missing_files(artifact, "fp16")
    assert reason is not None and "stale" in reason and "model.fp16.onnx changed" in reason and rebuild in reason
    for named in (None, plan):
        with pytest.raises(EngineError, match="stale") as err:
            TRT(artifact, model_file=named)
        assert rebuild in one_line(err) and exit_code(err.value) == MODEL
    monkeypatch.setattr(TRT, "unavailable_reason", lambda: None)  # as on a machine with TensorRT and a GPU
    choice = choose(artifact, batch_size=2)
    assert choice.backend != "trt" and "stale" in choice.passed_over["trt fp16"]


def test_a_named_engine_file_means_that_file(artifact: Path) -> None:
    """--model .../model.int8.plan runs that engine; an ONNX file given to trt is refused, not swapped."""
    fake_engine(artifact, precision="fp16")
    backend = TRT(artifact, model_file=engine_path(artifact, "fp16"))
    assert backend.precision == "fp16" and backend.model_file == engine_path(artifact, "fp16")
    with pytest.raises(UsageError, match="is a fp16 engine, not int8"):
        TRT(artifact, precision="int8", model_file=engine_path(artifact, "fp16"))
    with pytest.raises(UsageError, match="runs TensorRT engines"):
        TRT(artifact, model_file=artifact / "model.fp16.onnx")


def test_tensorrt_stubs_are_not_mistaken_for_tensorrt() -> None:
    try:
        import tensorrt
    except ImportError:
        pytest.skip("neither tensorrt nor tensorrt-stubs is installed")
    if isinstance(getattr(tensorrt, "__version__", None), str):
        assert require_tensorrt() == tensorrt.__version__
    else:
        with pytest.raises(BackendUnavailable, match="only its type stubs"):
            require_tensorrt()


def test_cuda_status_is_checked() -> None:
    rt = pytest.importorskip("cuda.bindings.runtime")
    assert cudart._check("cudaRuntimeGetVersion", (rt.cudaError_t.cudaSuccess, 13040)) == 13040
    with pytest.raises(cudart.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cudart._check("cudaMalloc", (rt.cudaError_t.cudaErrorMemoryAllocation, None))



class OldDriverRuntime:
    """cuda.bindings.runtime as it answers on a machine whose driver is older than its CUDA runtime (or absent: 0)."""

    def __init__(self, driver: int) -> None:
        import cuda.bindings.runtime as rt

        self.cudaError_t, self.driver = rt.cudaError_t, driver

    def cudaGetDeviceCount(self) -> tuple[object, None]:
        return self.cudaError_t.cudaErrorInsufficientDriver, None

    def cudaDriverGetVersion(self) -> tuple[object, int]:
        return self.cudaError_t.cudaSuccess, self.driver

    def cudaRuntimeGetVersion(self) -> tuple[object, int]:
        return self.cudaError_t.cudaSuccess, 13040


def test_an_old_driver_is_not_reported_as_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cuda.bindings.runtime")
    monkeypatch.setattr(cudart, "_rt", lambda: OldDriverRuntime(12020))
    reason = cudart.gpu_unavailable_reason() or ""
    assert "no usable NVIDIA GPU" not in reason
    assert "supports CUDA 12.2" in reason and "CUDA 13.4 runtime" in reason and "R580" in reason
    assert "cu12" not in reason and "CUDA 13 builds" in reason  # no CUDA 12 install resolves beside torch 2.13
    monkeypatch.setattr(cudart, "_rt", lambda: OldDriverRuntime(0))
    assert "no NVIDIA driver found" in (cudart.gpu_unavailable_reason() or "")


def test_stream_handle_is_the_streams_address() -> None:
    rt = pytest.importorskip("cuda.bindings.runtime")
    assert cudart.stream_handle(rt.cudaStream_t(0x1234)) == 0x1234


@pytest.mark.skipif(cudart.gpu_unavailable_reason() is None, reason="this machine has a GPU")
def test_no_gpu_is_told_apart_from_a_cuda_bug() -> None:
    reason = cudart.gpu_unavailable_reason()
    assert reason is not None and ("cudaGetDeviceCount" in reason or "cuda-python is not installed" in reason)


def test_ort_trt_says_what_is_missing() -> None:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider")
    reason = ORT_TRT.unavailable_reason()
    assert reason is not None and "TensorrtExecutionProvider" in reason and "make install-gpu" in reason


@pytest.mark.parametrize(("precision", "fp16", "int8", "kernels"),
                         [("fp32", False, False, "fp32"), ("fp16", True, False, "fp16"), ("int8", True, True, "int8 Q/DQ layers + fp16")])
def test_ort_trt_asks_tensorrt_for_the_precision_it_names(tiny_int8_artifact: Path, tmp_path: Path, precision: str,
                                                         fp16: bool, int8: bool, kernels: str) -> None:
    """ORT's TensorRT provider builds weakly typed networks: without its flags an "fp16" row runs fp32 kernels."""
    import shutil

    artifact = shutil.copytree(tiny_int8_artifact, tmp_path / "tiny-deit")  # the engine cache goes inside
    backend = create("ort-trt", artifact, precision=precision)
    options = dict(backend.provider_list())["TensorrtExecutionProvider"]  # type: ignore[attr-defined]
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (fp16, int8)
    described = backend.describe()["tensorrt"]
    assert described["kernels_allowed"] == kernels and "weakly typed" in described["network"]  # type: ignore[index]


def test_ort_trt_names_the_tensorrt_its_provider_links(tmp_path: Path) -> None:
    """onnxruntime-gpu's TensorRT provider links one TensorRT major by soname; without it, ORT would fail (or fall
    back) with a loader message: the backend says which TensorRT to install instead."""
    from runtime.backends.onnxruntime import preload_tensorrt_libraries, tensorrt_provider_major, tensorrt_provider_unavailable

    capi = tmp_path / "capi"
    capi.mkdir()
    assert tensorrt_provider_major(capi) is None and "no TensorRT provider" in (tensorrt_provider_unavailable(capi) or "")
    (capi / "libonnxruntime_providers_tensorrt.so").write_bytes(
        b"\x7fELF\x02\x01" + b"\x00" * 64 + b"libnvinfer.so.10\x00libnvonnxparser.so.10\x00libcudart.so.13\x00")
    assert tensorrt_provider_major(capi) == 10
    reason = tensorrt_provider_unavailable(capi, dirs=[tmp_path])
    assert reason is not None and "libnvinfer.so.10" in reason and "'tensorrt-cu13>=10,<11'" in reason
    assert "https://pypi.nvidia.com" in reason
    with pytest.raises(BackendUnavailable, match="links libnvinfer.so.10, which cannot be loaded") as err:
        preload_tensorrt_libraries(10, dirs=[tmp_path])
    assert exit_code(err.value) == 6


def test_an_int8_only_build_does_not_demand_the_fp16_file(artifact: Path) -> None:
    (artifact / "model.fp16.onnx").rename(artifact / "model.int8-trt.onnx")  # any file named like the Q/DQ model
    assert not [m for m in missing_prerequisites(artifact, ("int8",)) if "run `make export`" in m]
    assert [m for m in missing_prerequisites(artifact, ("fp16",)) if "model.fp16.onnx" in m]


def test_int8_engine_waits_for_calibration(artifact: Path) -> None:
    todo, notes = plan_engines(artifact, ("fp16", "int8"))
    assert todo == [("fp16", model_path(artifact, "fp16"))]
    assert len(notes) == 1 and "model.int8-trt.onnx not found" in notes[0] and "make calibrate" in notes[0]
    (artifact / "model.int8.onnx").write_bytes((artifact / "model.onnx").read_bytes())  # the fp32 Q/DQ file is not it
    assert plan_engines(artifact, ("int8",))[0] == []


def test_attention_path_depends_on_tensorrt_version(artifact: Path) -> None:
    meta = read_onnx_meta(model_path(artifact, "fp16"))
    assert meta.attention == "fused"
    assert "IAttention" in attention_note("10.14.1.48", meta, artifact)
    assert "IAttention" in attention_note("11.1.0", meta, artifact)
    with pytest.raises(EngineError, match="--attention decomposed") as err:
        attention_note("10.13.0.35", meta, artifact)
    assert meta.checkpoint in one_line(err)
    meta.attention = "decomposed"
    assert "TensorRT 10.8.0 < 10.14" in attention_note("10.8.0", meta, artifact)


def test_fused_attention_is_counted_from_types_and_kernels_not_names() -> None:
    layers = [
        {"Name": "/encoder/layer.0/attention/MatMul", "LayerType": "MatrixMultiply", "TacticName": "sm90_xmma_gemm"},
        {"Name": "node_scaled_dot_product_attention_3", "LayerType": "kgen", "TacticName": "__myl_Tra"},
        {"Name": "__mye12", "LayerType": "kgen", "TacticName": "_gemm_mha_v2_fp16"},
        {"Name": "attn_1", "LayerType": "Attention", "TacticName": ""},
    ]
    info = count_fused_attention(json.dumps({"Layers": layers}))
    assert info["fused_attention_layers"] == 2 and info["layers"] == 4 and info["layer_types"]["kgen"] == 2
    assert count_fused_attention(json.dumps({"Layers": ["a", "b"]}))["fused_attention_layers"] == 0


@pytest.mark.skipif(GPU_REASON is None, reason="this machine has TensorRT and a GPU")
def test_make_engines_exits_6_saying_what_is_missing(artifact: Path) -> None:
    assert len(missing_prerequisites(artifact)) >= 1
    cli = subprocess.run([sys.executable, "-m", "export.engines", "--model", str(artifact)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 6 and GPU_REASON in cli.stderr and cli.stderr.count("\n") == 1, cli.stderr
    proc = subprocess.run(["make", "-s", "engines", f"PY={sys.executable}", f"ARTIFACT={artifact}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # make's own status for a failed recipe
    assert GPU_REASON in proc.stderr
    assert not engine_path(artifact, "fp16").exists()


# ---- on a GPU machine only -------------------------------------------------------------------


@pytest.fixture
def built(artifact: Path) -> Path:
    from export.engines import EngineOptions, build_engines

    report = build_engines(artifact, ("fp16",), EngineOptions(max_batch=4, progress=False))
    assert set(report["engines"]) == {"fp16"}
    return artifact


@pytest.mark.gpu
@needs_gpu
def test_engine_matches_onnx_runtime(built: Path) -> None:
    from runtime.backends.onnxruntime import ORT_CPU

    sidecar = read_sidecar(engine_path(built, "fp16"))
    assert sidecar.max_batch == 4 and sidecar.source_sha256 == file_sha256(model_path(built, "fp16"))
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)
    with ORT_CPU(built, precision="fp32") as ref:
        expected = ref.infer(x)
    for graphs in (True, False):
        with TensorRTKind(cuda_graphs=graphs)(built) as trt_backend:
            assert trt_backend.max_batch == 4
            got = trt_backend.infer(x)
            got_again = trt_backend.infer(x[:3])
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, atol=2e-2, rtol=2e-2)
            np.testing.assert_allclose(got_again[name], got[name][:3], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_gpu
def test_real_truncated_engine_is_refused(built: Path) -> None:
    plan = engine_path(built, "fp16")
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(EngineError, match="truncated"):
        with TRT(built):
            pass


def test_gpu_check_table_reads_back_row_by_row() -> None:
    """Each step is one row whose columns line up whatever the name lengths, so the table can be read back."""
    from benchmarks.gpu_check import Step, format_table

    steps = [Step("export", "PASS", 31.2, "synthetic weights -> x"),
             Step("infer trt fp16 vs ORT fp32", "FAIL", 2.0, "top-1 agreement 97.00% < 99.5%"),
             Step("engines", "SKIP", 0.0, "TensorRT is not installed")]
    lines = format_table(steps).splitlines()
    body = lines[-len(steps):]
    columns = {line.index(f"  {step.status}  ") + 2 for line, step in zip(body, steps)}
    assert len(columns) == 1 and lines[0].index("result") in columns, "the result column moves from row to row"
    col = columns.pop()
    for line, step in zip(body, steps):
        status, seconds, detail = line[col:].split(maxsplit=2)
        assert (line[:col].rstrip(), status, float(seconds.rstrip("s")), detail) == (step.name, step.status, step.seconds, step.detail)


def test_polygraphy_cross_check_commands(artifact: Path, tmp_path: Path) -> None:
    """What gpu-check asks NVIDIA's Polygraphy to run: ORT fp32 reference outputs, then our engine against them."""
    from benchmarks.gpu_check import polygraphy_commands

    save, check = polygraphy_commands(artifact, "fp16", tmp_path)
    assert save[:3] == ["polygraphy", "run", str(artifact / "model.onnx")] and "--onnxrt" in save
    assert save[save.index("--input-shapes") + 1] == "pixel_values:[8,3,32,32]"
    assert check[:3] == ["polygraphy", "run", str(engine_path(artifact, "fp16"))] and "--trt" in check
    assert check[check.index("--model-type") + 1] == "engine"
    assert check[check.index("--load-outputs") + 1] == save[save.index("--save-outputs") + 1]
    assert check[check.index("--load-inputs") + 1] == save[save.index("--save-inputs") + 1]


def test_polygraphy_runs_from_this_environment_bounded_and_finds_pip_cuda(
        artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make gpu-check` runs .venv/bin/python without .venv/bin on PATH: Polygraphy is found beside it, each
    run has a timeout, and pip's CUDA libraries are on LD_LIBRARY_PATH for Polygraphy's ctypes load of libcudart."""
    from benchmarks import gpu_check

    bin_dir, site_packages = tmp_path / "venv" / "bin", tmp_path / "venv" / "site-packages"
    bin_dir.mkdir(parents=True)
    (bin_dir / "polygraphy").write_text("#!/bin/sh\n")
    (bin_dir / "polygraphy").chmod(0o755)
    for lib in ("cu13", "cudnn"):
        (site_packages / "nvidia" / lib / "lib").mkdir(parents=True)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/mine")
    monkeypatch.setattr(gpu_check.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(gpu_check.site, "getsitepackages", lambda: [str(site_packages)])
    runs: list[dict[str, Any]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        runs.append({"cmd": cmd, **kwargs})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    assert "matches ONNX Runtime fp32" in gpu_check._polygraphy(artifact, "fp16")
    assert [r["cmd"][0] for r in runs] == [str(bin_dir / "polygraphy")] * 2
    assert all(r["timeout"] == gpu_check.POLYGRAPHY_TIMEOUT_S for r in runs)
    assert runs[0]["env"]["LD_LIBRARY_PATH"].split(":") == [str(site_packages / "nvidia" / "cu13" / "lib"),
                                                          str(site_packages / "nvidia" / "cudnn" / "lib"), "/opt/mine"]

    def hung(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(gpu_check.subprocess, "run", hung)
    with pytest.raises(gpu_check.StepFailed, match="did not finish within 900 s"):
        gpu_check._polygraphy(artifact, "fp16")
    with pytest.raises(gpu_check.StepFailed, match="did not finish within"):
        gpu_check._run_cli(["benchmarks", "--help"])


@pytest.mark.skipif(GPU_REASON is None, reason="this machine has TensorRT and a GPU")
def test_gpu_check_without_a_gpu_skips_every_step_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.gpu_check import gpu_missing, main

    if not all(gpu_missing().values()):
        pytest.skip("some GPU route can run here")
    assert main(["--out", "/nonexistent/never-written"]) == 6
    out, err = capsys.readouterr()
    rows = out.splitlines()[2:]
    assert rows and all(row.split(" SKIP ", 1)[1].split(maxsplit=1)[1:] for row in rows), out  # each SKIP says why
    assert err.count("\n") == 1 and err.startswith("gpu_check: error: no GPU step")
    assert all(reason in err for reason in gpu_missing().values())  # each missing piece is named
    assert not Path("/nonexistent/never-written").exists()


@pytest.fixture
def simulated_trt(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeGpu, FakeEngine]:
    """The fp16 engine (plan bytes and the real sidecar) on a simulated H100 and TensorRT: no GPU runs here."""
    plan = fake_engine(artifact, "fp16")
    gpu = FakeGpu(monkeypatch, H100)
    shapes = {t.name: (8, *t.shape[1:]) for t in read_sidecar(plan).io}
    return gpu, fake_tensorrt(monkeypatch, gpu, TRT_VERSION, shapes, max_batch=8)


def expected_outputs(engine: FakeEngine, x: np.ndarray) -> dict[str, np.ndarray]:
    return {name: engine.reference(x, k, engine.shapes[name][1]) for k, name in enumerate(engine.outputs)}


@pytest.mark.parametrize("graphs", [True, False])
def test_trt_outputs_stay_right_when_the_batch_size_switches_back(artifact: Path, simulated_trt: tuple[FakeGpu, FakeEngine],
                                                                 graphs: bool) -> None:
    """A captured graph replays against its context's shape setup: switching back to an earlier batch size must
    not replay it against another size's setup (TensorRT: one execution context per captured shape)."""
    gpu, engine = simulated_trt
    rng = np.random.default_rng(0)
    with TensorRTKind(cuda_graphs=graphs)(artifact) as backend:
        for n in (8, 1, 3, 8, 1, 8):
            x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
            got = backend.run(x)
            for name, want in expected_outputs(engine, x).items():
                np.testing.assert_array_equal(got[name], want, err_msg=f"{name} at batch {n} (graphs {graphs})")
        assert backend.cuda_graphs is graphs and backend.graph_error is None
        assert list(got) == engine.outputs  # every engine output comes back, distilled heads included


@pytest.mark.parametrize("graphs", [True, False])
def test_trt_times_execution_only_on_a_device_resident_input(artifact: Path, simulated_trt: tuple[FakeGpu, FakeEngine],
                                                             graphs: bool) -> None:
    """Like every CUDA-event row, trt's events hold the engine's execution and no copy; `run` adds the copies."""
    gpu, engine = simulated_trt
    x = np.ones((2, 3, 32, 32), np.float32)
    with TensorRTKind(cuda_graphs=graphs)(artifact) as backend:
        assert backend.time_runs(x, 3) == [FakeGpu.KERNEL_MS] * 3
        before = gpu.clock
        backend.run(x)
        assert gpu.clock - before == FakeGpu.KERNEL_MS + FakeGpu.COPY_MS * (1 + len(engine.outputs))


def ort_cuda_on(gpu: FakeGpu, artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = {t.name: t.shape[1] for t in onnx_io(model_path(artifact, "fp16")) if t.mode == "output"}
    fake_onnxruntime(monkeypatch, gpu, outputs)


def test_ort_cuda_reads_the_input_it_was_given(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT copies the input in on the legacy default stream (`update_inplace`); its kernels run on our stream, which
    must be a blocking one to wait for that copy, or a run reads the previous batch's pixels."""
    gpu = FakeGpu(monkeypatch, H100)
    ort_cuda_on(gpu, artifact, monkeypatch)
    rng = np.random.default_rng(1)
    with create("ort-cuda", artifact, precision="fp16", max_batch=4) as backend:
        for n in (4, 4, 1, 4):
            x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
            got = backend.run(x)
            for k, (name, value) in enumerate(got.items()):
                np.testing.assert_array_equal(value, FakeEngine.reference(x, k, value.shape[1]), err_msg=f"{name} at {n}")
    assert [s.blocking for s in gpu.streams] == [True]


def test_ort_cuda_times_execution_only_on_a_device_resident_input(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu(monkeypatch, H100)
    ort_cuda_on(gpu, artifact, monkeypatch)
    with create("ort-cuda", artifact, precision="fp16", max_batch=4) as backend:
        assert backend.time_runs(np.ones((2, 3, 32, 32), np.float32), 3) == [FakeGpu.KERNEL_MS] * 3  # type: ignore[attr-defined]
