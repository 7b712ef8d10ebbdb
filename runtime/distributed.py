"""`python -m runtime.distributed`: classify millions of images on a Ray cluster, with the same backends and answers.

    python -m runtime.distributed images/ --model artifacts/deit-small-distilled-patch16-224 --output predictions/
    python -m runtime.distributed 's3://bucket/photos/**/*.jpg' --output s3://bucket/predictions/ --address auto
    python -m runtime.distributed paths.parquet --output predictions/ --backend ort-cuda --num-gpus-per-worker 1

INPUT is a folder (searched recursively), a glob, or a .parquet / text list of paths and URIs (local or
anything pyarrow.fs reads: s3://, gs://, ...). Without --address a local Ray starts on this machine;
with one, the job joins a running cluster (`ray start --head`, KubeRay). Every node needs this
package installed and the model at the same path (local inputs too; URIs are read where they run).

The work is one Ray Data pipeline, streamed, so memory stays bounded whatever the input count:
  1. the driver lists the inputs (distinct paths, as Arrow blocks of paths) and leaves out those the
     output already holds (resume);
  2. a CPU task stage decodes and preprocesses each file with runtime.preprocess (through
     runtime.classify's loader; a URI's bytes are read with pyarrow.fs and decoded through the same
     loader); a file that cannot be read becomes a row with an `error`;
  3. an actor pool runs the backend, one per GPU (or one per node for CPU backends), and the
     top-k of runtime.classify;
  4. rows stream back to the driver, the only writer, which commits them in Parquet (or JSON
     lines) part files, each written whole under a `_tmp-` name and then renamed.
Exactly once: Ray retries the tasks of a killed actor on its restart, and a task's rows count only
once it completed, so a lost worker costs time, never a lost or doubled row; each input is in
exactly one committed part, and a re-run with the same --output skips the paths its parts hold.
Ctrl-C (or SIGTERM) commits the rows that arrived and exits 130 (143). A run counts only its own
inputs in the output, so one huge list can also be split into several runs sharing one --output (the
driver holds its list as Arrow, about 100 bytes a path). Exit status as runtime.infer: 0 all
predicted, 1 some files failed, 2 usage, 5 model, 6 unavailable (Ray missing too).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from runtime.artifact import SYNTHETIC_WARNING, find_model
from runtime.auto import choose
from runtime.backends import BackendUnavailable, backend_kind, create
from runtime.cli import add_classify_arguments, check_classify_arguments
from runtime.predictor import Predictor, decode_bytes, decode_file
from runtime.console import progress_bar
from runtime.cpuinfo import usable_cores
from runtime.errors import (ArgumentParser, DeitError, Interrupted, Unavailable, UsageError, run_cli, signals_deferred,
                            signals_raise_interrupted)
from runtime.paths import check_output_dir
from runtime.preprocess import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, Preprocessing, find_images

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}
PART_PREFIX = "part-"
TMP_PREFIX = "_tmp-"  # pyarrow and pandas skip names starting with "_" when they read a folder
GLOB_CHARS = "*?["
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What a decode task can hold at once: one image at --max-pixels decoded and converted to RGB (two
# copies of 3 bytes a pixel; a 16k x 16k image is 1.5 GB) besides its block of pixels. Ray reserves it
# per task, so a node runs no more decoders than its memory holds.
DECODE_BYTES_PER_PIXEL = 6
# Inputs per decode task: large enough that a 50-million-image job stays at ~50,000 blocks, small
# enough that a small job still gives every CPU a few tasks.
MAX_BLOCK_ROWS = 1024
# Decoded pixels travel in blocks of at most this size (~50 DeiT inputs), so inference starts early
# and the object store holds only a few blocks per actor.
PIXEL_BLOCK_BYTES = 32 * 2**20
MAX_LISTED_FAILURES = 20


def import_ray() -> Any:
    """Ray (and pyarrow), or a one-line Unavailable saying how to install them."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise Unavailable(f"runtime.distributed needs Ray Data ({err}); install it with "
                          "`pip install -e '.[distributed]'` (or `make install`)") from None
    return ray


# ---------------------------------------------------------------------------------------------- locations

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


