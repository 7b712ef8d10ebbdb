"""benchmarks/cpu.py: FLOP counts against published figures, the MatMul ceilings, and the report arithmetic."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.cpu import add_cpu_figures, cpu_report_rows, matmul_ceilings, model_gflop
from runtime.cpuinfo import has_bf16, has_int8_dot_product


def deit(hidden: int, inter: int, distilled: bool = True) -> dict[str, Any]:
    arch = "DeiTForImageClassificationWithTeacher" if distilled else "DeiTForImageClassification"
    return {"model_type": "deit", "architectures": [arch], "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": 12, "image_size": 224, "patch_size": 16, "num_channels": 3,
            "id2label": {str(i): f"c{i}" for i in range(1000)}}


# GMACs per 224x224 image: timm's model cards (deit_*_distilled_patch16_224.fb_in1k) and the DeiT paper's
# Table 1 (DeiT-B, class token only). Published to one decimal, so they bound the count to +-0.05 GMAC.
@pytest.mark.parametrize(("config", "extra", "gmac"), [
    (deit(192, 768), None, 1.3),  # DeiT-Ti distilled
    (deit(384, 1536), None, 4.6),  # DeiT-S distilled
    (deit(768, 3072, distilled=False), 1, 17.6),  # DeiT-B, paper
])
def test_flops_match_published_counts(config: dict[str, Any], extra: int | None, gmac: float) -> None:
    assert model_gflop(config, num_tokens_extra=extra) / 2 == pytest.approx(gmac, abs=0.05)


# Parameter counts of the published checkpoints (timm's model cards for deit_*_patch16_*.fb_in1k, the
# same weights): they pin the architectures the FLOPs below are counted for.
PUBLISHED_PARAMS = {
    "facebook/deit-tiny-patch16-224": 5_717_416, "facebook/deit-small-patch16-224": 22_050_664,
    "facebook/deit-base-patch16-224": 86_567_656, "facebook/deit-base-patch16-384": 86_859_496,
    "facebook/deit-tiny-distilled-patch16-224": 5_910_800, "facebook/deit-small-distilled-patch16-224": 22_436_432,
    "facebook/deit-base-distilled-patch16-224": 87_338_192, "facebook/deit-base-distilled-patch16-384": 87_630_032,
}


@pytest.mark.parametrize("checkpoint", sorted(PUBLISHED_PARAMS))
def test_flops_equal_what_torch_counts_on_the_real_model(checkpoint: str) -> None:
    """The count from the config equals torch.utils.flop_counter's on the transformers model itself (built on the
    meta device: shapes only, no memory, no time), which counts every matmul, linear and convolution it runs."""
    import torch
    import transformers
    from torch.utils.flop_counter import FlopCounterMode

    from runtime.checkpoints import published_config

    config = published_config(checkpoint)
    config._attn_implementation = "eager"  # attention as two matmuls the counter sees
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config).eval()
        pixels = torch.empty(1, 3, config.image_size, config.image_size)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[checkpoint]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=pixels)
    assert model_gflop(config.to_dict()) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-6)


def test_flops_follow_the_shape() -> None:
    small = deit(384, 1536)
    vit = small | {"model_type": "vit", "architectures": ["ViTForImageClassification"]}
    assert model_gflop(vit) < model_gflop(small)  # one special token and one head fewer
    assert model_gflop(small, image_size=384) > 2.9 * model_gflop(small)  # 576 patches instead of 196


def test_ceilings_are_measured_for_each_engine() -> None:
    result = matmul_ceilings(threads=1, size=256, seconds=0.01)
    entries = {(c["engine"], c["dtype"]) for c in result["entries"]}
    assert {("torch", "fp32"), ("onnxruntime", "fp32")} <= entries
    assert (("onnxruntime", "int8") in entries) == has_int8_dot_product()
    assert (("torch", "bf16") in entries) == has_bf16()
    for c in result["entries"]:
        assert c["gflops"] > 0 and c["ms"] > 0 and c["size"] == 256
    assert result["threads"] == 1


def rows() -> list[dict[str, Any]]:
    def row(label: str, backend: str, precision: str, cells: dict[int, float]) -> dict[str, Any]:
        timings = [{"batch_size": b, "median_ms": ms} for b, ms in cells.items()]
        return {"label": label, "backend": backend, "precision": precision, "device": "cpu", "status": "ok",
                "timings": timings}

    return [row("torch-sdpa", "torch-sdpa", "fp32", {1: 100.0, 8: 400.0}),
            row("ort-cpu", "ort-cpu", "fp32", {8: 200.0}),
            row("openvino-cpu-int8", "openvino-cpu", "int8", {8: 80.0}),
            row("openvino-cpu-bf16", "openvino-cpu", "bf16", {8: 100.0}),
            row("trt", "trt", "fp16", {8: 1.0}) | {"device": "cuda"}]


CEILINGS = {"entries": [
    {"engine": "torch", "dtype": "fp32", "gflops": 200.0},
    {"engine": "onnxruntime", "dtype": "fp32", "gflops": 500.0},
    {"engine": "onnxruntime", "dtype": "int8", "gflops": 1000.0},
    {"engine": "openvino", "dtype": "int8", "gflops": 800.0},
]}


def test_report_arithmetic() -> None:
    cells, notes = cpu_report_rows(rows(), CEILINGS, gflop_per_image=10.0)
    by = {(c["label"], c["batch_size"]): c for c in cells}
    assert ("trt", 8) not in by  # GPU rows have no CPU ceiling
    assert by["torch-sdpa", 1]["gflops"] == 100.0 and by["torch-sdpa", 1]["share_of_ceiling"] == 0.2
    assert by["ort-cpu", 8]["gflops"] == 400.0 and by["ort-cpu", 8]["share_of_ceiling"] == 0.8
    assert by["ort-cpu", 8]["ceiling"] == "onnxruntime fp32"
    int8 = by["openvino-cpu-int8", 8]  # against the best int8 ceiling (ORT's 1000 GOP/s), not its own engine's 800
    assert int8["gflops"] == 1000.0 and int8["share_of_ceiling"] == 1.0
    assert by["openvino-cpu-bf16", 8]["share_of_ceiling"] is None  # no bf16 ceiling measured
    assert len(notes) == 1 and "ort-cpu at batch 8" in notes[0] and "80%" in notes[0]


def test_note_names_the_engine_limited_kernel() -> None:
    slow_ort = [r for r in rows() if r["label"] == "torch-sdpa"]  # 200 GFLOP/s at batch 8: all of torch's MatMul
    _, notes = cpu_report_rows(slow_ort, CEILINGS, gflop_per_image=10.0)
    assert "engine-limited" in notes[0] and "torch's fp32 GEMM" in notes[0] and "2.5x" in notes[0]
    overhead = [r | {"timings": [{"batch_size": 8, "median_ms": 800.0}]} for r in slow_ort]  # half of torch's MatMul
    _, notes = cpu_report_rows(overhead, CEILINGS, gflop_per_image=10.0)
    assert "outside the GEMMs" in notes[0]


def test_add_cpu_figures_fills_what_the_report_reads() -> None:
    results = {"model": {"config": deit(384, 1536), "image_size": 224}, "backends": rows(),
               "cpu_ceilings": CEILINGS | {"notes": []}}
    add_cpu_figures(results)
    # DeiT-S distilled: 9.248 GFLOP per image (torch's flop counter, above); 8 images in 200 ms on ort-cpu.
    assert results["gflop_per_image"] == pytest.approx(9.248, abs=1e-3)
    share = results["cpu_efficiency"]["ort-cpu"]["8"]
    assert share["gflops"] == pytest.approx(369.9, abs=0.1) and share["share_of_ceiling"] == pytest.approx(0.74, abs=1e-3)
    assert share["ceiling"] == "onnxruntime fp32"
    assert "openvino-cpu-bf16" not in results["cpu_efficiency"]  # nothing to share: the report shows the ms alone
    assert results["cpu_ceilings"]["notes"]
