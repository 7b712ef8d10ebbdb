"""Where a job's inputs come from: INPUT listed into distinct sources, and one source read and decoded on a worker."""

from __future__ import annotations

import functools
import glob
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from runtime.errors import UsageError
from runtime.predictor import decode_bytes, decode_file
from runtime.preprocess import IMAGE_SUFFIXES, Preprocessing, find_images

if TYPE_CHECKING:
    import pyarrow as pa

GLOB_CHARS = "*?["
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(name: str) -> bool:
    return bool(URI.match(name))


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, netloc: str, query: str) -> tuple[Any, str]:
    """One bucket's (or host's) pyarrow filesystem and its root path, made once per process: an S3
    client resolves the bucket's region over the network when it is made."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(urlunsplit((scheme, netloc, "/", query, "")))


def resolve(uri: str) -> tuple[Any, str]:
    """(filesystem, path in it) for a URI; names are used as written (no percent-decoding)."""
    parts = urlsplit(uri)
    fs, root = _filesystem(parts.scheme, parts.netloc, parts.query)
    return fs, root.rstrip("/") + "/" + parts.path.lstrip("/")


def _uri_of(template: str, fs_path: str) -> str:
    """The URI of `fs_path`, a path in the filesystem `resolve(template)` returned."""
    parts = urlsplit(template)
    _, root = _filesystem(parts.scheme, parts.netloc, parts.query)
    return urlunsplit((parts.scheme, parts.netloc, fs_path[len(root.rstrip("/")):], parts.query, ""))


def key_of(source: bytes) -> str:
    """The `path` an output row shows for an input: runtime.infer's display name (undecodable bytes as \\xNN)."""
    return source.decode("utf-8", "backslashreplace")


def _source(name: str) -> bytes:
    """What a worker opens: a URI as given, a local name made absolute (workers need not share our folder)."""
    return name.encode("utf-8") if is_uri(name) else os.fsencode(os.path.abspath(name))


# ------------------------------------------------------------------------------------------------ inputs

@dataclass
class Inputs:
    """The distinct inputs of a job in listing order (Arrow binary), and folders that could not be read."""

    sources: pa.Array
    errors: list[tuple[str, str]] = field(default_factory=list)  # (folder, "<folder>: <reason>")
    duplicates: int = 0

    @property
    def keys(self) -> pa.Array:
        import pyarrow as pa

        try:
            return self.sources.cast(pa.string())
        except pa.ArrowInvalid:  # a local name that is not UTF-8
            return pa.array([key_of(s) for s in self.sources.to_pylist()], pa.string())


def list_inputs(spec: str) -> Inputs:
    """Expand INPUT (a folder, a glob, a list file or one image; local or a URI) into distinct inputs."""
    names, errors = _list_uri(spec) if is_uri(spec) else _list_local(spec)
    sources = _sources(names)
    distinct = sources.unique()  # first occurrences, in order
    return Inputs(distinct, errors, len(sources) - len(distinct))


