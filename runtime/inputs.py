"""Listing inputs: files and folders given on a command line -> the image files to classify, with the
folders that could not be read and the files skipped for their extension, so nothing is skipped silently."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from runtime.decode import IMAGE_SUFFIXES


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


