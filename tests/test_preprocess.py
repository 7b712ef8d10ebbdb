"""The project's preprocessing against transformers' own image processors, on real photos."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_DIR, needs_sample
from runtime.checkpoints import PUBLISHED
from runtime.preprocess import Preprocessing, list_images, load_image, preprocess


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


def test_spec_round_trips_and_reads_old_style_configs() -> None:
    spec = Preprocessing.from_hf_config({"size": 224, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    assert spec == PUBLISHED["facebook/deit-tiny-patch16-224"].preprocessing
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    new_style = {"size": {"height": 438, "width": 438}, "do_center_crop": True, "crop_size": {"height": 384, "width": 384},
                 "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    assert Preprocessing.from_hf_config(new_style) == PUBLISHED["facebook/deit-base-distilled-patch16-384"].preprocessing


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
