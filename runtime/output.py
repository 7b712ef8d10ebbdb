"""Prediction files: text, JSON and CSV writers that survive interruption, and the reader `--resume` uses.

Each prediction is one record, written and flushed as soon as it is known, so what is done is on
disk however the run ends. With an output file the records go to `<output>.partial`; a finished run
renames it to `<output>` (atomically), an interrupted one closes it into a valid file of its format
and leaves it there, and `--resume` reads it back to skip what is already predicted. Every record
of every format is one line (names are escaped or quoted), so even a file cut off by SIGKILL can be
read back up to its last complete record.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import IO

from runtime.classify import Summary
from runtime.predictor import Prediction, display_path

FORMATS = ("text", "json", "csv")
JSON_HEAD = '{"predictions": [\n'


def escape_name(path: Path) -> str:
    """A file name on one text line: backslash, tab, CR and newline escaped, undecodable bytes as \\xNN."""
    raw = os.fsencode(path).decode("utf-8", "surrogateescape")
    out = []
    for ch in raw:
        if ch == "\\":
            out.append("\\\\")
        elif ch in "\t\n\r":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r"}[ch])
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


class RecordFormat:
    """How one format names a file, writes a record and reads records back."""

    def __init__(self, fmt: str, topk: int) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.fmt, self.topk = fmt, topk

    def key(self, path: Path) -> str:
        return escape_name(path) if self.fmt == "text" else display_path(path)

    def header(self) -> str:
        if self.fmt == "json":
            return JSON_HEAD
        if self.fmt == "csv":
            ranks = range(1, self.topk + 1)
            return self._csv_line(["path", "error", *[f"{c}{r}" for r in ranks for c in ("index", "label", "prob")]])
        return ""

    def record(self, pred: Prediction) -> str | None:
        """The record for one prediction (text format has no error records: errors go to stderr)."""
        name = self.key(Path(pred.source))
        if self.fmt == "text":
            if pred.top is None:
                return None
            return f"{name}\t" + "\t".join(f"{label} {p:.4f}" for _, label, p in pred.top) + "\n"
        if self.fmt == "csv":
            top = [v for t in pred.top or [] for v in (t[0], t[1], f"{t[2]:.6f}")]
            return self._csv_line([name, pred.error or "", *top, *[""] * (3 * self.topk - len(top))])
        entry = {"path": name, "error": pred.error} if pred.top is None else {
            "path": name, "top": [{"index": i, "label": label, "prob": p} for i, label, p in pred.top]}
        return json.dumps(entry) + "\n"

    def footer(self, summary: Summary) -> str:
        return f'], "summary": {json.dumps(summary.to_dict())}}}\n' if self.fmt == "json" else ""

    def _csv_line(self, row: list[object]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        return buf.getvalue()

    def read(self, text: str) -> list[tuple[str, str, bool]]:
        """(key, record, failed) for each complete record of a (possibly cut-off) file of this format."""
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()  # a record cut off mid-write
        records: list[tuple[str, str, bool]] = []
        for line in lines:
            if self.fmt == "text":
                records.append((line.split("\t", 1)[0], line, False))
            elif self.fmt == "csv":
                row = next(csv.reader([line]))
                if row and row != next(csv.reader([self.header()])) and len(row) == 2 + 3 * self.topk:
                    records.append((row[0], line, bool(row[1])))
            elif line.lstrip(",").startswith('{"path": '):
                entry = json.loads(line.lstrip(","))
                records.append((entry["path"], json.dumps(entry) + "\n", "error" in entry))
        return records


class PredictionWriter:
    """Writes records as they come; JSON records are joined with commas so the document stays valid."""

    def __init__(self, out: IO[str], fmt: RecordFormat) -> None:
        self.out, self.fmt, self.count = out, fmt, 0
        out.write(fmt.header())
        out.flush()

    def write_record(self, record: str | None) -> None:
        if record is None:
            return
        if self.fmt.fmt == "json" and self.count:
            record = "," + record
        self.out.write(record)
        self.out.flush()
        self.count += 1

    def write(self, pred: Prediction) -> None:
        self.write_record(self.fmt.record(pred))

    def close(self, summary: Summary) -> None:
        self.out.write(self.fmt.footer(summary))
        self.out.flush()


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def read_done(output: Path, fmt: RecordFormat) -> list[tuple[str, str, bool]]:
    """Records an earlier run of the same command finished: its .partial file, else the finished output."""
    for path in (partial_path(output), output):
        if path.is_file():
            return fmt.read(path.read_text(encoding="utf-8", errors="surrogateescape"))
    return []
