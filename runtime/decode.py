"""Decoding: every way an input becomes pixels, with its limits, its memory budget and its one failure type.

A file, a URI's content and a request item all go through `decode_file`, so the three give the same
answer for the same bytes. Decoding refuses what it cannot turn into the picture a viewer would show
(decompression bombs, high-bit-depth images it cannot scale, FIFOs, huge files of junk) instead of
classifying something else, and a refusal is a `DecodeFailure` value that every runner matches on:
one bad image never stops a folder, a Ray job or a request's neighbours.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import DeitError
from runtime.preprocess import Preprocessing, preprocess


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


def display_path(path: Path | str) -> str:
    """A file name that can always be printed: undecodable bytes become `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class DecodeFailure:
    """Why one input gave no pixels. A value, not an exception: it travels beside the pixels of the
    other inputs of a batch (a folder, a Ray block, a request) and becomes that input's error record."""

    source: Path | str  # the file, URI or request item, as the record names it
    reason: str  # what is wrong with it, without its name

    @property
    def message(self) -> str:
        """The one line a user reads: `<source>: <reason>`."""
        return f"{display_path(self.source)}: {self.reason}"

    def __str__(self) -> str:
        return self.message


class ImageError(DeitError):
    """An input file that cannot be turned into a picture, for callers that stop at the first one (export's
    verification, calibration); the runners get the same reason as a `DecodeFailure` value."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{display_path(path)}: {reason}")
        self.path, self.reason = path, reason


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
                raise ImageError(path, f"refused, {width} x {height} = {_pixels(width * height)} is over the "
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
        raise ImageError(path, "no such file (or a broken symlink)") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except MemoryError:
        raise ImageError(path, "out of memory while decoding") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError) as err:
        reason = str(err) or type(err).__name__
        if "cannot identify image file" in reason:
            reason = "not an image (or an unsupported format)" if path.stat().st_size else "empty file"
        raise ImageError(path, reason) from None


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
            raise ImageError(path, f"32-bit float image with values from {lo:.4g} to {hi:.4g}; only [0, 1] has a "
                             "defined look (convert it to 8-bit first)")
        return np.round(arr * 255.0).astype(np.uint8)
    wide = arr.astype(np.int64)
    lo, hi = (int(wide.min()), int(wide.max())) if wide.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ImageError(path, f"32-bit integer image with values from {lo} to {hi}; cannot tell how it is meant "
                         "to look (convert it to 8-bit first)")
    if 0 < hi < 257:
        raise ImageError(path, f"{mode} image whose brightest pixel is {hi} of 65535: a viewer shows it black; "
                         "refusing to classify a black picture (scale it to 8-bit first)")
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def load_and_preprocess(path: str | Path, spec: Preprocessing, draft: bool = False,
                        max_pixels: int = DEFAULT_MAX_PIXELS, budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode + preprocess one file; `draft` decodes JPEGs at reduced scale (>= 2x the resize target), as does
    a JPEG too big for the whole `budget`."""
    reduced = (2 * spec.resize_width, 2 * spec.resize_height)
    with opened_image(path, reduced if draft else None, max_pixels, budget, over_budget=reduced) as img:
        return preprocess(img, spec)


def decode_file(path: Path, spec: Preprocessing, draft: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, budget: DecodeBudget | None = None,
                name: Path | str | None = None) -> np.ndarray | DecodeFailure:
    """One file -> pixel array, or why not (named `name`, default the path). `budget`: the decoded-pixel
    memory this decode shares with the other decodes under way."""
    source = path if name is None else name
    reason = file_error(path, max_file_bytes)
    if reason:
        return DecodeFailure(source, reason)
    try:
        return load_and_preprocess(path, spec, draft=draft, max_pixels=max_pixels, budget=budget)
    except ImageError as err:
        return DecodeFailure(source, err.reason)
    except (OSError, ValueError, MemoryError) as err:  # anything else Pillow/numpy raise on a hostile file
        return DecodeFailure(source, f"{type(err).__name__}: {err}")


def decode_bytes(data: bytes, name: str, spec: Preprocessing, draft: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, budget: DecodeBudget | None = None) -> np.ndarray | DecodeFailure:
    """Encoded image bytes (a URI's content, a request item) -> pixels or why not, through the same loader
    as a file, so the answer is the one runtime.infer gives for that file."""
    with _as_file(data) as local:
        return decode_file(local, spec, draft, max_pixels, max_file_bytes, budget, name=name)


@contextmanager
def _as_file(data: bytes) -> Iterator[Path]:
    """Bytes as a file name the loader opens: an anonymous in-memory file on Linux (nothing is left
    behind if the process is killed), a temporary file elsewhere."""
    if hasattr(os, "memfd_create"):
        with os.fdopen(os.memfd_create("deit-input"), "wb") as f:
            f.write(data)
            f.flush()
            yield Path(f"/proc/self/fd/{f.fileno()}")
    else:
        with tempfile.NamedTemporaryFile(prefix="deit-input-") as f:
            f.write(data)
            f.flush()
            yield Path(f.name)


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
