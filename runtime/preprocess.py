"""Image decoding and DeiT preprocessing: the one implementation export, calibration and runtime share.

It reproduces `transformers`' DeiT / ViT image processors (the PIL backend, `DeiTImageProcessorPil`)
exactly: a wrong mean/std or crop is the most common cause of "accuracy dropped after export".
Decoding refuses what it cannot turn into the picture a viewer would show (decompression bombs,
high-bit-depth images it cannot scale) instead of classifying something else.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import DeitError



def _decodable_suffixes() -> tuple[str, ...]:
    """Every file extension the installed Pillow decodes: its registered readers, less the stubs and
    identify-only formats (HDF5, GRIB, MPEG video...) and EPS/PS without Ghostscript. A folder is read
    with this one list, so a file is never skipped there that would be classified when named."""
    from PIL import EpsImagePlugin, ImageFile

    Image.init()
    cannot = {"MPEG"} | (set() if EpsImagePlugin.has_ghostscript() else {"EPS"})

    def decodes(fmt: str) -> bool:
        if fmt not in Image.OPEN or fmt in cannot:
            return False
        opener = Image.OPEN[fmt][0]  # a class, or a factory function (JPEG's)
        return not (isinstance(opener, type) and issubclass(opener, ImageFile.StubImageFile))

    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if decodes(fmt)))


IMAGE_SUFFIXES = _decodable_suffixes()

# The default limit on the pixels of one image, checked from the header before decoding: a
# 10,000 x 10,000 photo is a legitimate (if silly) input; a 17,000 x 17,000 PNG of 321 KB is a bomb.
# Pillow's own guard is switched off because this check replaces it (and takes a per-call limit).
DEFAULT_MAX_PIXELS = 16_000 * 16_000
Image.MAX_IMAGE_PIXELS = None
# The default limit on a file's size, checked before it is opened. A 256 Mpx photo is well under it
# as a JPEG or PNG; a 2 GB file of junk behind a JPEG header holds Pillow's marker scan for minutes
# (about 6 MB/s), which is the case this bounds.
DEFAULT_MAX_FILE_BYTES = 256 * 2**20


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


class ImageError(DeitError):
    """An input file that cannot be turned into a picture; the message names the file."""


class DecodeBudget:
    """Bytes of decoded pixels that all decode threads together may hold: a picture waits for its share.

    A folder of huge photos decoded by several threads would otherwise multiply the peak by the thread
    count. A picture that needs more than the whole budget holds all of it, so it is decoded alone.
    """

    def __init__(self, total: int) -> None:
        self.total, self.free = total, total
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        share = min(nbytes, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= share)
            self.free -= share
        try:
            yield
        finally:
            with self._changed:
                self.free += share
                self._changed.notify_all()


def decoded_bytes(img: Image.Image) -> int:
    """What decoding `img` may hold at once: Pillow keeps 4 bytes a pixel for RGB, and a conversion
    (palette, CMYK, 16-bit, transparency) holds a second copy for a moment."""
    width, height = img.size
    return 8 * width * height


@contextmanager
def opened_image(path: str | Path, draft_size: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 budget: DecodeBudget | None = None, over_budget: tuple[int, int] | None = None) -> Iterator[Image.Image]:
    """Any still or animated image as RGB, upright, first frame, transparency on white, valid inside the block.

    `max_pixels` is checked from the header, before any pixel is decoded. `draft_size` lets JPEG
    decode at 1/2, 1/4 or 1/8 scale while staying at least that large: much faster for big photos,
    at a small cost in exactness. A decoded picture that is already upright RGB is not copied (a
    15,000 x 15,000 photo costs its pixels once, not three times), and `budget` accounts for it; a
    JPEG that alone needs more than the whole budget is decoded as with `draft_size=over_budget`.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{path}: refused, {width} x {height} = {_pixels(width * height)} is over the "
                                 f"limit of {_pixels(max_pixels)} (--max-pixels)")
            if img.format == "JPEG" and draft_size is None and budget is not None and decoded_bytes(img) > budget.total:
                draft_size = over_budget  # more than all decode threads may hold: decode at a reduced scale instead
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            with budget.hold(decoded_bytes(img)) if budget is not None else nullcontext():
                img.seek(0)
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                yield _to_rgb(img, path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file (or a broken symlink)") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied") from None
    except MemoryError:
        raise ImageError(f"{path}: out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError) as err:
        reason = str(err) or type(err).__name__
        if "cannot identify image file" in reason:
            reason = "not an image (or an unsupported format)" if path.stat().st_size else "empty file"
        raise ImageError(f"{path}: {reason}") from None


def load_image(path: str | Path, draft_size: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`opened_image` as a picture of its own, valid after the file is closed."""
    with opened_image(path, draft_size, max_pixels) as img:
        return img.copy()


def _pixels(n: int) -> str:
    """289 Mpx; below 10 Mpx the exact count, so no limit reads as "0 Mpx"."""
    return f"{n / 1e6:.0f} Mpx" if n >= 10_000_000 else f"{n:,} pixels"


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """RGB as an image viewer shows the file; high-bit-depth images are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = Image.fromarray(_to_8bit(np.asarray(img), img.mode, path), mode="L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit(arr: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """Greyscale of 16/32-bit integers or 32-bit floats -> uint8, the way viewers map the full range.

    (Pillow's own `convert("RGB")` clips at 255: most 16-bit photos come out white, and a float
    image in [0, 1] black.) A picture that would show as black, or whose range cannot be known, is
    refused rather than classified as something it does not show.
    """
    if mode == "F":
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
            raise ImageError(f"{path}: 32-bit float image with values from {lo:.4g} to {hi:.4g}; only [0, 1] has a "
                             "defined look (convert it to 8-bit first)")
        return np.round(arr * 255.0).astype(np.uint8)
    wide = arr.astype(np.int64)
    lo, hi = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ImageError(f"{path}: 32-bit integer image with values from {lo} to {hi}; cannot tell how it is meant "
                         "to look (convert it to 8-bit first)")
    if 0 < hi < 257:
        raise ImageError(f"{path}: {mode} image whose brightest pixel is {hi} of 65535: a viewer shows it black; "
                         "refusing to classify a black picture (scale it to 8-bit first)")
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


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


def load_and_preprocess(path: str | Path, spec: Preprocessing, draft: bool = False,
                        max_pixels: int = DEFAULT_MAX_PIXELS, budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode + preprocess one file; `draft` decodes JPEGs at reduced scale (>= 2x the resize target), as does
    a JPEG too big for the whole `budget`."""
    reduced = (2 * spec.resize_width, 2 * spec.resize_height)
    with opened_image(path, reduced if draft else None, max_pixels, budget, over_budget=reduced) as img:
        return preprocess(img, spec)


@dataclass
class Listing:
    """Image files found under the paths given, and the folders that could not be read (with why)."""

    files: list[Path] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)
    skipped_loops: list[Path] = field(default_factory=list)  # symlinked folders already visited
    skipped_suffixes: Counter[str] = field(default_factory=Counter)  # files in folders not read: their extension

    def skipped_note(self) -> str | None:
        """`3 files skipped for their extension (.txt 2, .json 1)`, or None."""
        if not self.skipped_suffixes:
            return None
        count = sum(self.skipped_suffixes.values())
        kinds = ", ".join(f"{ext or '(none)'} {n}" for ext, n in self.skipped_suffixes.most_common(5))
        more = ", ..." if len(self.skipped_suffixes) > 5 else ""
        return f"{count} file{'s' * (count != 1)} skipped for their extension ({kinds}{more}); not an image format Pillow reads"


def find_images(paths: list[Path], recursive: bool = False) -> Listing:
    """Expand files and folders into image files (by suffix; content is checked when decoded).

    Like `find -L`: symlinked folders are followed, each real folder is read once (so a link to an
    ancestor cannot loop), and a folder that cannot be read is reported, not silently skipped.
    Files from each folder argument come sorted by path.
    """
    listing = Listing()
    for p in paths:
        if not p.is_dir():
            listing.files.append(p)
            continue
        found: list[Path] = []
        _walk(p, recursive, found, listing, set())
        listing.files.extend(sorted(found))
    return listing


def _walk(folder: Path, recursive: bool, found: list[Path], listing: Listing, seen: set[tuple[int, int]]) -> None:
    try:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            listing.skipped_loops.append(folder)
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            children = sorted(entries, key=lambda e: e.name)
    except OSError as err:
        listing.errors.append((folder, f"cannot read folder ({err.strerror or err})"))
        return
    for entry in children:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()  # follows symlinks; a broken link is not a folder
        except OSError:
            is_dir = False
        if is_dir:
            if recursive:
                _walk(path, recursive, found, listing, seen)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        else:
            listing.skipped_suffixes[path.suffix.lower()] += 1


def list_images(paths: list[Path], recursive: bool = False) -> list[Path]:
    """The image files of `find_images`, for callers that treat unreadable folders as empty."""
    return find_images(paths, recursive).files


def file_error(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str | None:
    """Why `path` cannot be handed to the decoder (a FIFO or device would block; a huge file can hold a
    decoder for minutes scanning for markers), or None. Checked from `stat`, before the file is opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file (or a broken symlink)"
    except PermissionError:
        return "permission denied"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return size_error(st.st_size, max_bytes)


def size_error(size: int, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> str | None:
    """Why a file (or an object in a store) of `size` bytes is refused before it is read, or None."""
    if size > max_bytes:
        return f"refused, {_mib(size)} is over the limit of {_mib(max_bytes)} (--max-file-bytes)"
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MiB"
