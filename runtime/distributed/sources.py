"""Where a job's inputs come from: INPUT listed on the workers as a stream of sources, and one source read and decoded.

The driver never holds the listing. It looks only at INPUT itself (does it exist, which kind is it, the
folder's first level), and Ray Data does the rest on the workers: a list file is read in blocks
(`read_text`, `read_parquet`), a folder is walked one first-level subfolder per task, a glob is the
walk of its fixed prefix filtered by the pattern. Each listed row is (source, key, error): what a
worker opens (bytes: a local name need not be UTF-8), the `path` the output shows for it, and why it
cannot be read when that is already known (a folder that cannot be listed).
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from runtime.errors import UsageError
from runtime.decode import DEFAULT_MAX_FILE_BYTES, IMAGE_SUFFIXES, DecodeFailure, decode_bytes, decode_file, size_error
from runtime.inputs import find_images
from runtime.preprocess import Preprocessing

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

GLOB_CHARS = "*?["
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Bytes of a text list the driver reads to check, before any work, that it is a list of names.
LIST_PROBE_BYTES = 64 * 2**10
# What a listing (or claim) task reserves, and how many list at once: little, so that listing a million
# names never holds a CPU that decoding needs (it reads names, not images, and it waits whenever the
# decoders are behind). A 2-CPU node holds an actor (0.5), the listing and claims (0.4) and a decoder.
LIST_CPUS = 0.1
LIST_TASKS = 2
# A text list is read in chunks of this many bytes, one task each (about 50,000 names).
TEXT_CHUNK_BYTES = 4 * 2**20


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


def filesystem_of(location: str) -> tuple[Any, str]:
    """(filesystem, path) of a local name or a URI."""
    import pyarrow.fs as pafs

    return resolve(location) if is_uri(location) else (pafs.LocalFileSystem(), os.path.abspath(location))


def _uri_of(template: str, fs_path: str) -> str:
    """The URI of `fs_path`, a path in the filesystem `resolve(template)` returned."""
    parts = urlsplit(template)
    _, root = _filesystem(parts.scheme, parts.netloc, parts.query)
    return urlunsplit((parts.scheme, parts.netloc, fs_path[len(root.rstrip("/")):], parts.query, ""))


def key_of(source: bytes) -> str:
    """The `path` an output row shows for an input: runtime.infer's display name (undecodable bytes as \\xNN)."""
    return source.decode("utf-8", "backslashreplace")


def _source(name: str, cwd: str) -> bytes:
    """What a worker opens: a URI as given, a local name made absolute against the driver's folder."""
    return name.encode("utf-8") if is_uri(name) else os.fsencode(os.path.normpath(os.path.join(cwd, name)))


def listed_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("source", pa.binary()), ("key", pa.string()), ("error", pa.string())])


def _listed(sources: list[bytes], errors: list[tuple[bytes, str]] = ()) -> pa.Table:  # type: ignore[assignment]
    import pyarrow as pa

    everything = [*sources, *(s for s, _ in errors)]
    return pa.table({"source": everything, "key": [key_of(s) for s in everything],
                     "error": [None] * len(sources) + [e for _, e in errors]}, schema=listed_schema())


# ------------------------------------------------------------------------------------------------ listing

InputsDataset = Callable[[Any], "ray.data.Dataset"]  # given the ray module, the dataset of (source, key, error)


