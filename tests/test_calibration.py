"""Calibration on a tiny DeiT trained (for a few seconds) on a synthetic 4-class image task (where is the blob).

Random weights give near-tied logits where any quantization noise flips the top-1, so the accuracy
gate is exercised on a model with trained statistics: its int8 versions must keep top-1 accuracy
within 1 point of fp32 and agree with fp32 on >= 98% of held-out images.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

import calibration.pipeline as pipeline
from calibration.__main__ import main as calibration_cli
from calibration.data import DataError, balanced_order, discover, load_batch
from calibration.pipeline import CalibrationOptions, calibrate
from calibration.quantize import AbsHistogram, insert_qdq, plan_qdq
from conftest import TINY, TINY_PREPROCESSOR, pattern_wnids
from runtime.artifact import INT8_CPU_FILE, MODEL_FILES, read_onnx_meta
from runtime.backends.auto import int8_gate_passed
from runtime.backends.onnxruntime import ORT_CPU, ORT_TRT
from runtime.backends.trt import INT8_TRT_FILE
from runtime.errors import UsageError
from runtime.decode import load_and_preprocess
from runtime.preprocess import Preprocessing

WNIDS = pattern_wnids()


@pytest.fixture(scope="session")
def calibrated(trained_artifact: Path, pattern_dir: Path) -> dict:
    opts = CalibrationOptions(trained_artifact, pattern_dir, num_images=64, num_eval=280, compare_methods=True,
                              min_agreement=0.98, progress=False)
    return calibrate(opts)


def test_int8_keeps_the_trained_models_accuracy(calibrated: dict, trained_artifact: Path) -> None:
    assert calibrated["passed"], calibrated["gate"]
    results = {**calibrated["accuracy"], **{f"method {m}": r for m, r in calibrated["method_comparison"].items()}}
    for name, acc in results.items():
        assert acc["fp32_top1"] >= 0.9, f"the fixture model did not learn the task ({acc['fp32_top1']:.1%})"
        assert acc["top1_drop"] <= 0.01, f"{name}: top-1 {acc['fp32_top1']:.1%} -> {acc['int8_top1']:.1%}"
        assert acc["top1_agreement"] >= 0.98, f"{name}: agreement {acc['top1_agreement']:.1%}"
    cal, ev = calibrated["calibration_images"], calibrated["evaluation_images"]
    assert cal["used"] == 64 and cal["classes"] == 4 and ev["used"] == 280
    assert not set(cal["files"]) & set(ev["files"]), "evaluation images overlap the calibration images"
    assert Counter(Path(f).parent.name for f in cal["files"]) == {w: 16 for w in WNIDS}  # class-balanced
    assert set(calibrated["accuracy"]) == {MODEL_FILES["int8"], INT8_TRT_FILE, INT8_CPU_FILE}
    for name in calibrated["accuracy"]:
        meta = read_onnx_meta(trained_artifact / name)
        assert meta.precision == "int8" and meta.extra["quantization"]["accuracy"] == calibrated["accuracy"][name]
    written = json.loads((trained_artifact / "calibration.json").read_text())
    assert written["accuracy"] == calibrated["accuracy"]


def test_qdq_model_is_symmetric_per_channel_and_placed_for_tensorrt(calibrated: dict, trained_artifact: Path) -> None:
    model = onnx.load(str(trained_artifact / MODEL_FILES["int8"]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    produced_by = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[node.input[2]].dtype == np.int8 and not inits[node.input[2]].any()  # symmetric int8
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            kinds = [produced_by[i].op_type if i in produced_by else "initializer" for i in node.input[:2]]
            assert kinds == ["DequantizeLinear", "DequantizeLinear"], f"{node.name} inputs: {kinds}"
            weight_scale = inits[produced_by[node.input[1]].input[1]]
            assert weight_scale.ndim == 1 and weight_scale.size > 1  # per output channel
        if node.op_type in ("LayerNormalization", "Gelu", "Softmax", "Add", "Attention"):
            assert all(produced_by.get(i) is None or produced_by[i].op_type != "DequantizeLinear" for i in node.input), node.name


def test_the_tensorrt_int8_file_keeps_fp16_not_fp32_where_it_is_not_quantized(calibrated: dict, trained_artifact: Path) -> None:
    """A strongly typed TensorRT network runs each layer without Q/DQ in the graph's own type: the engine's source
    is the Q/DQ graph with fp16 as the high-precision type (LayerNorm fp32, as in model.fp16.onnx), the same
    quantized tensors, and it is checked against fp32 on the CPU like the other int8 files."""
    fp32_qdq = onnx.load(str(trained_artifact / MODEL_FILES["int8"]))
    trt_qdq = onnx.load(str(trained_artifact / INT8_TRT_FILE))
    ops = lambda m: Counter(n.op_type for n in m.graph.node)  # noqa: E731
    for op in ("QuantizeLinear", "DequantizeLinear", "MatMul", "Attention", "Gelu"):
        assert ops(trt_qdq)[op] == ops(fp32_qdq)[op], op
    types = {i.name: i.data_type for i in trt_qdq.graph.initializer}
    scales = {n.input[1] for n in trt_qdq.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert {types[s] for s in scales} == {onnx.TensorProto.FLOAT16}
    layer_norm_params = {i for n in trt_qdq.graph.node if n.op_type == "LayerNormalization" for i in n.input[1:]}
    floats = {name for name, t in types.items() if t == onnx.TensorProto.FLOAT}
    assert floats <= layer_norm_params, floats - layer_norm_params
    assert [i.type.tensor_type.elem_type for i in trt_qdq.graph.output][0] == onnx.TensorProto.FLOAT  # fp32 I/O
    acc = calibrated["accuracy"][INT8_TRT_FILE]
    assert acc["top1_agreement"] >= 0.98 and acc["top1_drop"] <= 0.01, acc
    assert read_onnx_meta(trained_artifact / INT8_TRT_FILE).extra["quantization"]["file_role"] == "tensorrt-qdq"


def test_decomposed_attention_quantizes_both_attention_matmuls(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from export.pipeline import ExportOptions, export_checkpoint

    export_checkpoint(ExportOptions(str(tiny_checkpoint), out_root=tmp_path, attention="decomposed", fp16=False, progress=False))
    model = onnx.load(str(tmp_path / "tiny-deit" / MODEL_FILES["fp32"]))
    inits = {i.name for i in model.graph.initializer}
    attention_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & inits]
    assert len(attention_matmuls) == 2 * TINY["num_hidden_layers"]
    plan = plan_qdq(model)
    for node in attention_matmuls:  # Q x K^T and probabilities x V (softmax output, via the exporter's IsNaN/Where)
        assert set(node.input) <= set(plan.activations)
    softmax_inputs = {n.input[0] for n in model.graph.node if n.op_type in ("Softmax", "LayerNormalization")}
    assert not softmax_inputs & set(plan.activations)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    quantized = insert_qdq(model, plan, {t: 4.0 for t in plan.activations})
    onnx.checker.check_model(quantized)
    import onnxruntime as ort

    out = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
    logits = np.asarray(out[0])
    assert np.all(np.isfinite(logits)) and logits.shape == (4, 10)


def test_ort_cpu_int8_prefers_the_cpu_variant_and_ort_trt_gets_the_qdq_file(
    calibrated: dict, trained_artifact: Path, pattern_dir: Path
) -> None:
    assert ORT_CPU.model_file_for(trained_artifact, "int8").name == INT8_CPU_FILE
    # Regression: ort-trt used to inherit ort-cpu's preference and was handed the CPU dynamic-quant file.
    assert ORT_TRT.model_file_for(trained_artifact, "int8").name == INT8_TRT_FILE
    spec = read_onnx_meta(trained_artifact / MODEL_FILES["fp32"]).preprocessing
    x = np.stack([load_and_preprocess(pattern_dir / w / "089.png", spec) for w in WNIDS])
    with ORT_CPU(trained_artifact, precision="int8") as backend:
        assert backend.meta.precision == "int8" and backend.model_file.name == INT8_CPU_FILE
        assert list(backend.infer(x)["logits"].argmax(1)) == [0, 1, 2, 3]
    assert int8_gate_passed(trained_artifact), "280 evaluation images: the gate applied and passed"


def _copy_artifact(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in (MODEL_FILES["fp32"], "export.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_gate_failure_writes_nothing_and_cli_says_why(trained_artifact: Path, pattern_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    artifact = _copy_artifact(trained_artifact, tmp_path / "a")
    argv = ["--model", str(artifact), "--calib-dir", str(pattern_dir), "--num-images", "16", "--num-eval", "120",
            "--no-progress"]
    old_engine = [artifact / "model.int8.plan", artifact / "model.int8.plan.json"]  # built from an earlier calibration
    for path in old_engine:
        path.write_text("old scales")
    real = pipeline.compare

    def disagreeing(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], *args: Any) -> dict:
        return real(fp32, {k: np.roll(v, 1, axis=1) for k, v in int8.items()}, *args)  # every int8 top-1 moves

    monkeypatch.setattr(pipeline, "compare", disagreeing)
    assert calibration_cli(argv) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("calibration: error: accuracy gate failed") and "nothing written" in err[-1]
    assert sorted(p.name for p in artifact.iterdir()) == sorted([".calib-cache", "export.json", MODEL_FILES["fp32"],
                                                                 "model.int8.plan", "model.int8.plan.json"])
    monkeypatch.setattr(pipeline, "compare", real)
    assert calibration_cli(argv + ["--min-agreement", "0.9", "--method", "percentile"]) == 0
    out = capsys.readouterr().out
    assert "from cache" in out and "gate: agreement >= 90.00%: passed" in out
    assert (artifact / MODEL_FILES["int8"]).is_file() and (artifact / INT8_CPU_FILE).is_file()
    assert not any(path.exists() for path in old_engine), "an engine of the old scales would still run"


def test_few_evaluation_images_make_the_gate_say_it_is_not_meaningful(trained_artifact: Path, pattern_dir: Path,
                                                                      tmp_path: Path) -> None:
    artifact = _copy_artifact(trained_artifact, tmp_path / "few")
    report = calibrate(CalibrationOptions(artifact, pattern_dir, num_images=8, num_eval=2, cpu_variant=False,
                                          cache=False, progress=False))
    assert report["evaluation_images"]["used"] == 2
    assert report["gate"]["applied"] is False and "only 2 evaluation images" in report["gate"]["not_applied_because"]
    assert not int8_gate_passed(artifact), "auto must not trust an int8 file gated on 2 images"


@pytest.mark.parametrize(("flag", "value"), [("--min-agreement", "7"), ("--min-agreement", "-0.1"), ("--percentile", "0"),
                                             ("--percentile", "150"), ("--num-images", "0")])
def test_out_of_range_values_are_usage_errors(flag: str, value: str, pattern_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        calibration_cli(["--calib-dir", str(pattern_dir), flag, value])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and err.startswith(f"calibration: error: {flag}")
    with pytest.raises(UsageError):
        CalibrationOptions(Path("."), pattern_dir, min_agreement=7.0)


def test_missing_folders_are_one_line_usage_errors(trained_artifact: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        calibration_cli(["--model", str(trained_artifact), "--calib-dir", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and "nope: no such folder" in err


def test_layouts_labels_and_balanced_sampling(tmp_path: Path) -> None:
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    flat = tmp_path / "val"
    flat.mkdir()
    for i in range(6):
        img.save(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    (flat / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_{i:08d},{WNIDS[i % 3]} 1 2 3 4\n" for i in range(6)))
    assert [s.label for s in discover(flat)] == [0, 1, 2, 0, 1, 2]
    named = tmp_path / "named"
    named.mkdir()
    for i, wnid in enumerate(WNIDS):
        img.save(named / f"{wnid}_thing{i}.JPEG")
    img.save(named / "holiday.png")
    assert sorted((s.path.name[:9], s.label) for s in discover(named)) == sorted([("holiday.p", None)] + [(w, i) for i, w in enumerate(WNIDS)])
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg notaclass\n")
    with pytest.raises(DataError, match="bad.txt:1: 'notaclass'"):
        discover(named, bad)
    samples = discover(flat)
    first, again = balanced_order(samples, seed=3), balanced_order(samples, seed=3)
    assert first == again and {s.label for s in first[:3]} == {0, 1, 2}
    assert not {s.path for s in balanced_order(samples, 3, exclude={s.path for s in first[:2]})} & {s.path for s in first[:2]}


def test_unreadable_files_are_skipped_with_names(tmp_path: Path, tiny_artifact: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "notes.png").write_text("not a picture")
    spec = Preprocessing.from_hf_config(TINY_PREPROCESSOR)
    batch = load_batch(balanced_order(discover(folder), 0), 4, spec, cache_dir=None, progress=False)
    assert len(batch.files) == 3 and batch.x.shape == (3, 3, 32, 32) and not batch.labelled
    assert sorted(Path(f).name for f in batch.skipped) == ["broken.jpg", "notes.png"]
    for i in range(3):
        (folder / f"ok{i}.png").unlink()
    with pytest.raises(DataError, match=r"photos: no usable calibration images \(2 unreadable\)") as err:
        calibrate(CalibrationOptions(tiny_artifact, folder, cache=False, progress=False))
    assert err.value.exit_code == 2


def test_histogram_methods_clip_outliers() -> None:
    rng = np.random.default_rng(0)
    h = AbsHistogram()
    for _ in range(4):
        h.add(rng.standard_normal(50_000).astype(np.float32))
    h.add(np.array([40.0], np.float32))  # one outlier grows the histogram 10x
    assert h.amax_for("max") == 40.0
    assert 3.5 < h.amax_for("percentile", 99.99) < 4.5
    assert 2.0 < h.amax_for("entropy") < 6.0
    with pytest.raises(ValueError, match="unknown calibration method"):
        h.amax_for("mse")
