"""Photos for calibration and evaluation: ImageNet layouts, class-balanced sampling, cached tensors.

Sampling is deterministic (seeded) and class-balanced so that 512 images out of 1.28 M cover as many
classes as possible; the evaluation sample excludes the calibration files so accuracy is measured on
images the scales were not fitted to. Decoding dominates the cost of a calibration run, so the
preprocessed tensors are cached on disk under a key made of the file list and the preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.artifact import atomic_path
from runtime.console import progress_bar
from runtime.errors import UsageError
from runtime.labels import wnid_to_index
from runtime.decode import IMAGE_SUFFIXES, ImageError, load_and_preprocess
from runtime.inputs import list_images
from runtime.preprocess import Preprocessing

WNID = re.compile(r"^(n\d{8})")
# Label files found automatically in a flat (val-style) folder, most specific first.
LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt", "labels.txt", "val.txt")


class DataError(UsageError):
    """Unusable calibration or evaluation data; the message names the folder or file."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int | None  # ImageNet-1k class index; None when the folder does not say


@dataclass
class Batch:
    """Preprocessed images, their labels (-1 = unknown) and what was skipped on the way."""

    x: np.ndarray
    labels: np.ndarray
    files: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason
    cached: bool = False

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool(np.all(self.labels >= 0))


def discover(folder: Path, labels_file: Path | None = None) -> list[Sample]:
    """Every image under `folder` with its label, whichever ImageNet layout the folder uses.

    train-style: class sub-folders named by wnid. val-style: a flat folder plus a labels file
    (`name wnid|index` per line, or Kaggle's LOC_val_solution.csv). Names starting with a wnid
    (`n01440764_tench.JPEG`) label themselves. Anything else is an unlabelled folder of photos.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    classes = wnid_to_index()
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and WNID.match(d.name) and d.name[:9] in classes)
    if class_dirs:
        return [Sample(p, classes[d.name[:9]]) for d in class_dirs for p in list_images([d], recursive=True)]
    by_name = _read_labels_file(labels_file or next((folder / n for n in LABEL_FILES if (folder / n).is_file()), None), classes)
    samples = []
    for path in list_images([folder]):
        label = by_name.get(path.name, by_name.get(path.stem))
        match = WNID.match(path.name)
        if label is None and match and match.group(1) in classes:
            label = classes[match.group(1)]
        samples.append(Sample(path, label))
    if not samples:
        raise DataError(f"{folder}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return samples


def _read_labels_file(path: Path | None, classes: dict[str, int]) -> dict[str, int]:
    if path is None:
        return {}
    if not path.is_file():
        raise DataError(f"{path}: no such labels file")
    labels: dict[str, int] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        parts = line.replace(",", " ").split()
        if len(parts) < 2 or parts[0] in ("ImageId", "#"):
            continue
        name, value = parts[0], parts[1]
        if value in classes:
            labels[name] = classes[value]
        elif value.isdigit() and int(value) < len(classes):
            labels[name] = int(value)
        else:
            raise DataError(f"{path}:{n}: {value!r} is neither an ImageNet wnid nor a class index")
    return labels


def balanced_order(samples: list[Sample], seed: int, exclude: set[Path] | None = None) -> list[Sample]:
    """All samples in a seeded round-robin over classes: any prefix is as class-balanced as it can be."""
    rng = random.Random(seed)
    groups: dict[int | None, list[Sample]] = defaultdict(list)
    for s in samples:
        if not exclude or s.path not in exclude:
            groups[s.label].append(s)
    keys = sorted(groups, key=lambda k: -1 if k is None else k)
    rng.shuffle(keys)
    for k in keys:
        rng.shuffle(groups[k])
    order = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        order.extend(groups[k][i] for k in keys if i < len(groups[k]))
    return order


def load_batch(
    candidates: list[Sample], n: int, spec: Preprocessing, cache_dir: Path | None = None, progress: bool = True
) -> Batch:
    """The first `n` decodable candidates, preprocessed; unreadable files are skipped and replaced.

    Cached under a key of the first `n` candidates (path, size, mtime) and the preprocessing, so a
    second run with other quantization settings skips decoding.
    """
    head = candidates[:n]
    key_src = json.dumps([spec.to_dict(), n, [(str(s.path.resolve()), *_stat(s.path), s.label) for s in head]])
    cache = cache_dir / f"tensors-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            return Batch(z["x"], z["labels"], info["files"], info["skipped"], cached=True)
    h, w = spec.input_size
    x = np.empty((min(n, len(candidates)), 3, h, w), dtype=np.float32)
    labels, files, skipped = [], [], {}
    with progress_bar(total=len(x), desc="decode", unit="img", enabled=progress) as bar:
        for s in candidates:
            if len(files) == len(x):
                break
            try:
                x[len(files)] = load_and_preprocess(s.path, spec)
            except ImageError as err:
                skipped[str(s.path)] = str(err).removeprefix(f"{s.path}: ")
                continue
            files.append(str(s.path))
            labels.append(-1 if s.label is None else s.label)
            bar.update(1)
    batch = Batch(x[: len(files)], np.asarray(labels, dtype=np.int64), files, skipped)
    if cache is not None:
        with atomic_path(cache) as tmp:
            with tmp.open("wb") as f:
                np.savez(f, x=batch.x, labels=batch.labels, info=np.asarray(json.dumps({"files": files, "skipped": skipped})))
    return batch


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns
