"""Export: real tiny checkpoints through the real exporter, checked in ONNX Runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.pipeline as pipeline
from conftest import SAMPLE_DIR, TINY, needs_sample, save_tiny_checkpoint
from export.__main__ import main as export_main
from export.pipeline import ExportOptions, export_checkpoint
from runtime.artifact import ArtifactError, ArtifactMeta, read_onnx_meta
from runtime.checkpoints import PUBLISHED, load_checkpoint, published_config
from runtime.errors import GateFailed

ROOT = Path(__file__).resolve().parents[1]


def _ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"pixel_values": x})))


def test_fused_export_matches_pytorch_at_any_batch(tiny_artifact: Path, tiny_checkpoint: Path) -> None:
    model_file = tiny_artifact / "model.onnx"
    assert _ops(model_file)["Attention"] == TINY["num_hidden_layers"]
    assert not list(tiny_artifact.glob("*.data")), "the model must be one self-contained file"
    reference = load_checkpoint(str(tiny_checkpoint)).model
    for batch in (1, 3, 9):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = _run(model_file, x)
        assert list(got) == ["logits", "cls_logits", "distillation_logits"]
        with torch.inference_mode():
            want = reference(pixel_values=torch.from_numpy(x))
        for name in got:
            np.testing.assert_allclose(got[name], getattr(want, name).numpy(), atol=1e-5)


def test_metadata_makes_the_artifact_self_describing(tiny_artifact: Path, tiny_checkpoint: Path) -> None:
    meta = read_onnx_meta(tiny_artifact / "model.onnx")
    assert meta.checkpoint == str(tiny_checkpoint)
    assert meta.weights == "pretrained" and not meta.synthetic
    assert meta.architecture == "DeiTForImageClassificationWithTeacher"
    assert meta.preprocessing.input_size == (32, 32) and meta.preprocessing.resize_height == 36
    assert meta.preprocessing.mean == (0.485, 0.456, 0.406)
    assert meta.id2label == [f"thing{i}" for i in range(10)]
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(meta.versions)
    assert read_onnx_meta(tiny_artifact / "model.fp16.onnx").precision == "fp16"
    ort16 = read_onnx_meta(tiny_artifact / "model.ort.fp16.onnx")
    assert ort16.precision == "fp16" and ort16.extra["fused_ops"]["Attention"] == TINY["num_hidden_layers"]

    report = json.loads((tiny_artifact / "export.json").read_text())
    for check in ("fp32_vs_torch", "ort_fp32_vs_torch"):
        fp32 = report["verification"][check]
        assert fp32["max_abs_diff"] <= 1e-4 and fp32["top1_agreement"] == 1.0, check
    assert report["verification"]["ort_fp16_vs_ort_fp32"]["min_cosine"] >= 0.999
    assert report["verification"]["ort_fp16_sln_vs_ort_fp32"]["min_cosine"] >= 0.999
    assert fp32["photos"] == (32 if SAMPLE_DIR.is_dir() else 0)  # CI always has the photos (conftest)
    assert report["files"]["model.onnx"]["bytes"] == (tiny_artifact / "model.onnx").stat().st_size


def test_folder_opens_in_transformers_with_the_same_preprocessing(tiny_artifact: Path) -> None:
    """config.json and preprocessor_config.json beside the ONNX files: transformers/Optimum tools can open the folder."""
    from transformers import AutoConfig
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    from runtime.preprocess import Preprocessing, preprocess

    meta = read_onnx_meta(tiny_artifact / "model.onnx")
    config = AutoConfig.from_pretrained(tiny_artifact)
    assert config.model_type == "deit" and config.hidden_size == TINY["hidden_size"] and config.num_labels == 10
    processor = DeiTImageProcessorPil.from_pretrained(tiny_artifact)
    assert Preprocessing.from_hf_config(processor.to_dict()) == meta.preprocessing
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    want = processor(images=img, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(img, meta.preprocessing), want, atol=1e-5)


def test_metadata_from_another_version(tiny_artifact: Path, tmp_path: Path) -> None:
    """A later version's extra keys are ignored; a missing key is one line naming the file, the key and the writer."""
    model = onnx.load(str(tiny_artifact / "model.onnx"))
    data = json.loads(read_onnx_meta(tiny_artifact / "model.onnx").to_json())
    data["from_the_future"] = {"x": 1}
    newer = tmp_path / "newer.onnx"
    model.metadata_props[-1].value = json.dumps(data)
    onnx.save(model, str(newer))
    assert read_onnx_meta(newer).checkpoint == data["checkpoint"]
    del data["output_names"]
    data["writer"] = "deit-deploy 9.9.9"
    model.metadata_props[-1].value = json.dumps(data)
    older = tmp_path / "broken.onnx"
    onnx.save(model, str(older))
    with pytest.raises(ArtifactError) as err:
        read_onnx_meta(older)
    text = str(err.value)
    assert "\n" not in text and str(older) in text and "output_names" in text and "deit-deploy 9.9.9" in text
    model.metadata_props[-1].value = "{not json"
    onnx.save(model, str(older))
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_onnx_meta(older)
    assert ArtifactMeta.from_json(read_onnx_meta(newer).to_json()).writer.startswith("deit-deploy ")