# ------------------------------------------------------------------------------------------------ output

def output_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("indices", pa.list_(pa.int32())), ("labels", pa.list_(pa.string())),
                      ("probs", pa.list_(pa.float64())), ("error", pa.string())])


def error_rows(rows: list[tuple[str, str]]) -> pa.Table:
    import pyarrow as pa

    return pa.table({"path": [p for p, _ in rows], "indices": [None] * len(rows), "labels": [None] * len(rows),
                     "probs": [None] * len(rows), "error": [e for _, e in rows]}, schema=output_schema())


class PartWriter:
    """Commits rows to `<output>/part-<run>-<n>.<format>`, each part written whole, then renamed.

    The output folder only ever holds complete parts (a temp name is used until the part is whole, and
    a rename makes it visible at once; on object stores, where a rename is a copy, the copy is still
    all or nothing), so the committed paths are exactly the inputs done, for resume. Only the driver
    writes: one job per output folder at a time.
    """

    def __init__(self, output: str, fmt: str = "parquet", rows_per_file: int = 10_000, commit_s: float = 60.0) -> None:
        import pyarrow.fs as pafs

        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.output, self.fmt, self.rows_per_file, self.commit_s = output, fmt, rows_per_file, commit_s
        if is_uri(output):
            self.fs, self.root = resolve(output)
        else:
            check_output_dir(Path(output), flag="--output")
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(output)
        self.root = self.root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.committed = 0  # rows this run has committed
        self.parts = 0
        self.last_commit = time.monotonic()

    def _names(self) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def done(self) -> pa.Table:
        """(path, error) of every row earlier runs committed; stale temp parts of killed runs are removed."""
        import pyarrow as pa

        names = self._names()
        for name in names:
            if name.startswith(TMP_PREFIX + PART_PREFIX):
                self.fs.delete_file(f"{self.root}/{name}")
        parts = [n for n in names if n.startswith(PART_PREFIX)]
        foreign = [n for n in parts if not n.endswith(FORMATS[self.fmt])]
        if foreign:
            raise UsageError(f"--output {self.output} holds other part files ({foreign[0]}); use the --format they "
                             "were written in, or another --output")
        schema = pa.schema([("path", pa.string()), ("error", pa.string())])
        tables = [self._read_keys(f"{self.root}/{n}", schema) for n in parts]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def _read_keys(self, path: str, schema: pa.Schema) -> pa.Table:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=schema.names, filesystem=self.fs).cast(schema)
        import pyarrow.json as pajson

        with self.fs.open_input_stream(path) as f:
            table = pajson.read_json(f, parse_options=pajson.ParseOptions(explicit_schema=schema,
                                                                          unexpected_field_behavior="ignore"))
        return table.select(schema.names)

    def add(self, rows: pa.Table) -> None:
        with signals_deferred():  # a row is either buffered and counted, or not
            self.buffer.append(rows)
            self.buffered += rows.num_rows
        if self.buffered >= self.rows_per_file or time.monotonic() - self.last_commit >= self.commit_s:
            self.commit()

    def commit(self) -> None:
        """Write the buffered rows as one part (nothing when empty)."""
        import pyarrow as pa

        if not self.buffered:
            return
        with signals_deferred():  # Ctrl-C waits until the part is renamed and counted
            table = pa.concat_tables(self.buffer)
            name = f"{PART_PREFIX}{self.run}-{self.parts:05d}{FORMATS[self.fmt]}"
            self._put(name, self._encode(table))
            self.committed += table.num_rows
            self.parts += 1
            self.buffer, self.buffered, self.last_commit = [], 0, time.monotonic()

    def _encode(self, table: pa.Table) -> Any:
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            return sink.getvalue()
        return "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode("utf-8")

    def _put(self, name: str, data: Any) -> None:
        import pyarrow.fs as pafs

        tmp, final = f"{self.root}/{TMP_PREFIX}{name}", f"{self.root}/{name}"
        if isinstance(self.fs, pafs.LocalFileSystem):  # fsync, so a machine crash cannot leave an empty part
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)


# ------------------------------------------------------------------------------------------- the stages

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


