"""Shared fixtures: tiny DeiT checkpoints saved like real ones, and artifacts exported from them once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLE_DIR = SHARED / "imagenet-sample"

# A DeiT small enough to export in seconds, shaped like the real thing (two special tokens, heads).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=16)
TINY_PREPROCESSOR = {
    "do_resize": True,
    "size": {"height": 36, "width": 36},
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "resample": 3,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def needs_sample() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason=f"shared ImageNet sample not found at {SAMPLE_DIR}")


def save_tiny_checkpoint(path: Path, kind: str = "distilled", num_labels: int = 10, seed: int = 0) -> Path:
    """A `save_pretrained` folder: DeiT with teacher head ("distilled") or a ViT-type DeiT ("vit")."""
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    labels = {i: f"thing{i}" for i in range(num_labels)}
    if kind == "distilled":
        cfg = DeiTConfig(**TINY, id2label=labels, architectures=["DeiTForImageClassificationWithTeacher"])
        model = DeiTForImageClassificationWithTeacher(cfg)
    else:
        cfg = ViTConfig(**TINY, id2label=labels, architectures=["ViTForImageClassification"])
        model = ViTForImageClassification(cfg)
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(TINY_PREPROCESSOR))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-deit")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """artifacts/tiny-deit exported once per session (fp32 + fp16), verified on photos when present."""
    from export.pipeline import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("artifacts")
    images = SAMPLE_DIR if SAMPLE_DIR.is_dir() else None
    export_checkpoint(ExportOptions(str(tiny_checkpoint), out_root=out, verify_images=images, progress=False))
    return out / "tiny-deit"
