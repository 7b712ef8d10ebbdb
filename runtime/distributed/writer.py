"""Where a job's rows go: parts written whole on the workers, committed by the driver, described by a manifest.

A write task on a worker turns a batch of result rows into one part file under a `_tmp-` name and
returns only its name and counts; the driver commits it by renaming it `part-<run>-<n>`. The output
folder therefore holds only complete parts, each the result of exactly one completed task (a task
that ran twice, after a lost node, leaves a second `_tmp-` file nobody commits; it is removed at the
end of the run or by the next one). Readers (pyarrow, pandas, Spark) skip names that start with `_`.

`_manifest.json` records what made the rows (the model file and its sha256, backend, precision,
top-k, decoding, format) and every run id; each Parquet part carries the same in its file metadata,
with its run id. A run into an output made with other settings is refused before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.distributed.sources import filesystem_of, is_uri, resolve
from runtime.errors import UsageError, signals_deferred
from runtime.paths import HeldLock, check_output_dir, output_lock

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}
PART_PREFIX = "part-"
TMP_PREFIX = "_tmp-"  # pyarrow and pandas skip names starting with "_" when they read a folder
MANIFEST = "_manifest.json"  # a shard's is `_manifest-s<i>of<n>.json`
LOCK = "_lock"  # a local output's lock: one job's, or shared by shard jobs of one N (each also holds `_lock-s<i>of<n>`)
METADATA_KEY = b"deit"  # the Parquet file metadata entry of a part: its manifest settings and run id
MAX_LISTED_FAILURES = 20  # failure messages a part reports to the driver (its rows hold them all)


def output_schema() -> pa.Schema:
    """One row per input: its source, the top-k (or the error), and the Ray node that classified it."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("indices", pa.list_(pa.int32())), ("labels", pa.list_(pa.string())),
                      ("probs", pa.list_(pa.float64())), ("error", pa.string()), ("node", pa.string())])


def part_schema() -> pa.Schema:
    """What a write task returns to the driver for one part: its temporary name, counts, first failures."""
    import pyarrow as pa

    return pa.schema([("tmp", pa.string()), ("rows", pa.int64()), ("failed", pa.int64()),
                      ("failures", pa.list_(pa.string()))])


@dataclass(frozen=True)
class Part:
    tmp: str
    rows: int
    failed: int
    failures: list[str]


def write_part(batch: pa.Table, output: str, fmt: str, run: str, settings: dict[str, Any]) -> pa.Table:
    """Runs on a worker: one batch of result rows -> one `_tmp-` part file; returns its `part_schema` row."""
    import pyarrow as pa

    fs, root = filesystem_of(output)
    tmp = f"{TMP_PREFIX}{PART_PREFIX}{run}-{secrets.token_hex(8)}{FORMATS[fmt]}"
    _put(fs, f"{root.rstrip('/')}/{tmp}", _encode(batch.cast(output_schema()), fmt, {**settings, "run": run}))
    errors = [e for e in batch["error"].to_pylist() if e]
    return pa.table({"tmp": [tmp], "rows": [batch.num_rows], "failed": [len(errors)],
                     "failures": [errors[:MAX_LISTED_FAILURES]]}, schema=part_schema())


def _encode(table: pa.Table, fmt: str, metadata: dict[str, Any]) -> bytes:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), sink,
                       compression="zstd")
        return sink.getvalue().to_pybytes()
    return "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode("utf-8")


