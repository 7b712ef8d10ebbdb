"""The project's preprocessing against transformers' own image processors, on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_DIR, needs_sample
from runtime.checkpoints import PUBLISHED
from runtime.decode import load_image
from runtime.inputs import list_images
from runtime.preprocess import Preprocessing, preprocess


def _hf_processor(spec: Preprocessing):  # type: ignore[no-untyped-def]
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    crop = spec.crop_height is not None
    return DeiTImageProcessorPil(
        size={"height": spec.resize_height, "width": spec.resize_width},
        do_center_crop=crop,
        crop_size={"height": spec.crop_height, "width": spec.crop_width} if crop else None,
        resample=spec.resample,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        do_convert_rgb=True,
    )


def _photos(every: int) -> list:  # type: ignore[type-arg]
    paths = list_images([SAMPLE_DIR])
    gray = [p for p in paths if Image.open(p).mode != "RGB"]
    return sorted(set(paths[::every]) | set(gray))


@needs_sample()
@pytest.mark.parametrize("checkpoint", sorted(PUBLISHED))
def test_matches_transformers_image_processor(checkpoint: str) -> None:
    spec = PUBLISHED[checkpoint].preprocessing
    hf = _hf_processor(spec)
    # Every photo for the default checkpoint, a spread plus every grayscale one for the rest.
    paths = _photos(1 if checkpoint == "facebook/deit-base-distilled-patch16-224" else 25)
    assert any(Image.open(p).mode == "L" for p in paths), "the sample's grayscale photos must be covered"
    worst = 0.0
    for path in paths:
        with Image.open(path) as img:
            want = hf(images=img, return_tensors="np")["pixel_values"][0]
        got = preprocess(load_image(path), spec)
        assert got.shape == want.shape == (3, *spec.input_size)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-5, f"{checkpoint}: max abs difference {worst}"


@pytest.mark.parametrize("checkpoint", sorted(PUBLISHED))
def test_the_published_table_matches_the_published_recipes(checkpoint: str) -> None:
    """Each row of the offline table against the recipes the checkpoints were published with, not against itself.

    Distilled checkpoints (converted by transformers' `convert_deit_timm_to_pytorch.py`): resize to
    int(256 / 224 * input size) bicubic, centre crop to the input size, ImageNet mean/std (transformers'
    own constants). The others are stored as ViT feature-extractor configs: a square bilinear resize to the
    input size, no crop, mean/std 0.5. The input size is the one the checkpoint's config states.
    """
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_STANDARD_MEAN

    from runtime.checkpoints import published_config

    spec, config = PUBLISHED[checkpoint].preprocessing, published_config(checkpoint)
    size = int(config.image_size)
    assert spec.input_size == (size, size)
    if config.model_type == "deit":
        resize = int(256 / 224 * size)
        assert (spec.resize_height, spec.resize_width, spec.crop_height, spec.crop_width) == (resize, resize, size, size)
        assert spec.resample == Image.Resampling.BICUBIC
        assert spec.mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and spec.std == pytest.approx(IMAGENET_DEFAULT_STD)
    else:
        assert (spec.resize_height, spec.resize_width, spec.crop_height) == (size, size, None)
        assert spec.resample == Image.Resampling.BILINEAR
        assert spec.mean == pytest.approx(IMAGENET_STANDARD_MEAN) and spec.std == pytest.approx(IMAGENET_STANDARD_MEAN)


def test_configs_are_read_in_both_styles_as_transformers_writes_them() -> None:
    """What `from_hf_config` reads is what transformers' processors write, old (int sizes) and new (dict) style."""
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil

    new_style = DeiTImageProcessorPil(size={"height": 438, "width": 438}, crop_size={"height": 384, "width": 384},
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).to_dict()
    spec = Preprocessing.from_hf_config(new_style)
    assert (spec.resize_height, spec.crop_height, spec.resample) == (438, 384, Image.Resampling.BICUBIC)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    old_style = Preprocessing.from_hf_config({"size": 224, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    assert (old_style.resize_height, old_style.resize_width, old_style.crop_height, old_style.resample) == (224, 224, None, 2)
    assert Preprocessing.from_dict(spec.to_dict()) == spec and Preprocessing.from_dict(old_style.to_dict()) == old_style


def test_a_flat_colour_becomes_its_normalised_value_in_channel_order() -> None:
    """Independent of any resize or crop, a flat colour is (value / 255 - mean) / std per channel, in RGB order."""
    spec = PUBLISHED["facebook/deit-small-distilled-patch16-224"].preprocessing
    rgb = np.array([250, 10, 128])
    got = preprocess(Image.new("RGB", (300, 200), tuple(int(v) for v in rgb)), spec)
    want = (rgb / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got.reshape(3, -1), np.repeat(want[:, None], 224 * 224, axis=1), atol=1e-5)


def test_pictures_smaller_than_the_crop_are_zero_padded_like_transformers() -> None:
    """A resize smaller than the crop (a checkpoint may say so) pads before cropping, as transformers does."""
    spec = Preprocessing(resize_height=28, resize_width=26, crop_height=32, crop_width=32, resample=3,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    got = preprocess(img, spec)
    want = _hf_processor(spec)(images=img, return_tensors="np")["pixel_values"][0]
    assert got.shape == want.shape == (3, 32, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    border = (0 - np.asarray(spec.mean)) / np.asarray(spec.std)  # a zero pixel, normalised
    np.testing.assert_allclose(got[:, 0, 0], border, atol=1e-6)  # the corner is padding


def test_a_published_checkpoints_own_preprocessor_config_wins_over_the_table(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's preprocessor_config.json (from the Hub) is used; the table is the offline fallback, and
    a disagreement is one warning line naming both values."""
    import runtime.checkpoints as checkpoints

    name = "facebook/deit-base-patch16-224"
    table = PUBLISHED[name].preprocessing
    own = tmp_path / "preprocessor_config.json"
    asked: list[str] = []

    def hub_file(repo: str, filename: str) -> Path | None:
        asked.append(repo)
        return own if own.exists() else None

    monkeypatch.setattr(checkpoints, "_hub_file", hub_file)
    config = checkpoints.published_config(name)
    # the Hub cannot be reached: the table, saying why
    prep, source, warnings = checkpoints.checkpoint_preprocessing(name, None, config)
    assert (prep, warnings) == (table, []) and "published table" in source and "did not give" in source
    # the checkpoint's own file, equal to the table: no warning
    own.write_text(json.dumps(table.to_hf_config()))
    assert checkpoints.checkpoint_preprocessing(name, None, config) == (table, "preprocessor_config.json", [])
    # ...and different from it: the checkpoint's own values, one warning naming both
    own.write_text(json.dumps(table.to_hf_config() | {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    prep, source, warnings = checkpoints.checkpoint_preprocessing(name, None, config)
    assert prep.mean == (0.485, 0.456, 0.406) and source == "preprocessor_config.json"
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "mean (0.485, 0.456, 0.406) (table (0.5, 0.5, 0.5))" in warnings[0] and name in warnings[0]
    # synthetic weights never download anything
    asked.clear()
    assert checkpoints.checkpoint_preprocessing(name, None, config, "synthetic")[0] == table and asked == []
