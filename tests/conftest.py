"""Shared fixtures: tiny DeiT checkpoints saved like real ones, artifacts exported from them once, and a
tiny DeiT trained (in seconds) on a synthetic 4-class image task, for tests that need real accuracy."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

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
PER_CLASS = 90  # images per class of the pattern task


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI the shared photos exist: tests that need them must run there, not skip."""
    if os.environ.get("CI") and not SAMPLE_DIR.is_dir():
        raise pytest.UsageError(f"CI is set but the shared ImageNet sample is missing at {SAMPLE_DIR}")


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


@pytest.fixture(scope="session")
def tiny_int8_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `tiny_artifact` with a Q/DQ `model.int8.onnx` placed the way `python -m calibration` places it
    (plan_qdq, per-channel weights, per-tensor activations from max calibration on random batches)."""
    import shutil

    import onnx

    from calibration.quantize import amax_table, collect_stats, insert_qdq, plan_qdq
    from runtime.artifact import MODEL_FILES, read_onnx_meta, set_onnx_meta

    folder = tmp_path_factory.mktemp("int8") / tiny_artifact.name
    shutil.copytree(tiny_artifact, folder)
    model = onnx.load(str(folder / MODEL_FILES["fp32"]))
    plan = plan_qdq(model)
    h, w = read_onnx_meta(folder / MODEL_FILES["fp32"]).preprocessing.input_size
    batches = [np.random.default_rng(seed).standard_normal((16, 3, h, w)).astype(np.float32) for seed in range(100, 104)]
    amax = amax_table(collect_stats(model, plan.activations, batches, progress=False), "max")
    quantized = insert_qdq(model, plan, amax)
    set_onnx_meta(quantized, read_onnx_meta(folder / MODEL_FILES["fp32"]).copy(precision="int8"))
    onnx.save(quantized, str(folder / MODEL_FILES["int8"]))
    return folder


def pattern(kind: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A bright blob in quadrant `kind` over a dark striped background, random colours and noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    half = size // 2
    cy = rng.uniform(5, half - 5) + half * (kind // 2)
    cx = rng.uniform(5, half - 5) + half * (kind % 2)
    r = rng.uniform(3, 7)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * rng.uniform(-1, 1) + yy) / rng.uniform(4, 9))[..., None]
    background = stripes * rng.uniform(0, 110, 3) + (1 - stripes) * rng.uniform(0, 110, 3)
    img = blob * rng.uniform(150, 255, 3) + (1 - blob) * background + rng.normal(0, 10, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def pattern_wnids() -> list[str]:
    from runtime.labels import imagenet_classes

    return [wnid for wnid, _ in imagenet_classes()[:4]]  # class folders named like ImageNet's first 4 classes


@pytest.fixture(scope="session")
def pattern_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet train-style folder: <wnid>/<n>.png, PER_CLASS images per class."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(pattern_wnids()):
        (root / wnid).mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(pattern(label, rng)).save(root / wnid / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def trained_artifact(pattern_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DeiT (both heads) trained on the patterns, saved and exported.

    The recipe converges with a wide margin (100% training accuracy by step 600 of 1200 for every
    seed and thread count tried): a one-cycle learning rate that decays to zero ends in a stable
    minimum instead of wherever a constant rate happened to oscillate to. Training runs on one
    thread (restored afterwards), so the trained weights do not depend on the machine's thread count.
    """
    import torch
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    from calibration.data import discover
    from export.pipeline import ExportOptions, export_checkpoint
    from runtime.decode import load_and_preprocess
    from runtime.preprocess import Preprocessing

    spec = Preprocessing.from_hf_config(TINY_PREPROCESSOR)
    samples = discover(pattern_dir)
    x = torch.from_numpy(np.stack([load_and_preprocess(s.path, spec) for s in samples]))
    y = torch.tensor([s.label for s in samples])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        labels = dict(enumerate(pattern_wnids()))
        cfg = DeiTConfig(**cast(dict[str, Any], TINY), id2label=labels, architectures=["DeiTForImageClassificationWithTeacher"])
        model = DeiTForImageClassificationWithTeacher(cfg)
        steps = 1200
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            out = model(pixel_values=x[idx])
            loss = torch.nn.functional.cross_entropy(out.cls_logits, y[idx]) + torch.nn.functional.cross_entropy(
                out.distillation_logits, y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    ckpt = tmp_path_factory.mktemp("trained") / "patterns-deit"
    model.save_pretrained(ckpt)
    (ckpt / "preprocessor_config.json").write_text(json.dumps(TINY_PREPROCESSOR))
    out_root = tmp_path_factory.mktemp("trained-artifacts")
    export_checkpoint(ExportOptions(str(ckpt), out_root=out_root, fp16=False, progress=False))
    return out_root / "patterns-deit"


def photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def stalling_file(path: Path, size: int = 2 * 2**30) -> Path:
    """A sparse file behind a JPEG header: Pillow scans it for markers a byte at a time (minutes for 2 GiB)."""
    with path.open("wb") as f:
        f.write(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        f.truncate(size)
    return path


def first_record(partial: Path, proc: subprocess.Popen[str]) -> None:
    """Wait until the run has written a record to its partial output: the sign it is running with its handlers set."""
    while proc.poll() is None:
        if partial.is_file() and partial.read_text().count("\n") >= 2:  # CSV header and one record
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended before writing a record: {proc.communicate()}")


def photo_bytes(seed: int, fmt: str = "PNG") -> bytes:
    """A small encoded photo, different for each seed: what a client uploads."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)).resize((60, 45), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def predictor_answers(artifact: Path, folder: Path) -> tuple[list[Path], list[Any], np.ndarray, np.ndarray]:
    """Three photos (PNG, JPEG, WebP) written to `folder`, and what the project's predictor answers for them
    (records, pixels, logits): the reference a server's answers must equal, whatever the protocol."""
    from runtime.backends import create
    from runtime.classify import ClassifyOptions, classify
    from runtime.decode import load_and_preprocess
    from runtime.predictor import Predictor

    files = []
    for i, fmt in enumerate(["PNG", "JPEG", "WEBP"]):
        files.append(folder / f"p{i}.{fmt.lower()}")
        files[-1].write_bytes(photo_bytes(i, fmt))
    with create("ort-cpu", artifact, max_batch=4, threads=1) as backend:
        predictor = Predictor(backend, 5)
        expected: list[Any] = []
        classify(files, predictor, ClassifyOptions(workers=1), expected.append)
        pixels = np.stack([load_and_preprocess(f, predictor.spec) for f in files])
        logits = backend.infer(pixels)["logits"]
    return files, expected, pixels, logits