def list_inputs(spec: str) -> InputsDataset:
    """INPUT (a folder, a glob, a list file or one image; local or a URI), checked now and listed later
    as a dataset of (source, key, error).

    The driver only checks INPUT and lists a folder's first level (no Ray needed, so a bad argument
    fails at once); everything below is listed by tasks. Inputs may repeat (a list can name a file
    twice); the job keeps one row per key.
    """
    cwd = os.getcwd()
    uri = is_uri(spec)
    fs, path = filesystem_of(spec)
    glob_at = [i for i, c in enumerate(urlsplit(spec).path if uri else spec) if c in GLOB_CHARS]
    if glob_at:
        written = urlsplit(spec).path if uri else spec
        base = written[: glob_at[0]].rsplit("/", 1)[0] if "/" in written[: glob_at[0]] else ""
        if uri:
            fs, base_path = resolve(urlunsplit(urlsplit(spec)._replace(path=base or "/")))
            pattern = _segments(urlsplit(spec).path)
        else:
            base_path = os.path.abspath(base or ("/" if spec.startswith("/") else "."))
            pattern = _segments(os.path.abspath(spec))
        return _folder_dataset(fs, base_path, spec if uri else None, pattern, shown=spec)
    info = _info(fs, path)
    import pyarrow.fs as pafs

    if info.type == pafs.FileType.Directory:
        return _folder_dataset(fs, path, spec if uri else None, None, shown=spec)
    if info.type != pafs.FileType.File:
        raise UsageError(f"no such file or folder: {spec}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_SUFFIXES:
        one = _listed([_source(spec, cwd)])
        return lambda r: r.data.from_arrow(one)
    if suffix == ".parquet":
        return _parquet_list(fs, path, spec, cwd)
    return _text_list(fs, path, spec, cwd)


def _info(fs: Any, path: str) -> Any:
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise UsageError(f"{path}: {err}") from None


def _segments(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Path segments against glob segments: `*` stays within a segment, `**` spans any number of them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _folder_dataset(fs: Any, root: str, template: str | None, pattern: list[str] | None, shown: str) -> InputsDataset:
    """A folder's images (or a glob's matches under `root`): the driver lists the first level, one task
    walks each subfolder, one more lists the files of the first level itself."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        if template is None:
            with os.scandir(root) as entries:
                folders = sorted(os.fsencode(e.path) for e in entries if e.is_dir())  # follows links, as runtime.infer
        else:
            first = fs.get_file_info(pafs.FileSelector(root, recursive=False))
            folders = sorted(i.path.encode("utf-8") for i in first if i.type == pafs.FileType.Directory)
    except FileNotFoundError:
        raise UsageError(f"no such file or folder: {shown}") from None
    except OSError as err:
        raise UsageError(f"{shown}: cannot read folder ({err.strerror or err})") from None
    todo = pa.table({"folder": [os.fsencode(root), *folders], "recursive": [False] + [True] * len(folders)},
                    schema=pa.schema([("folder", pa.binary()), ("recursive", pa.bool_())]))
    return lambda r: r.data.from_arrow(todo).map_batches(
        walk_batch, batch_size=1, batch_format="pyarrow", num_cpus=LIST_CPUS, concurrency=LIST_TASKS,
        fn_kwargs={"template": template, "pattern": pattern})


def walk_batch(batch: pa.Table, template: str | None, pattern: list[str] | None) -> pa.Table:
    """Runs on a worker: the images under each folder of the batch (every file, when a glob decides)."""
    import pyarrow as pa

    tables = [_walk_one(os.fsdecode(folder), recursive, template, pattern)
              for folder, recursive in zip(batch["folder"].to_pylist(), batch["recursive"].to_pylist())]
    return pa.concat_tables(tables) if tables else listed_schema().empty_table()


def _walk_one(folder: str, recursive: bool, template: str | None, pattern: list[str] | None) -> pa.Table:
    if template is None and pattern is None:  # runtime.infer's own walk: symlinked folders followed once, unreadable ones reported
        listing = find_images([Path(folder)], recursive=recursive)
        errors = [(os.fsencode(str(d)), why) for d, why in listing.errors]
        return _listed([os.fsencode(str(f)) for f in listing.files], errors)
    if template is None:
        return _listed([os.fsencode(f) for f in sorted(_local_files(folder, recursive))
                        if _glob_match(_segments(f), pattern or [])])
    import pyarrow.fs as pafs

    fs, _ = resolve(template)
    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    uris = [_uri_of(template, f) for f in files]
    if pattern is None:
        uris = [u for u in uris if os.path.splitext(urlsplit(u).path)[1].lower() in IMAGE_SUFFIXES]
    else:
        uris = [u for u in uris if _glob_match(_segments(urlsplit(u).path), pattern)]
    return _listed([u.encode("utf-8") for u in uris])


def _local_files(folder: str, recursive: bool) -> list[str]:
    """Every file under a local folder (a glob matches any name, not only image suffixes; links to folders
    are not followed, so a link to an ancestor cannot loop)."""
    if not recursive:
        return [e.path for e in os.scandir(folder) if not e.is_dir()]
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


def _parquet_list(fs: Any, path: str, shown: str, cwd: str) -> InputsDataset:
    """A Parquet list's `path` column (else its first text column), read in blocks by tasks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path, filesystem=fs)
    columns = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if not columns:
        raise UsageError(f"{shown}: a Parquet list needs a `path` column of strings")
    column = "path" if "path" in columns else columns[0]
    return lambda r: (r.data.read_parquet(path, filesystem=fs, columns=[column], num_cpus=LIST_CPUS)
                        .map_batches(names_batch, batch_format="pyarrow", num_cpus=LIST_CPUS, concurrency=LIST_TASKS,
                                     fn_kwargs={"column": column, "cwd": cwd}))


def _text_list(fs: Any, path: str, shown: str, cwd: str) -> InputsDataset:
    """A text list (one name a line; blank lines and `#` comments skipped), read in chunks of
    TEXT_CHUNK_BYTES by tasks, so the first names are claimed while the rest is read, and no task holds
    more than a chunk however long the list. Its start is checked here, so a binary file is refused
    before any work."""
    import pyarrow as pa

    with fs.open_input_stream(path) as f:
        head = f.read(LIST_PROBE_BYTES)
    try:
        head.decode("utf-8") if len(head) < LIST_PROBE_BYTES else head[:-4].decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise UsageError(f"{shown}: not an image, a .parquet list or a text list of paths") from None
    if len(head) < LIST_PROBE_BYTES and not _names(head.decode("utf-8").splitlines()):
        raise UsageError(f"{shown}: the list names no files")
    starts = pa.table({"start": list(range(0, max(1, _info(fs, path).size), TEXT_CHUNK_BYTES))})
    return lambda r: r.data.from_arrow(starts).map_batches(
        text_chunk_batch, batch_size=1, batch_format="pyarrow", num_cpus=LIST_CPUS, concurrency=LIST_TASKS,
        fn_kwargs={"fs": fs, "path": path, "cwd": cwd, "chunk": TEXT_CHUNK_BYTES})


def text_chunk_batch(batch: pa.Table, fs: Any, path: str, cwd: str, chunk: int) -> pa.Table:
    """Runs on a worker: the names of the lines that start in each chunk [start, start + chunk) of a list
    file (the last of them read to its end). Undecodable bytes are kept (a local name need not be UTF-8)."""
    import pyarrow as pa

    tables = []
    with fs.open_input_file(path) as f:
        for start in batch["start"].to_pylist():
            lines = _chunk_lines(f, start, chunk)
            tables.append(_listed([_source(n, cwd) for n in _names(lines)]))
    return pa.concat_tables(tables)


def _chunk_lines(f: Any, start: int, chunk: int) -> list[str | None]:
    """The lines of a seekable file `f` whose first byte lies in [start, start + chunk)."""
    f.seek(max(0, start - 1))
    data = f.read(chunk + (1 if start else 0))
    if start:  # the byte before the chunk: a line starts at `start` only after a newline
        first = data.find(b"\n")
        if first < 0:
            return []  # no line starts in this chunk (one line spans it)
        data = data[first + 1:]
    while data and not data.endswith(b"\n"):  # the last line runs past the chunk: read it to its end
        more = f.read(2**16)
        if not more:
            break
        cut = more.find(b"\n")
        data += more if cut < 0 else more[: cut + 1]
        if cut >= 0:
            break
    return list(data.decode("utf-8", "surrogateescape").split("\n"))


def _names(lines: list[str | None]) -> list[str]:
    return [n.strip() for n in lines if n and n.strip() and not n.lstrip().startswith("#")]


def names_batch(batch: pa.Table, column: str, cwd: str) -> pa.Table:
    """Runs on a worker: the names of a Parquet list's block -> sources (relative local names against the
    driver's folder)."""
    return _listed([_source(n, cwd) for n in _names(batch[column].to_pylist())])


# ------------------------------------------------------------------------------------------------ reading

def decode_source(source: bytes, spec: Preprocessing, draft: bool, max_pixels: int,
                  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> np.ndarray | DecodeFailure:
    """One input -> pixels, or why not (runtime.classify's loader and reasons; URIs read via pyarrow.fs,
    their size checked before they are read)."""
    name = os.fsdecode(source)
    if not is_uri(name):
        return decode_file(Path(name), spec, draft, max_pixels, max_file_bytes)
    try:
        fs, path = resolve(name)
        with fs.open_input_file(path) as f:
            too_big = size_error(f.size(), max_file_bytes)
            if too_big:
                return DecodeFailure(name, too_big)
            data = f.read()
    except FileNotFoundError:
        return DecodeFailure(name, "no such file")
    except PermissionError:
        return DecodeFailure(name, "permission denied")
    except (OSError, ValueError) as err:  # pyarrow's network and protocol errors
        return DecodeFailure(name, f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
    return decode_bytes(data, name, spec, draft, max_pixels, max_file_bytes)


def within(seconds: float | None, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, or None when it has not returned after `seconds`. It runs in a thread of its own, which
    is left behind if it hangs (Python cannot stop a thread blocked in a read): the batch goes on."""
    if seconds is None:
        return fn(*args)
    box: list[Any] = []
    failed: list[BaseException] = []

    def call() -> None:
        try:
            box.append(fn(*args))
        except BaseException as err:  # handed to the caller's thread
            failed.append(err)

    thread = threading.Thread(target=call, name="decode", daemon=True)
    thread.start()
    thread.join(seconds)
    if failed:
        raise failed[0]
    return box[0] if box else None


def decode_batch(batch: dict[str, np.ndarray], spec: Preprocessing, draft: bool, max_pixels: int,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, deadline_s: float | None = None) -> dict[str, np.ndarray]:
    """The CPU stage: (source, key, error) -> (path, pixels, error); a failed input keeps zero pixels and the
    reason (the inference stage names it by its path), and so does one whose reading and decoding outlast
    `deadline_s` (a hung network mount)."""
    h, w = spec.input_size
    n = len(batch["key"])
    pixels = np.zeros((n, 3, h, w), dtype=np.float32)
    errors = np.array([e or "" for e in batch["error"]], dtype=object)  # the listing's reason, or None
    for i, source in enumerate(batch["source"]):
        if errors[i]:
            continue
        result = within(deadline_s, decode_source, bytes(source), spec, draft, max_pixels, max_file_bytes)
        if result is None:
            result = DecodeFailure(key_of(bytes(source)),
                                   f"not read and decoded within {deadline_s:g} s (--decode-timeout); skipped")
        if isinstance(result, DecodeFailure):
            errors[i] = result.reason
        else:
            pixels[i] = result
    return {"path": np.asarray(batch["key"], dtype=object), "pixels": pixels, "error": errors}
