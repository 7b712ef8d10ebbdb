"""Numerical checks of an exported model against a reference, on random tensors and real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.preprocess import ImageError, Preprocessing, list_images, load_and_preprocess


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


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict[str, float]:
    """Max abs difference over all outputs, top-1 agreement and worst per-sample cosine of the first output."""
    max_abs = max(float(np.max(np.abs(reference[k] - candidate[k]))) for k in reference)
    key = next(iter(reference))
    ref, cand = reference[key].astype(np.float64), candidate[key].astype(np.float64)
    cosine = np.sum(ref * cand, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-30)
    return {
        "max_abs_diff": max_abs,
        "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
        "min_cosine": float(cosine.min()),
        "samples": int(len(ref)),
    }
