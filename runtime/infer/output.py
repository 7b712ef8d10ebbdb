"""Prediction files: text, JSON and CSV writers that survive interruption, and the reader `--resume` uses.

One rule for every format: each input gets exactly one record, a prediction or an error, written
and flushed as soon as it is known, so what is done is on disk however the run ends. With an output
file the records go to `<output>.partial`; a finished run renames it to `<output>` (atomically), an
interrupted one closes it into a valid file of its format and leaves it there. `--resume` keeps every
complete record of that file, failed ones included (a file that failed fails the same way again; to
retry failed files, run them without --resume), and classifies only the inputs without a record.

Names are recorded losslessly in every format: backslash, tab, newline and carriage return are
escaped (`\\\\ \\t \\n \\r`) and bytes that are not UTF-8 become `\\xNN`, so two files never share a
name and every record is one line. Files are read back with each format's own reader.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runtime.classify import Summary
from runtime.errors import DeitError, UsageError
from runtime.predictor import Prediction

FORMATS = ("text", "json", "csv")
JSON_HEAD = '{"predictions": [\n'
CSV_FIRST = "path,error,index1,"
TEXT_ERROR = "error"  # text records: `name<TAB>error<TAB>message` (a prediction field is always `label prob`)
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape_text(text: str) -> str:
    """One line, reversible: backslash, tab, newline, CR escaped; surrogate-escaped bytes as \\xNN."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def escape_name(path: Path | str) -> str:
    """A file name as every output format records it (the key `--resume` matches on)."""
    return escape_text(os.fsencode(path).decode("utf-8", "surrogateescape"))


def _unescape(text: str) -> str:
    return re.sub(r"\\(x[0-9a-f]{2}|[\\tnr])",
                  lambda m: {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}.get(m[1]) or chr(int(m[1][1:], 16)), text)


@dataclass(frozen=True)
class DoneRecord:
    """A complete record of an earlier run: the input it is about and, if it failed, why."""

    key: str
    error: str | None


@dataclass(frozen=True)
class Written:
    """What an output file holds: its format, its top-k (None: not visible), its complete records and where they end."""

    fmt: str
    topk: int | None
    records: list[DoneRecord]
    end: int  # characters up to the end of the last complete record


class RecordFormat:
    """How one format writes a record and reads a (possibly cut-off) file of records back."""

    def __init__(self, fmt: str, topk: int) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.fmt, self.topk = fmt, topk

    def header(self) -> str:
        if self.fmt == "json":
            return JSON_HEAD
        if self.fmt == "csv":
            ranks = range(1, self.topk + 1)
            return _csv_line(["path", "error", *[f"{c}{r}" for r in ranks for c in ("index", "label", "prob")]])
        return ""

    def record(self, pred: Prediction) -> str:
        name = escape_name(pred.source)
        if self.fmt == "text":
            if pred.top is None:
                return f"{name}\t{TEXT_ERROR}\t{escape_text(pred.error or '')}\n"
            return f"{name}\t" + "\t".join(f"{label} {p:.4f}" for _, label, p in pred.top) + "\n"
        if self.fmt == "csv":
            top = [v for t in pred.top or [] for v in (t[0], t[1], f"{t[2]:.6f}")]
            return _csv_line([name, pred.error or "", *top, *[""] * (3 * self.topk - len(top))])
        entry = {"path": name, "error": pred.error} if pred.top is None else {
            "path": name, "top": [{"index": i, "label": label, "prob": p} for i, label, p in pred.top]}
        return json.dumps(entry, allow_nan=False) + "\n"  # never a bare NaN: the document stays valid JSON

    def footer(self, summary: Summary) -> str:
        return f'], "summary": {json.dumps(summary.to_dict(), allow_nan=False)}}}\n' if self.fmt == "json" else ""


