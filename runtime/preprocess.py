"""Image decoding and DeiT preprocessing: the one implementation export, calibration and runtime share.

It reproduces `transformers`' `DeiTImageProcessor` / `ViTImageProcessor` (PIL backend) exactly: a wrong
mean/std or crop is the most common cause of "accuracy dropped after export".
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# A 10,000 x 10,000 photo is a legitimate (if silly) input; anything beyond this is refused as a bomb.
Image.MAX_IMAGE_PIXELS = 16_000 * 16_000


@dataclass(frozen=True)
class Preprocessing:
    """What a checkpoint's `preprocessor_config.json` says, reduced to what the pixels depend on."""

    resize_height: int
    resize_width: int
    crop_height: int | None  # None: no center crop
    crop_width: int | None
    resample: int  # PIL resampling code (2 bilinear, 3 bicubic)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    shortest_edge: bool = False  # resize the shorter side to resize_height, keeping aspect ratio

    @property
    def input_size(self) -> tuple[int, int]:
        if self.crop_height is not None and self.crop_width is not None:
            return self.crop_height, self.crop_width
        return self.resize_height, self.resize_width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        data = dict(data)
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        return cls(**data)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Preprocessing:
        """Read a `preprocessor_config.json` (old feature-extractor and new image-processor styles)."""
        size = cfg.get("size", 224)
        shortest_edge = False
        if isinstance(size, int):
            resize_h = resize_w = size
        elif "shortest_edge" in size:
            resize_h = resize_w = int(size["shortest_edge"])
            shortest_edge = True
        else:
            resize_h, resize_w = int(size["height"]), int(size["width"])
        crop_h = crop_w = None
        if cfg.get("do_center_crop", False):
            crop = cfg.get("crop_size", 224)
            crop_h, crop_w = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        if not cfg.get("do_resize", True):
            raise ValueError("preprocessor_config.json has do_resize=false; DeiT needs a fixed input size")
        do_normalize = cfg.get("do_normalize", True)
        mean = tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))) if do_normalize else (0.0, 0.0, 0.0)
        std = tuple(cfg.get("image_std", (0.5, 0.5, 0.5))) if do_normalize else (1.0, 1.0, 1.0)
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        return cls(
            resize_height=resize_h,
            resize_width=resize_w,
            crop_height=crop_h,
            crop_width=crop_w,
            resample=int(cfg.get("resample", 2)),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            rescale_factor=rescale,
            shortest_edge=shortest_edge,
        )


class ImageError(ValueError):
    """An input file that cannot be turned into a picture; the message names the file."""


def load_image(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode any still or animated image to RGB, upright, first frame, transparency on white.

    `draft_size` lets JPEG decode at 1/2, 1/4 or 1/8 scale while staying at least that large:
    much faster for big photos, at a small cost in exactness (see README).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft_size is not None and img.format == "JPEG":
                    img.draft("RGB", draft_size)
                img.seek(0)
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img) or img)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file (or a broken symlink)") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{path}: refused, too many pixels ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = str(err) or type(err).__name__
        if "cannot identify image file" in reason:
            reason = "not an image (or an unsupported format)" if path.stat().st_size else "empty file"
        raise ImageError(f"{path}: {reason}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255, which turns most photos white.
        arr = np.asarray(img, dtype=np.uint32)
        arr = (arr >> 8) if arr.max() > 255 else arr
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB PIL image -> float32 CHW array, exactly as the checkpoint's image processor does it."""
    if spec.shortest_edge:
        w, h = img.size
        short = spec.resize_height
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        # transformers' get_resize_output_image_size: (height, width)
        img = img.resize((size[1], size[0]), resample=Image.Resampling(spec.resample))
    else:
        img = img.resize((spec.resize_width, spec.resize_height), resample=Image.Resampling(spec.resample))
    arr = np.asarray(img)
    if spec.crop_height is not None and spec.crop_width is not None:
        arr = _center_crop(arr, spec.crop_height, spec.crop_width)
    x = (arr.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < crop_h or w < crop_w:  # transformers pads with zeros before cropping
        padded = np.zeros((max(h, crop_h), max(w, crop_w), arr.shape[2]), dtype=arr.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = int((h - crop_h) / 2), int((w - crop_w) / 2)
    return arr[top : top + crop_h, left : left + crop_w]


def load_and_preprocess(path: str | Path, spec: Preprocessing, draft: bool = False) -> np.ndarray:
    """Decode + preprocess one file; `draft` decodes JPEGs at reduced scale (>= 2x the resize target)."""
    draft_size = (2 * spec.resize_width, 2 * spec.resize_height) if draft else None
    return preprocess(load_image(path, draft_size), spec)


def list_images(paths: list[Path], recursive: bool = False) -> list[Path]:
    """Expand files and folders into a sorted list of image files (by suffix; content is checked later)."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(sorted(f for f in p.glob(pattern) if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()))
        else:
            found.append(p)
    return found