@dataclass(frozen=True)
class Plan:
    """What the actors run, settled once on a worker (where the model and the GPUs are)."""

    backend: str
    precision: str | None  # None: the named model file's own
    artifact: str
    model_file: str | None
    device: str
    resolved_precision: str
    spec: Preprocessing
    checkpoint: str
    synthetic: bool
    choice: str | None = None  # what `auto` chose and why


class Classifier:
    """The inference stage: one backend per actor, loaded once, and the project's one Predictor."""

    def __init__(self, plan: Plan, batch_size: int, threads: int | None, topk: int) -> None:
        model_file = Path(plan.model_file) if plan.model_file else None
        backend = create(plan.backend, plan.artifact, precision=plan.precision, max_batch=batch_size,
                         threads=threads, model_file=model_file)
        self.predictor = Predictor(backend.__enter__(), topk)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow as pa

        decoded = [str(e) if e else pixels for e, pixels in zip(batch["error"], batch["pixels"])]
        rows = self.predictor.predict([str(p) for p in batch["path"]], decoded)
        return pa.table({
            "path": [str(r.source) for r in rows],
            "indices": [[i for i, _, _ in r.top] if r.top else None for r in rows],
            "labels": [[label for _, label, _ in r.top] if r.top else None for r in rows],
            "probs": [[p for _, _, p in r.top] if r.top else None for r in rows],
            "error": [r.error for r in rows],
        }, schema=output_schema())


def make_plan(backend: str, model: str | None, artifacts: str, precision: str | None, batch_size: int,
              threads: int | None, topk: int) -> Plan:
    """Find the model, settle `auto`, and check the model classifies with `topk` classes; runs on a worker."""
    artifact, model_file = find_model(model, artifacts)
    choice = None
    if backend == "auto":
        picked = choose(artifact, precision, batch_size, threads, model_file)
        backend, precision, choice = picked.backend, (None if model_file else picked.precision), picked.describe()
    be = Predictor(create(backend, artifact, precision=precision, max_batch=batch_size, threads=threads,
                          model_file=model_file), topk).backend
    reason = backend_kind(backend).unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {backend!r} is unavailable on the Ray workers: {reason}")
    return Plan(backend, precision, str(artifact), str(model_file) if model_file else None, be.device, be.precision,
                be.meta.preprocessing, be.meta.checkpoint, be.meta.synthetic, choice)


# ---------------------------------------------------------------------------------------------- Ray