def _put(fs: Any, path: str, data: bytes) -> None:
    """A whole file; on a local disk also synced, so a machine crash cannot leave an empty part behind its rename."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


class Output:
    """The driver's side of an output folder: what earlier runs committed, the manifest, and commits.

    One job writes an output folder at a time, or the N shard jobs of one `--shard I/N`: a local one is
    locked (`_lock`, runtime.paths' lock, held until `close`; shared by shard jobs of one N, each of which
    also holds its shard's `_lock-s<i>of<n>`) before its stale `_tmp-` files are removed, and any other job
    is refused, naming the holder's pid. Rows already there must come from the same sharding (part names
    carry it). An object store has no lock: there one job per output is up to the user.
    """

    def __init__(self, output: str, fmt: str = "parquet", shard: tuple[int, int] | None = None) -> None:
        """`shard` (i, n): this job is shard i of n writing into the output beside the others; its run ids,
        so its part names, start with `s<i>of<n>-`, and its lock, manifest and `_tmp-` clean-up are its own."""
        import pyarrow.fs as pafs

        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.output, self.fmt = output, fmt
        if is_uri(output):
            self.fs, self.root = resolve(output)
        else:
            check_output_dir(Path(output), flag="--output")
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(output)
        self.root = self.root.rstrip("/")
        self.fs.create_dir(self.root, recursive=True)
        self.tag = f"s{shard[0]}of{shard[1]}-" if shard else ""
        self.run = f"{self.tag}{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.manifest = f"{MANIFEST.removesuffix('.json')}-{self.tag[:-1]}.json" if shard else MANIFEST
        self.committed = 0  # rows this run has committed
        self.parts = 0
        self.locks: list[HeldLock] = []
        self._held = contextlib.ExitStack()
        self.shards = shard[1] if shard else 1
        try:
            if not is_uri(output):  # the output's lock, shared by the shard jobs of one N; then the shard's own
                kind = f"shard jobs of {shard[1]}" if shard else None
                self.locks.append(self._held.enter_context(output_lock(Path(self.root) / LOCK, f"--output {output}", kind)))
                if shard:
                    self.locks.append(self._held.enter_context(output_lock(Path(self.root) / f"{LOCK}-{self.tag[:-1]}",
                                                         f"--output {output} (shard {shard[0]}/{shard[1]})")))
            self._scan()
        except BaseException:
            self.close()
            raise

    def _scan(self) -> None:
        """What earlier runs left: their committed parts are kept, their uncommitted `_tmp-` parts removed."""
        names = self._names()
        self.remove_uncommitted(names)
        self.done_parts = [f"{self.root}/{n}" for n in names if n.startswith(PART_PREFIX)]
        foreign = [n for n in names if n.startswith(PART_PREFIX) and not n.endswith(FORMATS[self.fmt])]
        if foreign:
            raise UsageError(f"--output {self.output} holds other part files ({foreign[0]}); use the --format they "
                             "were written in, or another --output")
        other = next((n for n in names if n.startswith(PART_PREFIX) and part_shards(n) != self.shards), None)
        if other:  # its inputs were split by another N: this job's shard would miss some and repeat others
            theirs = part_shards(other)
            raise UsageError(f"--output {self.output} holds rows of {'an unsharded job' if theirs == 1 else f'--shard I/{theirs}'} "
                             f"({other}); resume it {'without --shard' if theirs == 1 else f'with --shard I/{theirs}'}, "
                             "or use another --output")

    def _names(self) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def done(self, ray: Any) -> ray.data.Dataset | None:
        """(key, error) of every row earlier runs committed, read by tasks; None when there are none."""
        if not self.done_parts:
            return None
        if self.fmt == "parquet":
            ds = ray.data.read_parquet(self.done_parts, filesystem=self.fs, columns=["path", "error"])
        else:
            ds = ray.data.read_json(self.done_parts, filesystem=self.fs)
        return ds.map_batches(_done_batch, batch_format="pyarrow")

    def check_manifest(self, settings: dict[str, Any]) -> None:
        """Refuse (one line, before any work) to add rows made with other settings; record this run."""
        stem = MANIFEST.removesuffix(".json")
        own: dict[str, Any] = {"settings": settings, "runs": []}
        for name in self._names():  # every shard's manifest: shards of one output make the same rows
            if name != MANIFEST and not (name.startswith(stem + "-") and name.endswith(".json")):
                continue
            path = f"{self.root}/{name}"
            try:
                with self.fs.open_input_stream(path) as f:
                    manifest = json.loads(f.read())
            except FileNotFoundError:  # not there any more
                continue
            except (OSError, ValueError) as err:
                raise UsageError(f"{path}: unreadable manifest ({err}); use another --output") from None
            theirs = manifest.get("settings", {})
            differ = [k for k in settings if k != "model" and theirs.get(k, settings[k]) != settings[k]]  # an older
            # manifest may lack a later key
            if differ and self.done_parts:
                was = ", ".join(f"{k} {theirs.get(k)}" for k in differ)
                now = ", ".join(f"{k} {settings[k]}" for k in differ)
                raise UsageError(f"--output {self.output} holds rows made with {was}; this run would use {now}: "
                                 "resume with the same settings, or use another --output")
            if name == self.manifest:
                own = manifest
        own["settings"] = settings
        own["runs"] = [*own.get("runs", []), self.run]
        tmp = f"{self.root}/{TMP_PREFIX}{self.manifest.lstrip('_')}"
        _put(self.fs, tmp, (json.dumps(own, indent=1) + "\n").encode())
        self.fs.move(tmp, f"{self.root}/{self.manifest}")

    def commit(self, part: Part) -> str:
        """Make a part that a task wrote visible under its final name (a rename: all or nothing); that name."""
        with signals_deferred():  # Ctrl-C waits until the part is renamed and counted
            name = f"{PART_PREFIX}{self.run}-{self.parts:05d}{FORMATS[self.fmt]}"
            self.fs.move(f"{self.root}/{part.tmp}", f"{self.root}/{name}")
            self.committed += part.rows
            self.parts += 1
        return name

    def close(self, finished: bool = False) -> None:
        """Let another job write the output (a `finished` one leaves no lock file behind)."""
        for lock in self.locks:
            lock.remove = finished
        self._held.close()

    def remove_uncommitted(self, names: list[str] | None = None) -> None:
        """This shard's `_tmp-` parts nobody committed (a task that ran twice, a run stopped mid-write); other
        shards' are theirs (a run id starts with a digit, or with the shard tag)."""
        mine = TMP_PREFIX + PART_PREFIX + self.tag
        for name in self._names() if names is None else names:
            if name.startswith(mine) and name[len(mine):][:1].isdigit():
                self.fs.delete_file(f"{self.root}/{name}")


def part_shards(name: str) -> int:
    """The N of the shard jobs that wrote a part (its name starts `part-s<i>of<n>-`), 1 for an unsharded job."""
    tag = name.removeprefix(PART_PREFIX).split("-", 1)[0]
    index, of, count = tag[1:].partition("of")
    return int(count) if tag.startswith("s") and of and index.isdecimal() and count.isdecimal() else 1


def _done_batch(batch: pa.Table) -> pa.Table:
    import pyarrow as pa

    return pa.table({"key": batch["path"].cast(pa.string()), "error": batch["error"].cast(pa.string())})