def test_fp16_model_keeps_float32_io_and_layernorm_in_fp32(tiny_artifact: Path) -> None:
    model = onnx.load(str(tiny_artifact / "model.fp16.onnx"))
    io_types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io_types == {onnx.TensorProto.FLOAT}
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    by_output = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            producer = by_output[node.input[0]]
            assert producer.op_type == "Cast" and producer.attribute[0].i == onnx.TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a, b = _run(tiny_artifact / "model.onnx", x)["logits"], _run(tiny_artifact / "model.fp16.onnx", x)["logits"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.999


def test_decomposed_attention_scales_q_and_k_before_the_first_matmul(tiny_checkpoint: Path, tmp_path: Path) -> None:
    export_checkpoint(ExportOptions(str(tiny_checkpoint), out_root=tmp_path, attention="decomposed", fp16=False, progress=False))
    model = onnx.load(str(tmp_path / "tiny-deit" / "model.onnx"))
    assert model.opset_import[0].version == 18
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Attention"] == 0 and ops["Softmax"] == TINY["num_hidden_layers"]
    by_output = {o: n for n in model.graph.node for o in n.output}
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        node = by_output[softmax.input[0]]
        while node.op_type != "MatMul":  # walk back over Add/Where to the Q.K^T MatMul
            node = by_output[node.input[0]]
        assert {by_output[i].op_type for i in node.input} == {"Mul"}, "Q and K must both be scaled"


def test_vit_type_checkpoint_and_features_task(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "tiny-vit", kind="vit")
    export_checkpoint(ExportOptions(str(ckpt), out_root=tmp_path / "a", fp16=False, progress=False))
    x = np.zeros((2, 3, 32, 32), np.float32)
    assert list(_run(tmp_path / "a" / "tiny-vit" / "model.onnx", x)) == ["logits"]

    export_checkpoint(ExportOptions(str(ckpt), out_root=tmp_path / "f", task="features", fp16=False, progress=False))
    out = _run(tmp_path / "f" / "tiny-vit" / "model.onnx", x)
    assert list(out) == ["embedding"] and out["embedding"].shape == (2, TINY["hidden_size"])


def test_published_configs_are_exact_architectures() -> None:
    assert len(PUBLISHED) == 8
    base = published_config("facebook/deit-base-distilled-patch16-384")
    assert (base.model_type, base.hidden_size, base.num_attention_heads, base.image_size) == ("deit", 768, 12, 384)
    assert PUBLISHED["facebook/deit-base-distilled-patch16-384"].preprocessing.resize_height == 438
    tiny = published_config("facebook/deit-tiny-patch16-224")
    assert (tiny.model_type, tiny.hidden_size, tiny.num_attention_heads) == ("vit", 192, 3)


@pytest.mark.slow
@needs_sample()
def test_full_size_synthetic_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One published architecture at full size, offline, verified on real photos."""
    name = "facebook/deit-tiny-distilled-patch16-224"
    rc = export_main(["--model", name, "--weights", "synthetic", "--out", str(tmp_path), "--verify-images", str(SAMPLE_DIR), "--verify-limit", "8"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "SYNTHETIC" in captured.err
    artifact = tmp_path / "deit-tiny-distilled-patch16-224"
    assert _ops(artifact / "model.onnx")["Attention"] == 12
    meta = read_onnx_meta(artifact / "model.fp16.onnx")
    assert meta.synthetic and meta.id2label == "imagenet-1k" and meta.preprocessing.crop_height == 224
    report = json.loads((artifact / "export.json").read_text())
    assert report["verification"]["fp32_vs_torch"]["photos"] == 8
    assert report["verification"]["fp16_vs_fp32"]["min_cosine"] >= 0.999


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "facebook/deit-huge-patch16-224", "--weights", "synthetic"], "unknown checkpoint"),
        (["--model", "./no/such/folder"], "no such checkpoint folder"),
    ],
)
def test_bad_sources_give_one_line_errors(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main([*args, "--out", str(tmp_path), "--no-progress"]) == 5
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_non_deit_and_corrupt_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "bert")
    assert export_main(["--model", str(tmp_path / "bert"), "--out", str(tmp_path / "out")]) == 5
    assert "not a DeiT checkpoint (model_type='bert')" in capsys.readouterr().err

    corrupt = save_tiny_checkpoint(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"this is not a safetensors file")
    capsys.readouterr()
    assert export_main(["--model", str(corrupt), "--out", str(tmp_path / "out")]) == 5
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot load weights" in err

    (corrupt / "config.json").write_text("{not json")
    assert export_main(["--model", str(corrupt), "--out", str(tmp_path / "out")]) == 5
    assert "unreadable config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(("model", "hint"), [("facebook/deit-tiny-patch16-224", "--weights synthetic"),
                                             ("someone/their-deit-finetune", "local save_pretrained folder")])
def test_unreachable_hub_exits_3(model: str, hint: str, tmp_path: Path) -> None:
    """Offline and nothing cached, for published and other hub ids alike. huggingface_hub reads its
    settings at import, so this runs the CLI in a fresh process with an empty cache."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    proc = subprocess.run([sys.executable, "-m", "export", "--model", model, "--out", str(tmp_path / "out"), "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("export: error: ") and hint in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_verification_writes_nothing_and_keeps_the_previous_artifact(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_checkpoint(ExportOptions(str(tiny_checkpoint), out_root=tmp_path, fp16=False, progress=False))
    before = (tmp_path / "tiny-deit" / "model.onnx").read_bytes()
    monkeypatch.setattr(pipeline, "FP32_MAX_ABS_DIFF", -1.0)  # no export can pass this gate
    with pytest.raises(GateFailed, match="verification failed") as err:
        export_checkpoint(ExportOptions(str(tiny_checkpoint), out_root=tmp_path, progress=False))
    assert err.value.exit_code == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-deit"], "no staging leftovers"
    assert sorted(p.name for p in (tmp_path / "tiny-deit").iterdir()) == [
        "config.json", "export.json", "model.onnx", "model.ort.fp16-sln.onnx", "model.ort.fp16.onnx", "model.ort.onnx",
        "preprocessor_config.json"]
    assert (tmp_path / "tiny-deit" / "model.onnx").read_bytes() == before


def test_child_peak_memory_is_that_childs_own(tmp_path: Path) -> None:
    """wait4 reports the peak of the one child measured, not the maximum over every child (RUSAGE_CHILDREN)."""
    from benchmarks.export_time import run_measured

    big = run_measured([sys.executable, "-c", "b = b'x' * (400 * 2**20)"])
    small = run_measured([sys.executable, "-c", "pass"])
    assert big[0] == small[0] == 0
    # KiB. The small child is the baseline (the interpreter alone): the big one is it plus the 400 MiB it touched,
    # and the small one, measured after it, is not the big one's peak (that would make the difference zero).
    assert big[2] - small[2] == pytest.approx(400 * 1024, rel=0.1), (big, small)


def test_export_time_benchmark_reports_time_and_memory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from benchmarks.export_time import measure_export, run_measured

    result = measure_export(str(tiny_checkpoint), "pretrained", None, tmp_path)
    assert result["wall_s"] > result["steps_s"]["export"] > 0
    # The baseline: a child that only loads the libraries the export uses. A tiny model adds little to them.
    libraries_kib = run_measured([sys.executable, "-c", "import torch, transformers, onnx, onnxruntime"])[2]
    assert libraries_kib / 1024 < result["peak_rss_mib"] < 3 * libraries_kib / 1024, (result["peak_rss_mib"], libraries_kib)
    assert result["verification"]["fp32_vs_torch"]["max_abs_diff"] <= 1e-4


def test_the_fp16_skip_layer_norm_variant_runs_skip_layer_norm_in_fp16(tiny_artifact: Path) -> None:
    """model.ort.fp16-sln.onnx: the same fused graph with SkipLayerNormalization in fp16 (fewer Casts), verified."""

    def sln_scale_types(path: Path) -> tuple[set[int], int]:
        """The element types of the SkipLayerNormalization scales (initializers, or Casts of them) and the number of Casts."""
        model = onnx.load(str(path))
        inits = {i.name: i.data_type for i in model.graph.initializer}
        inits |= {n.output[0]: onnx.helper.get_attribute_value(n.attribute[0]) for n in model.graph.node if n.op_type == "Cast"}
        slns = [n for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
        assert len(slns) == 2 * TINY["num_hidden_layers"]
        return {inits[n.input[2]] for n in slns}, sum(n.op_type == "Cast" for n in model.graph.node)

    kept, casts_kept = sln_scale_types(tiny_artifact / "model.ort.fp16.onnx")
    sln, casts_sln = sln_scale_types(tiny_artifact / "model.ort.fp16-sln.onnx")
    assert kept == {onnx.TensorProto.FLOAT} and sln == {onnx.TensorProto.FLOAT16}
    assert casts_sln < casts_kept
    meta = read_onnx_meta(tiny_artifact / "model.ort.fp16-sln.onnx")
    assert meta.precision == "fp16" and meta.extra["fp32_ops"] == []
