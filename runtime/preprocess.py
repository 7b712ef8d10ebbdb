"""DeiT preprocessing: a checkpoint's spec and the pixel math, the one implementation export, calibration
and runtime share.

It reproduces `transformers`' DeiT / ViT image processors (the PIL backend, `DeiTImageProcessorPil`)
exactly: a wrong mean/std or crop is the most common cause of "accuracy dropped after export".
Turning files into pictures is `runtime.decode`'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image


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
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["mean"] = tuple(data["mean"])
        data["std"] = tuple(data["std"])
        return cls(**data)

    def to_hf_config(self) -> dict[str, Any]:
        """The `preprocessor_config.json` transformers' DeiT image processor reads back as this spec."""
        size = {"shortest_edge": self.resize_height} if self.shortest_edge else {"height": self.resize_height, "width": self.resize_width}
        crop = self.crop_height is not None and self.crop_width is not None
        return {
            "image_processor_type": "DeiTImageProcessor",
            "do_resize": True,
            "size": size,
            "resample": self.resample,
            "do_center_crop": crop,
            "crop_size": {"height": self.crop_height, "width": self.crop_width} if crop else None,
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }

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