def _sources(names: list[str] | pa.Array) -> pa.Array:
    """Names -> sources. A Parquet column of URIs only (the 50-million-object case) is used as it is;
    anything else is converted a million names at a time, so no second copy exists as Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(names, pa.Array):
        if len(names) and pc.all(pc.match_substring_regex(names, URI.pattern)).as_py():
            return names.cast(pa.binary())
        names = names.to_pylist()
    step = 2**20
    chunks = [pa.array([_source(n) for n in names[i : i + step]], pa.binary()) for i in range(0, len(names), step)]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.binary())


Listed = tuple["list[str] | pa.Array", list[tuple[str, str]]]  # names, and (folder, message) for unreadable folders


def _list_local(spec: str) -> Listed:
    if os.path.isdir(spec):
        listing = find_images([Path(spec)], recursive=True)
        if not listing.files and not listing.errors:
            raise UsageError(f"no images found in {spec}")
        keys = [key_of(_source(str(d))) for d, _ in listing.errors]
        return [str(f) for f in listing.files], [(k, f"{k}: {why}") for k, (_, why) in zip(keys, listing.errors)]
    if os.path.isfile(spec):
        import pyarrow.fs as pafs

        return _from_file(pafs.LocalFileSystem(), os.path.abspath(spec), spec), []
    if any(c in spec for c in GLOB_CHARS):
        matches = sorted(m for m in glob.glob(spec, recursive=True) if not os.path.isdir(m))
        if not matches:
            raise UsageError(f"no files match {spec}")
        return matches, []
    raise UsageError(f"no such file or folder: {spec}")


def _list_uri(spec: str) -> Listed:
    import pyarrow.fs as pafs

    path = urlsplit(spec).path
    if any(c in path for c in GLOB_CHARS):
        first = min(path.index(c) for c in GLOB_CHARS if c in path)
        base = path[:first].rsplit("/", 1)[0]
        fs, base_path = resolve(urlunsplit(urlsplit(spec)._replace(path=base or "/")))
        pattern = _segments(path)
        names = [uri for uri in (_uri_of(spec, i.path) for i in _files_under(fs, base_path))
                 if _glob_match(_segments(urlsplit(uri).path), pattern)]
        if not names:
            raise UsageError(f"no files match {spec}")
        return names, []
    fs, fs_path = resolve(spec)
    info = fs.get_file_info(fs_path)
    if info.type == pafs.FileType.Directory:
        names = [_uri_of(spec, i.path) for i in _files_under(fs, fs_path) if i.extension.lower() in _suffixes()]
        if not names:
            raise UsageError(f"no images found in {spec}")
        return names, []
    if info.type == pafs.FileType.File:
        return _from_file(fs, fs_path, spec), []
    raise UsageError(f"no such file or folder: {spec}")


def _suffixes() -> set[str]:
    return {s.lstrip(".") for s in IMAGE_SUFFIXES}


def _files_under(fs: Any, path: str) -> list[Any]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _segments(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Path segments against glob segments: `*` stays within a segment, `**` spans any number of them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _from_file(fs: Any, path: str, shown: str) -> list[str] | pa.Array:
    """One image, or the entries of a list file: a Parquet `path` column (else its first text column) or
    text lines (blank lines and `#` comments skipped). Relative local entries are relative to the current folder."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return [shown]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        schema = pq.read_schema(path, filesystem=fs)
        columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        if not columns:
            raise UsageError(f"{shown}: a Parquet list needs a `path` column of strings")
        table = pq.read_table(path, columns=["path" if "path" in columns else columns[0]], filesystem=fs)
        column = table.column(0).combine_chunks().cast(pa.string())
        names = column.filter(pc.greater(pc.utf8_length(column), 0))  # drops nulls and empty strings
    else:
        with fs.open_input_stream(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{shown}: not an image, a .parquet list or a text list of paths") from None
        names = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise UsageError(f"{shown}: the list names no files")
    return names



def decode_source(source: bytes, spec: Preprocessing, draft: bool, max_pixels: int) -> np.ndarray | str:
    """One input -> pixels, or "<path>: <reason>" (runtime.classify's loader and messages; URIs read via pyarrow.fs)."""
    name = os.fsdecode(source)
    if not is_uri(name):
        return decode_file(Path(name), spec, draft, max_pixels)
    try:
        fs, path = resolve(name)
        with fs.open_input_file(path) as f:
            data = f.read()
    except FileNotFoundError:
        return f"{name}: no such file"
    except PermissionError:
        return f"{name}: permission denied"
    except (OSError, ValueError) as err:  # pyarrow's network and protocol errors
        return f"{name}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return decode_bytes(data, name, spec, draft, max_pixels)


def decode_batch(batch: dict[str, np.ndarray], spec: Preprocessing, draft: bool,
                 max_pixels: int) -> dict[str, np.ndarray]:
    """The CPU stage: paths -> (path, pixels, error); a failed file keeps zero pixels and its message."""
    sources = [bytes(s) for s in batch["source"]]
    h, w = spec.input_size
    pixels = np.zeros((len(sources), 3, h, w), dtype=np.float32)
    errors = np.full(len(sources), "", dtype=object)
    for i, source in enumerate(sources):
        result = decode_source(source, spec, draft, max_pixels)
        if isinstance(result, str):
            errors[i] = result
        else:
            pixels[i] = result
    return {"path": np.array([key_of(s) for s in sources], dtype=object), "pixels": pixels, "error": errors}
