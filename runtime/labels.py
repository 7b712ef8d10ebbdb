"""Class names. The ImageNet-1k list ships with the package for artifacts that carry no `id2label`."""

from __future__ import annotations

from functools import cache
from importlib import resources

IMAGENET_1K = "imagenet-1k"


@cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(wnid, short name) for the 1000 ImageNet-1k classes, in the standard (sorted-wnid) index order."""
    text = resources.files("runtime").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return tuple((wnid, name) for _, wnid, name in rows)


def wnid_to_index() -> dict[str, int]:
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def resolve_labels(id2label: list[str] | str | None, num_labels: int) -> list[str]:
    """Turn an artifact's label field into one name per output index."""
    if id2label == IMAGENET_1K or (id2label is None and num_labels == 1000):
        return [name for _, name in imagenet_classes()]
    if isinstance(id2label, list) and len(id2label) == num_labels:
        return id2label
    return [f"class_{i}" for i in range(num_labels)]
