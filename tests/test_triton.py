"""`python -m export.triton`: every config.pbtxt parses with Triton's own protobuf schema and names files
that exist, with runtime.serve's tensor names; a TensorRT model declares every tensor its engine has; the
command writes only inside --out and never replaces a folder it did not write. (Triton itself cannot run
here: no GPU, no server binary; the engine is plan bytes with the sidecar `make engines` writes.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.triton import main, preferred_sizes, triton_schema
from gpu_fakes import TRT_VERSION, fake_engine
from runtime.backends.trt import read_sidecar

schema = triton_schema()
pytestmark = pytest.mark.skipif(schema is None, reason="tritonclient (the serve extra) is not installed")


@pytest.fixture()
def artifact_with_engine(tiny_artifact: Path, tmp_path: Path) -> Path:
    """The tiny artifact plus a stand-in fp16 engine (bytes and a sidecar, as `make engines` writes on a GPU)."""
    folder = tmp_path / "tiny-deit"
    shutil.copytree(tiny_artifact, folder)
    fake_engine(folder, "fp16", max_batch=4)
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
        output = config.output[0]
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
    from runtime.serve import ModelServer, ServeOptions

    assert schema is not None and main(["--model", str(tiny_artifact), "--out", str(tmp_path / "repo")]) == 0
    config = text_format.Parse((tmp_path / "repo" / "tiny-deit-ort-fp32" / "config.pbtxt").read_text(), schema.ModelConfig())
    with create("ort-cpu", tiny_artifact, max_batch=2, threads=1) as backend:
        server = ModelServer(Predictor(backend), ServeOptions("tiny-deit", max_batch=2))
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


def test_a_tensorrt_model_declares_every_tensor_of_its_engine(artifact_with_engine: Path, tmp_path: Path) -> None:
    """Triton's TensorRT backend refuses a config that leaves out an engine I/O tensor ("expected configuration for
    output ..."): a distilled DeiT's engine has cls_logits and distillation_logits beside logits."""
    from google.protobuf import text_format

    assert schema is not None
    out = tmp_path / "repo"
    assert main(["--model", str(artifact_with_engine), "--out", str(out)]) == 0
    engine = read_sidecar(artifact_with_engine / "model.fp16.plan")
    assert {t.name for t in engine.io if t.mode == "output"} >= {"logits", "cls_logits", "distillation_logits"}
    config = text_format.Parse((out / "tiny-deit-trt-fp16" / "config.pbtxt").read_text(), schema.ModelConfig())
    declared = {(t.name, tuple(t.dims)) for t in [*config.input, *config.output]}
    assert declared == {(t.name, t.shape[1:]) for t in engine.io}


def test_each_config_says_which_triton_can_load_it(artifact_with_engine: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "repo"
    assert main(["--model", str(artifact_with_engine), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    plan_needs = f"TensorRT is {TRT_VERSION}"
    assert plan_needs in (out / "tiny-deit-trt-fp16" / "config.pbtxt").read_text().split("\nname:")[0]
    assert "ONNX Runtime 1.23 or newer" in (out / "tiny-deit-ort-fp16" / "config.pbtxt").read_text().split("\nname:")[0]
    assert f"tiny-deit-trt-fp16: a TensorRT plan: loads only in a Triton whose {plan_needs}" in err
    assert "tiny-deit-ort-fp32: ONNX opset 23: needs a Triton whose onnxruntime backend has ONNX Runtime 1.23" in err


@pytest.mark.parametrize("name", ["../x", "", ".hidden", "a/b", 'x"y', "x'y", "-x", "a b"])
def test_a_name_that_is_not_a_plain_model_name_is_refused(tiny_artifact: Path, tmp_path: Path, name: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    assert main(["--model", str(tiny_artifact), "--out", str(out), f"--name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--name" in err and "not a plain model name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"] and not list(out.iterdir())


def test_a_model_folder_it_did_not_write_is_kept(tiny_artifact: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-edited config.pbtxt, or a folder without our marker, is kept and the run stops (exit 2) naming it;
    --force replaces it. A folder it wrote and nobody touched is simply rewritten."""
    out = tmp_path / "repo"
    args = ["--model", str(tiny_artifact), "--out", str(out)]
    assert main(args) == 0 and main(args) == 0  # its own, unchanged: rewritten
    config = out / "tiny-deit-ort-fp16" / "config.pbtxt"
    edited = config.read_text().replace("max_batch_size: 8", "max_batch_size: 2")
    config.write_text(edited)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err and "--force" in err
    assert config.read_text() == edited
    handmade = out / "tiny-deit-ort-fp32"
    shutil.rmtree(handmade)
    (handmade / "1").mkdir(parents=True)
    (handmade / "config.pbtxt").write_text('name: "tiny-deit-ort-fp32"\n')
    assert main(args) == 2 and config.read_text() == edited
    assert main([*args, "--force"]) == 0
    assert "max_batch_size: 8" in config.read_text() and "max_batch_size: 8" in (handmade / "config.pbtxt").read_text()
