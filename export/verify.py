"""The inputs an exported model is checked on: random tensors and real photos (compared by `export.compare`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.decode import ImageError, load_and_preprocess
from runtime.inputs import list_images
from runtime.preprocess import Preprocessing


def verification_inputs(
    preprocessing: Preprocessing, images: Path | None, limit: int, n_random: int = 4, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Random N(0,1) tensors plus up to `limit` photos through the project's preprocessing.

    Returns the batch and how many of its rows are photos (the last ones).
    """
    h, w = preprocessing.input_size
    random = np.random.default_rng(seed).standard_normal((n_random, 3, h, w)).astype(np.float32)
    photos: list[np.ndarray] = []
    if images is not None:
        for path in list_images([images])[:limit]:
            try:
                photos.append(load_and_preprocess(path, preprocessing))
            except ImageError:
                continue
    if not photos:
        return random, 0
    return np.concatenate([random, np.stack(photos)]), len(photos)