def connect(address: str | None = None, num_cpus: int | None = None, object_store_bytes: int | None = None) -> bool:
    """Join the cluster at `address`, or start a small local Ray; True when this call started one.

    An already connected process (a notebook, the tests) keeps its connection. The local Ray is kept
    small, for a laptop or CI: no dashboard, worker logs not copied to our stderr (failures still
    arrive as exceptions), and an object store of a tenth of memory (0.5-4 GiB): streaming keeps only
    a few blocks of pixels per stage in it.
    """
    ray = import_ray()
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    if ray.is_initialized():
        started = False
    elif address:
        ray.init(address=address, **quiet)
        started = False
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ray.init(num_cpus=num_cpus or usable_cores(), include_dashboard=False,
                 object_store_memory=object_store_bytes or int(min(4 * 2**30, max(2**29, memory // 10))), **quiet)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows written, which is what a user waits for
    ctx.print_on_execution_start = False
    ctx.target_max_block_size = PIXEL_BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return started


def _unwrapped(err: BaseException) -> BaseException:
    """The project's own error inside a Ray task error (so its one line and exit status survive), else `err`."""
    from ray.exceptions import RayError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, DeitError) and not isinstance(seen, RayError):  # Ray's copy also subclasses the cause
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return err


def _remote_plan(ray: Any, job: JobOptions, model: str | None, artifacts: str) -> Plan:
    """`make_plan` on a worker, on a GPU node when the cluster has one (where `auto` and the GPU backends run)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(make_plan)
    try:
        return ray.get(task.remote(job.backend, model, artifacts, job.precision, job.batch_size, job.threads, job.topk))
    except Exception as err:
        raise _unwrapped(err) from None


def _pool(ray: Any, plan: Plan, job: JobOptions) -> tuple[int, dict[str, Any]]:
    """Actor count and resources: one per GPU share, or one per node for a CPU backend (which uses the
    node's cores itself), always leaving a CPU for decoding."""
    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0)
    if plan.device == "cuda":
        gpus = resources.get("GPU", 0)
        if not gpus:
            raise BackendUnavailable(f"backend {plan.backend!r} runs on a GPU and the Ray cluster has none")
        size = job.num_workers or max(1, int(gpus // job.num_gpus_per_worker))
        ask = {"num_cpus": job.num_cpus_per_worker, "num_gpus": job.num_gpus_per_worker}
    else:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        size = job.num_workers or max(1, len(nodes))
        ask = {"num_cpus": job.num_cpus_per_worker}
    if cpus - size * job.num_cpus_per_worker < 1:
        raise UsageError(f"{size} workers x {job.num_cpus_per_worker:g} CPUs leave none of the cluster's {cpus:g} CPUs "
                         "for decoding; lower --num-workers or --num-cpus-per-worker")
    return size, ask


def _decode_memory(ray: Any, max_pixels: int) -> int:
    """The memory a decode task reserves (DECODE_BYTES_PER_PIXEL), at most half the largest node's, so
    a small machine still decodes (where one huge image can then run out of memory, as in runtime.infer)."""
    need = DECODE_BYTES_PER_PIXEL * max_pixels + PIXEL_BLOCK_BYTES
    largest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    return int(min(need, largest // 2)) if largest else need


def build_dataset(ray: Any, sources: pa.Array, plan: Plan, job: JobOptions, workers: int,
                  actor_resources: dict[str, Any]) -> ray.data.Dataset:
    """The pipeline over `sources`: decode tasks (1 CPU each), then the actor pool, streamed."""
    import pyarrow as pa

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows = max(job.batch_size, min(MAX_BLOCK_ROWS, math.ceil(len(sources) / (8 * cpus))))
    blocks = [pa.table({"source": sources.slice(i, rows)}) for i in range(0, len(sources), rows)]
    h, w = plan.spec.input_size
    decode_rows = max(1, min(rows, PIXEL_BLOCK_BYTES // (3 * h * w * 4)))
    # Fault tolerance is Ray Data's default, which exactly-once needs: a task lost with its worker runs
    # again (max_retries=-1), a dead actor restarts and its tasks run again (max_restarts=-1,
    # max_task_retries=-1). The decode tasks' memory reservation also keeps Ray from fusing decoding
    # into the actors (fused, the two would run one after the other instead of overlapping).
    return (ray.data.from_arrow(blocks)
            .map_batches(decode_batch, batch_size=decode_rows, batch_format="numpy", num_cpus=1,
                         memory=_decode_memory(ray, job.max_pixels),
                         fn_kwargs={"spec": plan.spec, "draft": job.draft, "max_pixels": job.max_pixels})
            .map_batches(Classifier, batch_size=job.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=workers),
                         fn_constructor_kwargs={"plan": plan, "batch_size": job.batch_size, "threads": job.threads,
                                                "topk": job.topk},
                         **actor_resources))


# ----------------------------------------------------------------------------------------------- the job

@dataclass(frozen=True)
class JobOptions:
    backend: str = "auto"
    precision: str | None = None
    batch_size: int = 8
    topk: int = 5
    threads: int | None = None  # intra-op threads of CPU backends (default: the node's cores)
    num_workers: int | None = None  # inference actors (default: one per GPU share, or per node)
    num_gpus_per_worker: float = 1.0
    num_cpus_per_worker: float = 1.0
    fmt: str = "parquet"
    rows_per_file: int = 10_000
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = False
    progress: bool = True


@dataclass
class JobSummary:
    backend: str
    precision: str
    model: str
    synthetic: bool
    workers: int
    images: int = 0  # rows the output holds for this job's inputs
    failed: int = 0
    resumed: int = 0  # predictions earlier runs wrote (not recomputed)
    new: int = 0  # rows this run wrote
    new_failed: int = 0
    seconds: float = 0.0  # this run's pipeline, from submitting it to the last row
    first_row_s: float | None = None  # actors started, model loaded, first block decoded and classified
    failures: list[str] = field(default_factory=list)  # the first MAX_LISTED_FAILURES messages of this run

    @property
    def predicted(self) -> int:
        return self.images - self.failed

    @property
    def images_per_s(self) -> float:
        return (self.new - self.new_failed) / self.seconds if self.seconds > 0 else 0.0


class Job:
    """One classification job: inputs listed and the output read when made (no Ray needed, so a bad
    argument fails at once), then `plan()` and `run()` on the connected Ray."""

    def __init__(self, input: str, output: str, model: str | None = None, opts: JobOptions = JobOptions(),
                 artifacts: str = "artifacts") -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        self.opts = opts
        self.model = os.path.abspath(model) if model and not is_uri(model) else model
        self.artifacts = os.path.abspath(artifacts)
        self.inputs = list_inputs(input)
        self.writer = PartWriter(output, opts.fmt, opts.rows_per_file)
        done = self.writer.done()
        keys = self.inputs.keys
        folders = pa.array([k for k, _ in self.inputs.errors], pa.string())
        mine = done.filter(pc.is_in(done["path"], value_set=pa.concat_arrays([keys, folders])))  # not other jobs' rows
        self.done_rows = mine.num_rows
        self.done_failed = mine.num_rows - mine["error"].null_count
        self.todo = self.inputs.sources.filter(pc.invert(pc.is_in(keys, value_set=done["path"])))
        reported = pc.is_in(folders, value_set=done["path"]).to_pylist()
        self.folder_errors = [e for e, r in zip(self.inputs.errors, reported) if not r]
        self.settled: tuple[Plan, int, dict[str, Any]] | None = None

    def plan(self) -> tuple[Plan, int, dict[str, Any]]:
        """What runs and how many actors (a worker opens the model and settles `auto`), once per job."""
        if self.settled is None:
            ray = import_ray()
            plan = _remote_plan(ray, self.opts, self.model, self.artifacts)
            self.settled = (plan, *_pool(ray, plan, self.opts))
        return self.settled

    def run(self, show_errors: bool = False, on_rows: Callable[[pa.Table], None] | None = None) -> JobSummary:
        """Classify what is left (per-file errors on stderr if asked). Rows go to the output as they arrive and, if
        given, to `on_rows` (like runtime.classify's on_prediction). Interrupted: commits what arrived, then raises
        `Interrupted`; failed: commits what arrived, then raises."""
        ray = import_ray()
        plan, workers, resources = self.plan()
        s = JobSummary(plan.backend, plan.resolved_precision, plan.artifact, plan.synthetic, workers,
                       images=self.done_rows, failed=self.done_failed, resumed=self.done_rows - self.done_failed)
        start = time.perf_counter()
        total = len(self.todo) + len(self.folder_errors)
        with progress_bar(total=total, unit="img", enabled=self.opts.progress) as bar:
            def take(rows: pa.Table) -> None:
                failed = [e for e in rows["error"].to_pylist() if e]
                with signals_deferred():  # the rows and the count of them go together
                    self.writer.add(rows)
                    s.images += rows.num_rows
                    s.new += rows.num_rows
                    s.failed += len(failed)
                    s.new_failed += len(failed)
                    s.failures.extend(failed[: MAX_LISTED_FAILURES - len(s.failures)])
                bar.update(rows.num_rows)
                if on_rows is not None:
                    on_rows(rows)
                for message in failed if show_errors else ():
                    bar.write(f"distributed: error: {message}", file=sys.stderr)

            try:
                if self.folder_errors:
                    take(error_rows(self.folder_errors))
                if len(self.todo):
                    ds = build_dataset(ray, self.todo, plan, self.opts, workers, resources)
                    # closing the stream on the way out stops the execution (its actors) at once, not at GC
                    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))  # a generator
                    with contextlib.closing(batches) as stream:  # pyright: ignore[reportArgumentType]
                        for rows in stream:
                            if s.first_row_s is None:
                                s.first_row_s = time.perf_counter() - start
                            take(rows)
                self.writer.commit()
            except KeyboardInterrupt as err:
                self.writer.commit()
                saved = (f"{self.writer.committed} rows of this run committed to {self.writer.output} "
                         f"({s.images} of {len(self.inputs.sources) + len(self.inputs.errors)} inputs done); "
                         "run the same command again to resume")
                raise Interrupted(getattr(err, "signum", signal.SIGINT), saved) from None
            except Exception as err:  # what arrived is kept; a re-run resumes from it
                self.writer.commit()
                raise _unwrapped(err) from None
        s.seconds = time.perf_counter() - start
        return s


def print_summary(s: JobSummary) -> None:
    resumed = f" ({s.resumed} from earlier runs)" if s.resumed else ""
    first = f", first row after {s.first_row_s:.1f} s" if s.first_row_s is not None else ""
    print(f"{s.images} images, {s.predicted} predicted{resumed}, {s.failed} failed, {s.images_per_s:.1f} images/s, "
          f"backend {s.backend} ({s.precision}) x {s.workers} workers{first}, model {s.model}", file=sys.stderr)
    if s.synthetic:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    if s.new_failed:
        print("failed files (the `error` column of the output has them all):", file=sys.stderr)
        for message in s.failures:
            print(f"  {message}", file=sys.stderr)
        if s.new_failed > len(s.failures):
            print(f"  ... and {s.new_failed - len(s.failures)} more", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- CLI

def build_parser() -> ArgumentParser:
    title, _, usage = (__doc__ or "").partition("\n")
    p = ArgumentParser(prog="python -m runtime.distributed", description=title, epilog=usage,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a folder (recursive), a glob, or a .parquet / text list of paths or URIs")
    p.add_argument("--output", required=True,
                   help="folder (local or URI) for the part files; a re-run with the same one resumes")
    p.add_argument("--format", choices=FORMATS, default="parquet", help="part files: parquet (default) or jsonl")
    add_classify_arguments(p, "; the same path must exist on every node")
    p.add_argument("--address", help="join this Ray cluster (auto, ray://head:10001, head:6379); default: a local Ray")
    p.add_argument("--num-workers", type=int, help="inference actors (default: one per GPU share, or one per node)")
    p.add_argument("--num-gpus-per-worker", type=float, default=1.0,
                   help="GPUs per actor of a GPU backend (0.5: two per GPU)")
    p.add_argument("--num-cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per actor (default 1)")
    p.add_argument("--rows-per-file", type=int, default=10_000, help="rows per part file (default 10,000)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_classify_arguments(p, args, "num_workers", "rows_per_file")
    for name in ("num_gpus_per_worker", "num_cpus_per_worker"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be more than 0")
    return args


def run(args: argparse.Namespace) -> int:
    opts = JobOptions(backend=args.backend, precision=args.precision, batch_size=args.batch_size, topk=args.topk,
                      threads=args.threads, num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
                      num_cpus_per_worker=args.num_cpus_per_worker, fmt=args.format, rows_per_file=args.rows_per_file,
                      max_pixels=args.max_pixels, draft=args.draft, progress=args.progress)
    ray = import_ray()
    job = Job(args.input, args.output, args.model, opts, args.artifacts)  # inputs and output checked before Ray starts
    if job.inputs.duplicates:
        print(f"distributed: note: {job.inputs.duplicates} inputs listed more than once; each is classified once",
              file=sys.stderr)
    if job.done_rows:
        print(f"distributed: resuming: {job.done_rows} inputs done earlier, {len(job.todo)} to go", file=sys.stderr)
    t0 = time.perf_counter()
    started = connect(args.address)
    try:
        res = ray.cluster_resources()
        where = "started a local Ray" if started else f"joined the Ray cluster at {args.address or 'this process'}"
        print(f"distributed: {where} ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        with signals_raise_interrupted():  # ray.init replaced the SIGTERM handler run_cli set
            plan = job.plan()[0]
            if plan.choice:
                print(f"backend: {plan.choice}", file=sys.stderr)
            if plan.synthetic:
                print(SYNTHETIC_WARNING, file=sys.stderr)
            summary = job.run(show_errors=True)
    finally:
        if started:
            ray.shutdown()
    print_summary(summary)
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli("distributed", lambda: run(args))


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray ships the stages' functions to workers by module name.
    from runtime.distributed import main as module_main

    sys.exit(module_main())
