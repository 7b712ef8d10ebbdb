"""`python -m export.triton`: every config.pbtxt parses with Triton's own protobuf schema and names files
that exist, with runtime.serve's tensor names. (Triton itself cannot run here: no GPU, no server binary.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.triton import main, preferred_sizes, triton_schema
from runtime.backends.trt import SIDECAR_FORMAT

schema = triton_schema()
pytestmark = pytest.mark.skipif(schema is None, reason="tritonclient (the serve extra) is not installed")


@pytest.fixture()
def artifact_with_engine(tiny_artifact: Path, tmp_path: Path) -> Path:
    """The tiny artifact plus a stand-in fp16 engine (bytes and a sidecar, as `make engines` writes on a GPU)."""
    folder = tmp_path / "tiny-deit"
    shutil.copytree(tiny_artifact, folder)
    (folder / "model.fp16.plan").write_bytes(b"stand-in engine")
    sidecar = {"format": SIDECAR_FORMAT, "engine": "model.fp16.plan", "source_onnx": "model.fp16.onnx", "precision": "fp16",
               "tensorrt_version": "10.14", "gpu": {}, "engine_bytes": 15, "engine_sha256": "", "artifact_meta": {},
               "profile": {"input": "pixel_values", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [4, 3, 32, 32]}}
    (folder / "model.fp16.plan.json").write_text(json.dumps(sidecar))
    return folder


def test_every_config_parses_with_tritons_schema_and_names_files_that_exist(
        artifact_with_engine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from google.protobuf import text_format

    assert schema is not None
    out = tmp_path / "model_repository"
    assert main(["--model", str(artifact_with_engine), "--out", str(out), "--max-batch-size", "8"]) == 0
    assert "checked with Triton's schema" in capsys.readouterr().err
    models = sorted(p.name for p in out.iterdir())
    assert models == ["tiny-deit-ort-fp16", "tiny-deit-ort-fp32", "tiny-deit-trt-fp16"]
    platforms = {}
    for name in models:
        config = text_format.Parse((out / name / "config.pbtxt").read_text(), schema.ModelConfig())
        assert config.name == name
        platforms[name] = (config.platform, config.max_batch_size)
        default_file = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}[config.platform]
        assert (out / name / "1" / default_file).is_file()
        (inp,) = config.input
        (output,) = config.output
        assert (inp.name, list(inp.dims)) == ("pixel_values", [3, 32, 32])
        assert (output.name, list(output.dims)) == ("logits", [10])
        assert inp.data_type == output.data_type == schema.TYPE_FP32  # the fp16 files keep fp32 inputs and outputs
        labels = (out / name / output.label_filename).read_text().splitlines()
        assert labels == [f"thing{i}" for i in range(10)]
        assert list(config.dynamic_batching.preferred_batch_size) == preferred_sizes(config.max_batch_size)
        assert config.instance_group[0].kind == schema.ModelInstanceGroup.KIND_GPU
        assert config.version_policy.latest.num_versions == 1
    assert platforms == {"tiny-deit-ort-fp16": ("onnxruntime_onnx", 8), "tiny-deit-ort-fp32": ("onnxruntime_onnx", 8),
                         "tiny-deit-trt-fp16": ("tensorrt_plan", 4)}  # the engine's profile caps its batch
    source = artifact_with_engine / "model.ort.fp16.onnx"
    assert (out / "tiny-deit-ort-fp16" / "1" / "model.onnx").read_bytes() == source.read_bytes()


def test_the_names_are_runtime_serves(tiny_artifact: Path, tmp_path: Path) -> None:
    """A client that sends pixel_values and reads logits (or class_count) works against both servers."""
    from google.protobuf import text_format

    from runtime.backends import create
    from runtime.predictor import Predictor
    from runtime.serve.dataplane import DataPlane
    from runtime.serve.options import ServeOptions

    assert schema is not None and main(["--model", str(tiny_artifact), "--out", str(tmp_path / "repo")]) == 0
    config = text_format.Parse((tmp_path / "repo" / "tiny-deit-ort-fp32" / "config.pbtxt").read_text(), schema.ModelConfig())
    with create("ort-cpu", tiny_artifact, max_batch=2, threads=1) as backend:
        server = DataPlane(Predictor(backend), ServeOptions("tiny-deit", max_batch=2))
        try:
            served = server.config()
        finally:
            server.close()
    assert {i.name for i in config.input} <= {i["name"] for i in served["input"]}
    assert {o.name for o in config.output} <= {o["name"] for o in served["output"]}


def test_bad_arguments_are_usage_errors(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--model", str(tiny_artifact), "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["--model", str(tiny_artifact / "model.onnx"), "--out", str(tmp_path / "r")]) == 2
    with pytest.raises(SystemExit) as info:
        main(["--model", str(tiny_artifact), "--max-batch-size", "0"])
    assert info.value.code == 2


def test_an_artifact_without_runtime_files_is_a_model_error(tiny_artifact: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bare"
    shutil.copytree(tiny_artifact, folder)
    for name in ("model.ort.onnx", "model.ort.fp16.onnx"):
        (folder / name).unlink()
    assert main(["--model", str(folder), "--out", str(tmp_path / "r")]) == 5
    assert "no file Triton can run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_preferred_sizes() -> None:
    assert preferred_sizes(8) == [4, 8]
    assert preferred_sizes(12) == [8, 12]
    assert preferred_sizes(1) == [1]