def _csv_line(row: list[object]) -> str:
    """One CSV record ending in \\n; a field holding \\r or \\n is quoted (the csv module quotes only
    the characters of its line terminator, so it writes with \\r\\n and the terminator is swapped)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(row)
    return buf.getvalue()[:-2] + "\n"


def _lines(text: str, start: int, ends: list[int]) -> Iterator[str]:
    """The \\n-terminated lines of `text` from `start`, noting where each ends (a cut-off last line is not yielded)."""
    pos = start
    while (nl := text.find("\n", pos)) >= 0:
        ends.append(nl + 1)
        yield text[pos:nl + 1]
        pos = nl + 1


def read_written(text: str) -> Written:
    """The complete records of a prediction file of any format (cut off anywhere, closed or not)."""
    if text.startswith(JSON_HEAD):
        return _read_json(text)
    if text.startswith(CSV_FIRST) and "\t" not in text.partition("\n")[0]:  # a text record always has a tab
        return _read_csv(text)
    return _read_text(text)


def _read_text(text: str) -> Written:
    records, end, topk = [], 0, None
    ends: list[int] = []
    for line in _lines(text, 0, ends):
        fields = line[:-1].split("\t")
        if len(fields) < 2:
            break
        if len(fields) == 3 and fields[1] == TEXT_ERROR:
            records.append(DoneRecord(fields[0], _unescape(fields[2])))
        else:
            records.append(DoneRecord(fields[0], None))
            topk = topk or len(fields) - 1
        end = ends[-1]
    return Written("text", topk, records, end)


def _read_csv(text: str) -> Written:
    ends: list[int] = []
    rows = csv.reader(_lines(text, 0, ends))
    records, end, width = [], 0, 0
    try:
        for row in rows:
            if not width:
                width, end = len(row), ends[-1]
                continue
            if len(row) != width:
                break
            records.append(DoneRecord(row[0], row[1] or None))
            end = ends[-1]
    except csv.Error:  # a quoted field cut off by the end of the file
        pass
    return Written("csv", (width - 2) // 3 if width else None, records, end)


def _read_json(text: str) -> Written:
    decoder = json.JSONDecoder()
    records, topk = [], None
    pos = end = len(JSON_HEAD)
    while True:
        start = pos + (text.startswith(",", pos))
        if not text.startswith("{", start):
            break
        try:
            entry, after = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            break
        if not text.startswith("\n", after) or not isinstance(entry, dict) or "path" not in entry:
            break
        records.append(DoneRecord(entry["path"], entry.get("error") if "top" not in entry else None))
        if "top" in entry:
            topk = topk or len(entry["top"])
        pos = end = after + 1
    return Written("json", topk, records, end)


class WriteFailed(DeitError):
    """A record could not be written (a full disk): the message names the file and says what is kept."""


class PredictionWriter:
    """Writes records as they come; JSON records are joined with commas so the document stays valid."""

    def __init__(self, out: IO[str], fmt: RecordFormat, written: int = 0, where: str = "stdout",
                 resumable: bool = False) -> None:
        """`written`: records already in `out` (a resumed file), which then needs no header. `where` names
        `out` in an error; `resumable`: a failed write can be finished with --resume."""
        self.out, self.fmt, self.count = out, fmt, written
        self.where, self.resumable = where, resumable
        if not written:
            self._put(fmt.header())

    def write(self, pred: Prediction) -> None:
        record = self.fmt.record(pred)
        self._put("," + record if self.fmt.fmt == "json" and self.count else record)
        self.count += 1

    def close(self, summary: Summary) -> None:
        self._put(self.fmt.footer(summary))

    def _put(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:  # the reader of stdout left: not a failure of this run
            raise
        except OSError as err:
            then = "; run the same command with --resume once there is room" if self.resumable else ""
            raise WriteFailed(f"{self.where}: {err.strerror or err}; the {self.count} records written before it are "
                              f"kept{then}") from None


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def check_resumable(written: Written, fmt: RecordFormat, shown: Path) -> None:
    """--resume continues only a file of the same format and top-k; anything else is refused in one line."""
    if written.fmt != fmt.fmt and (written.records or written.end):
        raise UsageError(f"--resume: {shown} holds {written.fmt} records; this run asks for --format {fmt.fmt}")
    if written.topk is not None and written.topk != fmt.topk:
        raise UsageError(f"--resume: {shown} was written with --topk {written.topk}; this run asks for --topk {fmt.topk}")
