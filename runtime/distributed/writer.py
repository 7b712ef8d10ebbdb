"""Where a job's rows go: whole part files under a temporary name, renamed when complete."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.distributed.sources import is_uri, resolve
from runtime.errors import UsageError, signals_deferred
from runtime.paths import check_output_dir

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}
PART_PREFIX = "part-"
TMP_PREFIX = "_tmp-"  # pyarrow and pandas skip names starting with "_" when they read a folder


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
