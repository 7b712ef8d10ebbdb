"""Every CLI against bad paths, odd images, broken metadata, huge arguments and interrupts.

Each case asserts the exit status of the one error policy (runtime/errors.py), that stderr says the
problem in one line with no traceback, that finished work is on disk, and (for the big inputs) that
the process's own peak memory stays bounded. CLIs run as real subprocesses where signals, memory or
file permissions are part of the case.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from PIL import Image

from benchmarks.export_time import run_measured
from conftest import SAMPLE_DIR, first_record, needs_sample, photos, stalling_file
from runtime.artifact import file_sha256, read_onnx_meta

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def cli(*args: str, prefix: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, PY, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_line(stderr: str, start: str) -> str:
    """The last line of stderr is the error; nothing on stderr is a traceback; every line starts at column 0."""
    assert "Traceback" not in stderr and "\r" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(start), stderr
    return lines[-1]


def without_dac_override() -> tuple[str, ...]:
    """As root, permissions are only real without CAP_DAC_OVERRIDE: run the CLI under setpriv."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and util-linux `setpriv` (to drop CAP_DAC_OVERRIDE) is not installed")
    caps = "-dac_override,-dac_read_search"
    return (setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}")


def grey_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black greyscale PNG of any size, streamed (a 17000 x 17000 one is ~300 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


# --- output locations are checked before any work -------------------------------------------------

def test_infer_output_locations_are_refused_before_work(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 3)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    model = ("--model", str(tiny_artifact), "--backend", "ort-cpu")
    for output, says in ((tmp_path / "a-folder", "is a folder"), (tmp_path / "a-file" / "out.csv", "is not a folder")):
        proc = cli("runtime.infer", str(images), *model, "--output", str(output))
        assert proc.returncode == 2 and says in assert_one_line(proc.stderr, "infer: error: --output"), proc.stderr
        assert proc.stdout == ""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    proc = cli("runtime.infer", str(images), *model, "--output", str(tmp_path / "ro" / "out.csv"),
               prefix=without_dac_override())
    assert proc.returncode == 2 and "cannot write" in assert_one_line(proc.stderr, "infer: error: --output")
    assert not list((tmp_path / "ro").iterdir())


def test_output_follows_a_symlink_writes_a_fifo_through_and_refuses_a_socket(tiny_artifact: Path, tmp_path: Path) -> None:
    """Stand-ins for devices (tests never touch the real /dev): a symlink, a FIFO, a socket."""
    images = photos(tmp_path / "images", 2)
    model = ("--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", "csv", "--no-progress")
    (tmp_path / "real").mkdir()
    link = tmp_path / "latest.csv"
    link.symlink_to(tmp_path / "real" / "run1.csv")  # dangling until the run writes its target
    proc = cli("runtime.infer", str(images), *model, "--output", str(link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and len(list(csv.DictReader(io.StringIO(link.read_text())))) == 2
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["run1.csv"]  # no partial or lock left

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    proc = cli("runtime.infer", str(images), *model, "--output", str(fifo))
    reader.join(timeout=120)
    assert proc.returncode == 0 and "records go straight to it" in proc.stderr, proc.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode) and len(list(csv.DictReader(io.StringIO(got[0])))) == 2
    assert not Path(f"{fifo}.partial").exists() and not Path(f"{fifo}.partial.lock").exists()
    proc = cli("runtime.infer", str(images), *model, "--output", str(fifo), "--resume")
    assert proc.returncode == 2 and "is a device or FIFO" in assert_one_line(proc.stderr, "infer: error: --resume")

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        proc = cli("runtime.infer", str(images), *model, "--output", str(tmp_path / "sock"))
    assert proc.returncode == 2 and "not a regular file, character device or FIFO" in assert_one_line(
        proc.stderr, "infer: error: --output")


def test_closed_stdout_is_refused_before_work(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 1)
    proc = subprocess.run([PY, "-m", "runtime.infer", str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu"],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2, proc.stderr
    assert "stdout is closed; give --output FILE" in assert_one_line(proc.stderr, "infer: error: ")


def test_thread_counts_are_bounded_by_the_usable_cores(tiny_artifact: Path, tmp_path: Path) -> None:
    from runtime.cpuinfo import usable_cores

    images = photos(tmp_path / "images", 1)
    far = str(4 * usable_cores() + 1)
    for args in (("runtime.infer", str(images), "--threads", far), ("runtime.infer", str(images), "--workers", far),
                 ("benchmarks", "--threads", far, "--out", str(tmp_path / "bench"))):
        proc = cli(*args, "--model", str(tiny_artifact))
        assert proc.returncode == 2 and f"{far}: more than 4x the {usable_cores()} usable cores" in assert_one_line(
            proc.stderr, f"{args[0].split('.')[-1]}: error: --"), proc.stderr
    above = str(usable_cores() + 1)
    proc = cli("runtime.infer", str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--threads", above)
    assert proc.returncode == 0 and f"warning: --threads {above} is more than the {usable_cores()} usable cores" in proc.stderr


def test_a_full_disk_is_refused_before_work(tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import runtime.paths
    from runtime.infer import main

    images = photos(tmp_path / "images", 3)
    monkeypatch.setattr(runtime.paths.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 100))  # type: ignore[attr-defined]
    rc = main([str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--output", str(tmp_path / "o.csv"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "MiB free" in assert_one_line(err, "infer: error: --output")
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "o.csv.partial").exists()


def test_an_interrupted_benchmark_writes_the_rows_that_finished(tiny_artifact: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import benchmarks.__main__ as bench_cli
    import benchmarks.harness
    from runtime.errors import Interrupted

    measure = benchmarks.harness.measure_row

    def interrupted_second(spec, *args, **kwargs):  # type: ignore[no-untyped-def]
        if spec.label != "ort-cpu":
            raise Interrupted(signal.SIGTERM)  # as the signal handler raises it mid-measurement
        return measure(spec, *args, **kwargs)

    monkeypatch.setattr(benchmarks.harness, "measure_row", interrupted_second)
    out = tmp_path / "bench"
    rc = bench_cli.main(["--model", str(tiny_artifact), "--backends", "ort-cpu,torch-eager", "--batch-sizes", "1",
                         "--min-iters", "2", "--min-time", "0", "--warmup", "1", "--no-ceilings", "--no-auto",
                         "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 143 and "the 1 rows that finished are in" in assert_one_line(err, "benchmarks: terminated")
    report = json.loads((out / "results.json").read_text())
    assert report["interrupted"] == "SIGTERM" and [r["label"] for r in report["backends"]] == ["ort-cpu"]
    assert "Interrupted (SIGTERM)" in (out / "results.md").read_text()


def test_export_checks_for_room_before_loading_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import export.__main__ as export_cli
    import export.pipeline
    import runtime.paths
    from runtime.checkpoints import load_checkpoint, parameter_count

    loaded = load_checkpoint(str(tiny_checkpoint))
    assert parameter_count(str(tiny_checkpoint)) == sum(p.numel() for p in loaded.model.parameters())

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was loaded before the room for its export was checked")

    monkeypatch.setattr(export.pipeline, "load_checkpoint", load)
    monkeypatch.setattr(runtime.paths.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))  # type: ignore[attr-defined]
    rc = export_cli.main(["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "MiB free" in assert_one_line(capsys.readouterr().err, "export: error: --out")


def test_export_and_benchmarks_refuse_an_output_that_is_a_file(tiny_artifact: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import benchmarks.__main__ as bench_cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("export", "--model", "facebook/deit-tiny-patch16-224", "--weights", "synthetic", "--out", str(blocker))
    assert proc.returncode == 2 and "is a file" in assert_one_line(proc.stderr, "export: error: --out")

    def measured(*args: object, **kwargs: object) -> None:
        raise AssertionError("the benchmark measured before refusing --out")

    monkeypatch.setattr(bench_cli, "run_benchmark", measured)  # refused before measuring anything
    rc = bench_cli.main(["--model", str(tiny_artifact), "--backends", "ort-cpu", "--out", str(blocker), "--no-progress"])
    assert rc == 2 and "is a file" in assert_one_line(capsys.readouterr().err, "benchmarks: error: --out")


# --- interrupts keep what was finished; --resume completes it --------------------------------------

SPLIT_RECORD = """
import signal, sys, threading
import runtime.infer.output
from runtime.errors import leave
from runtime.infer import main

at, signum = int(sys.argv[1]), int(sys.argv[2])
write = runtime.infer.output.PredictionWriter.write


class Halves:  # record `at` reaches the file in two writes, the signal delivered to this thread between them
    def __init__(self, out):
        self.out = out

    def write(self, text):
        self.out.write(text[: len(text) // 2])
        self.out.flush()
        signal.pthread_kill(threading.get_ident(), signum)
        self.out.write(text[len(text) // 2 :])

    def flush(self):
        self.out.flush()


def split(self, pred):
    if self.count != at:
        return write(self, pred)
    out, self.out = self.out, Halves(self.out)
    try:
        write(self, pred)
    finally:
        self.out = out


runtime.infer.output.PredictionWriter.write = split
leave(main(sys.argv[3:]))
"""


def sample_subset(folder: Path, n: int) -> Path:
    """The first `n` shared photos (links) and a file that fails, sorted first, so every format has an error record."""
    folder.mkdir()
    for photo in sorted(SAMPLE_DIR.iterdir())[:n]:
        (folder / photo.name).symlink_to(photo)
    (folder / "0-broken.jpg").write_bytes(b"not a picture")
    return folder


@needs_sample()
@pytest.mark.parametrize(("fmt", "signum"), [("text", signal.SIGINT), ("csv", signal.SIGTERM), ("json", signal.SIGINT),
                                             ("json", signal.SIGTERM)])
def test_a_signal_mid_record_keeps_whole_records_that_resume_completes(tiny_artifact: Path, tmp_path: Path, fmt: str,
                                                                      signum: int) -> None:
    """The signal lands between the two halves of record 6: the record is finished first (only the project's
    handler defers it: Python's own SIGINT would cut the record, SIGTERM would kill the process), the partial is a
    valid file of whole records, and --resume completes it into exactly the uninterrupted output, the failed file
    kept as failed rather than tried again."""
    images = sample_subset(tmp_path / "images", 24)
    common = [str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", fmt, "--no-progress",
              "--batch-size", "4", "--workers", "1"]
    reference = tmp_path / f"reference.{fmt}"
    assert cli("runtime.infer", *common, "--output", str(reference)).returncode == 1
    out = tmp_path / f"out.{fmt}"
    partial = Path(f"{out}.partial")
    first = subprocess.run([PY, "-c", SPLIT_RECORD, "6", str(int(signum)), *common, "--output", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 128 + signum, first.stderr
    last = assert_one_line(first.stderr, "infer: ")
    assert ("interrupted" if signum == signal.SIGINT else "terminated") in last
    assert f"7 records kept in {partial}; run the same command with --resume" in last
    assert not out.exists()
    text = partial.read_text()
    if fmt == "json":
        kept = json.loads(text)  # closed into a valid document
        assert kept["summary"]["interrupted"] is True and len(kept["predictions"]) == kept["summary"]["images"] == 7
    else:
        assert text.endswith("\n") and len(text.splitlines()) == 7 + (fmt == "csv")
    resumed = cli("runtime.infer", *common, "--output", str(out), "--resume")
    assert resumed.returncode == 1, resumed.stderr
    assert "resuming: 7 files done earlier, 18 to go" in resumed.stderr
    assert f"infer: error: {images / '0-broken.jpg'}" not in resumed.stderr  # not decoded again
    assert "25 images, 24 predicted (6 from earlier runs), 1 failed" in resumed.stderr
    assert not partial.exists() and not Path(f"{partial}.lock").exists()
    if fmt == "json":
        got, want = json.loads(out.read_text()), json.loads(reference.read_text())
        assert got["predictions"] == want["predictions"] and got["summary"]["images"] == 25
    else:
        assert out.read_text() == reference.read_text()


def test_resume_refuses_another_format_topk_or_model(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 8)
    out = tmp_path / "out.csv"
    common = [str(images), "--backend", "ort-cpu", "--no-progress", "--batch-size", "2", "--output", str(out)]
    model = ["--model", str(tiny_artifact)]
    first = subprocess.run([PY, "-c", SPLIT_RECORD, "3", str(int(signal.SIGTERM)), *common, *model, "--format", "csv",
                            "--topk", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 143, first.stderr
    kept = Path(f"{out}.partial").read_bytes()
    for changed, says in (
        ([*model, "--format", "json", "--topk", "2"], "holds csv records; this run asks for --format json"),
        ([*model, "--format", "csv", "--topk", "3"], "was written with --topk 2; this run asks for --topk 3"),
        (["--model", str(tiny_artifact / "model.fp16.onnx"), "--format", "csv", "--topk", "2"], "by another model"),
    ):
        proc = cli("runtime.infer", *common, *changed, "--resume")
        assert proc.returncode == 2 and says in assert_one_line(proc.stderr, "infer: error: --resume: "), proc.stderr
        assert Path(f"{out}.partial").read_bytes() == kept, "a refused resume leaves the partial as it was"
    proc = cli("runtime.infer", *common, *model, "--format", "csv", "--topk", "2", "--resume")
    assert proc.returncode == 0 and len(list(csv.DictReader(io.StringIO(out.read_text())))) == 8, proc.stderr


def test_a_second_run_on_the_same_output_is_refused_before_work(tiny_artifact: Path, tmp_path: Path) -> None:
    from runtime.paths import output_lock

    images = photos(tmp_path / "images", 2)
    out = tmp_path / "out.csv"
    with output_lock(Path(f"{out}.partial.lock"), str(out)):  # as a first run holds it while it writes
        proc = cli("runtime.infer", str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert f"{out}: another run (pid {os.getpid()}) is writing it" in assert_one_line(proc.stderr, "infer: error: ")
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize("fmt", ["text", "csv", "json"])
def test_every_file_name_is_one_record_fresh_and_resumed(tiny_artifact: Path, tmp_path: Path, fmt: str) -> None:
    """Line breaks of every kind in names, and a non-UTF-8 byte beside a name spelling its escape: one record each,
    read back by the format's own reader, and --resume after an interrupt gives the uninterrupted file."""
    from runtime.infer.output import escape_name

    folder = photos(tmp_path / "images", 6)
    names = [b"cr\rname.png", b"ff\x0cname.png", "ls\u2028name.png".encode(), b"nl\nname.png", b"a\xff.png", b"a\\xff.png"]
    for old, new in zip(sorted(folder.iterdir()), names):
        old.rename(os.fsdecode(os.fsencode(folder) + b"/" + new))
    files = sorted(folder.iterdir())
    common = [str(folder), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", fmt, "--no-progress",
              "--batch-size", "2", "--workers", "1"]
    reference = tmp_path / "reference"
    assert cli("runtime.infer", *common, "--output", str(reference)).returncode == 0
    text = reference.read_bytes().decode("utf-8", "surrogateescape")
    if fmt == "csv":
        keys = [row["path"] for row in csv.DictReader(io.StringIO(text, newline=""))]
    elif fmt == "json":
        keys = [p["path"] for p in json.loads(text)["predictions"]]
    else:
        keys = [line.split("\t")[0] for line in text.split("\n")[:-1]]
    assert sorted(keys) == sorted(escape_name(f) for f in files) and len(set(keys)) == 6
    out = tmp_path / "out"
    first = subprocess.run([PY, "-c", SPLIT_RECORD, "3", str(int(signal.SIGTERM)), *common, "--output", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert first.returncode == 143, first.stderr
    resumed = cli("runtime.infer", *common, "--output", str(out), "--resume")
    assert resumed.returncode == 0 and "resuming: 4 files done earlier, 2 to go" in resumed.stderr, resumed.stderr
    if fmt == "json":
        assert json.loads(out.read_text())["predictions"] == json.loads(reference.read_text())["predictions"]
    else:
        assert out.read_bytes() == reference.read_bytes()


FULL_DISK = """
import errno, io, os, sys
import runtime.infer.cli
from runtime.errors import leave

room = int(sys.argv[1])


class Full(io.FileIO):  # the disk fills up once this file reaches `room` bytes
    def write(self, data):
        if self.tell() + len(data) > room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


runtime.infer.cli.open = lambda file, mode="r", buffering=-1, **kw: Full(file, mode.replace("b", ""))
leave(runtime.infer.cli.main(sys.argv[2:]))
"""


def test_a_full_disk_mid_run_names_the_file_keeps_it_and_resume_finishes(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 10)
    common = [str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", "csv", "--no-progress",
              "--batch-size", "2"]
    reference = tmp_path / "reference.csv"
    assert cli("runtime.infer", *common, "--output", str(reference)).returncode == 0
    out = tmp_path / "out.csv"
    partial = Path(f"{out}.partial")
    room = len("".join(reference.read_text().splitlines(keepends=True)[:5])) + 20  # the header, 4 records and a bit
    proc = subprocess.run([PY, "-c", FULL_DISK, str(room), *common, "--output", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert assert_one_line(proc.stderr, "infer: error: ") == (
        f"infer: error: {partial}: No space left on device; the 4 records written before it are kept; "
        "run the same command with --resume once there is room")
    assert partial.stat().st_size <= room and not out.exists()
    resumed = cli("runtime.infer", *common, "--output", str(out), "--resume")
    assert resumed.returncode == 0 and "4 files done earlier, 6 to go" in resumed.stderr, resumed.stderr
    assert out.read_text() == reference.read_text()


def test_sigterm_stops_a_run_whose_decoder_is_stuck(tiny_artifact: Path, tmp_path: Path) -> None:
    """SIGTERM, sent once the first record is on disk, ends the run within seconds although a decode thread is
    scanning a 2 GiB file; the records are kept, and --resume (with the default --max-file-bytes) refuses that
    file from its size and finishes."""
    images = photos(tmp_path / "images", 3)
    stalling_file(images / "stall.jpg")
    out = tmp_path / "out.csv"
    common = [str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", "csv", "--no-progress",
              "--batch-size", "1", "--workers", "1", "--output", str(out)]
    proc = subprocess.Popen([PY, "-m", "runtime.infer", *common, "--max-file-bytes", str(4 * 2**30)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_record(Path(f"{out}.partial"), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # the scan alone would take minutes
    assert proc.returncode == 143, err
    assert "terminated" in assert_one_line(err, "infer: ") and Path(f"{out}.partial").is_file()
    resumed = cli("runtime.infer", *common, "--resume")
    assert resumed.returncode == 1, resumed.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [Path(r["path"]).name for r in rows] == ["0000.png", "0001.png", "0002.png", "stall.jpg"]
    assert rows[-1]["error"] == f"{images / 'stall.jpg'}: refused, 2,048 MiB is over the limit of 256 MiB (--max-file-bytes)"


def test_sigterm_closes_json_on_stdout(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 2)
    stalling_file(images / "stall.jpg")
    proc = subprocess.Popen([PY, "-m", "runtime.infer", str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu",
                             "--format", "json", "--batch-size", "1", "--workers", "1", "--no-progress",
                             "--max-file-bytes", str(4 * 2**30)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    head = b""
    while head.count(b"\n") < 2:  # the document's opening and the first record (raw reads: nothing buffered here)
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, proc.communicate()
        head += chunk
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    doc = json.loads(head + out)  # closed into valid JSON
    assert doc["summary"]["interrupted"] is True and len(doc["predictions"]) == doc["summary"]["images"]
    assert doc["summary"]["images"] in (1, 2)


# --- inputs that must not get past the guards -----------------------------------------------------

def test_decompression_bomb_is_refused_from_its_header_in_bounded_memory(tiny_artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bombs"
    folder.mkdir()
    grey_png(folder / "bomb.png", 17_000, 17_000)
    assert (folder / "bomb.png").stat().st_size < 1_000_000
    photos(folder, 2)
    rc, _, peak_kib, err = run_measured([PY, "-m", "runtime.infer", str(folder), "--model", str(tiny_artifact),
                                         "--backend", "ort-cpu", "--no-progress"])
    assert rc == 1, err
    assert "289 Mpx is over the limit of 256 Mpx" in err and "2 predicted, 1 failed" in err
    # The baseline: the same run on the two photos alone. Decoding the bomb would add its 276 MiB of pixels.
    plain = photos(tmp_path / "plain", 2)
    baseline_kib = run_measured([PY, "-m", "runtime.infer", str(plain), "--model", str(tiny_artifact), "--backend",
                                 "ort-cpu", "--no-progress"])[2]
    assert peak_kib < baseline_kib + 64 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB, {baseline_kib / 1024:.0f} without the bomb"
    big = grey_png(tmp_path / "big.png", 8_000, 8_000)
    proc = cli("runtime.infer", str(big), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--max-pixels", "50000000")
    assert proc.returncode == 1 and "64 Mpx is over the limit of 50 Mpx" in proc.stderr
    small = grey_png(tmp_path / "small.png", 500, 375)
    proc = cli("runtime.infer", str(small), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--max-pixels", "100000")
    assert proc.returncode == 1 and "500 x 375 = 187,500 pixels is over the limit of 100,000 pixels" in proc.stderr


def test_huge_photos_are_decoded_once_and_share_one_memory_budget(tiny_artifact: Path, tmp_path: Path) -> None:
    """Peak memory relative to the same run on a tiny photo: one 8000 x 8000 JPEG costs about its decoded
    pixels (4 bytes each in Pillow), not a copy per step; two decoded by two threads under a budget that fits
    one cost about what one does."""
    width = height = 8000
    folders = {name: tmp_path / name for name in ("tiny", "one", "two")}
    for folder in folders.values():
        folder.mkdir()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(folders["tiny"] / "a.jpg")
    Image.new("RGB", (width, height), (120, 30, 200)).save(folders["one"] / "a.jpg")
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(folders["one"] / "a.jpg", folders["two"] / name)
    pixels = 4 * width * height
    peak = {}
    for name, folder in folders.items():
        rc, _, peak_kib, err = run_measured([PY, "-m", "runtime.infer", str(folder), "--model", str(tiny_artifact),
                                             "--backend", "ort-cpu", "--no-progress", "--workers", "2", "--batch-size", "1",
                                             "--decode-memory", str(int(1.2 * 2 * pixels))])
        assert rc == 0, err
        peak[name] = peak_kib * 1024
    one, two = peak["one"] - peak["tiny"], peak["two"] - peak["tiny"]
    assert one < 1.5 * pixels, f"one photo of {pixels / 2**20:.0f} MiB of pixels took {one / 2**20:.0f} MiB"
    assert two < 1.5 * one, f"two photos took {two / 2**20:.0f} MiB, one {one / 2**20:.0f} MiB: decoded at once"
    # A JPEG that alone needs more than the whole budget is decoded at a reduced scale (as --draft does).
    rc, _, peak_kib, err = run_measured([PY, "-m", "runtime.infer", str(folders["one"]), "--model", str(tiny_artifact),
                                         "--backend", "ort-cpu", "--no-progress", "--decode-memory", str(pixels // 4)])
    assert rc == 0, err
    assert peak_kib * 1024 - peak["tiny"] < 0.25 * one, f"{(peak_kib * 1024 - peak['tiny']) / 2**20:.0f} MiB over budget"


def test_huge_batch_size_is_refused_before_anything_is_allocated(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 1)
    rc, wall, peak_kib, err = run_measured([PY, "-m", "runtime.infer", str(images), "--model", str(tiny_artifact),
                                            "--batch-size", "100000"])
    assert rc == 2 and "between 1 and 256" in assert_one_line(err, "infer: error: --batch-size")
    # The baseline: a usage error that allocates nothing (no such input). 100,000 images would be over 1 GiB here.
    baseline_kib = run_measured([PY, "-m", "runtime.infer", str(tmp_path / "missing"), "--model", str(tiny_artifact)])[2]
    assert peak_kib < baseline_kib + 64 * 1024, (peak_kib, baseline_kib)


def test_a_named_model_file_is_the_file_that_runs(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 2)
    proc = cli("runtime.infer", str(images), "--model", str(tiny_artifact / "model.fp16.onnx"), "--backend", "ort-cpu")
    assert proc.returncode == 0 and "backend ort-cpu (fp16)" in proc.stderr, proc.stderr
    proc = cli("runtime.infer", str(images), "--model", str(tiny_artifact / "model.fp16.onnx"), "--precision", "int8",
               "--backend", "ort-cpu")
    assert proc.returncode == 2 and "is a fp16 model" in assert_one_line(proc.stderr, "infer: error:")
    proc = cli("runtime.infer", str(images), "--model", str(tiny_artifact / "model.fp16.onnx"), "--backend", "torch-sdpa")
    assert proc.returncode == 2 and "cannot run an ONNX file" in assert_one_line(proc.stderr, "infer: error:")


def test_metadata_written_by_another_version(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 2)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "export.json").write_text("{}")  # records no hashes: the edited file is not a damaged one
    model = onnx.load(str(tiny_artifact / "model.onnx"))
    data = json.loads(read_onnx_meta(tiny_artifact / "model.onnx").to_json())
    data |= {"writer": "deit-deploy 3.0.0", "a_field_from_the_future": [1, 2]}
    model.metadata_props[-1].value = json.dumps(data)
    onnx.save(model, str(artifact / "model.onnx"))
    assert cli("runtime.infer", str(images), "--model", str(artifact), "--backend", "ort-cpu").returncode == 0
    del data["preprocessing"]
    model.metadata_props[-1].value = json.dumps(data)
    onnx.save(model, str(artifact / "model.onnx"))
    proc = cli("runtime.infer", str(images), "--model", str(artifact), "--backend", "ort-cpu")
    last = assert_one_line(proc.stderr, "infer: error:")
    assert proc.returncode == 5 and "model.onnx" in last and "preprocessing" in last and "deit-deploy 3.0.0" in last


def edited_artifact(tiny_artifact: Path, folder: Path, edit: Callable[[onnx.ModelProto], None],
                    record: bool = True) -> Path:
    """A copy of the artifact whose model.onnx is edited; `record`: export.json records the edited file's
    sha256 (a faithful export of a bad model), else the original's (a file damaged after the export)."""
    shutil.copytree(tiny_artifact, folder)
    model = onnx.load(str(folder / "model.onnx"))
    edit(model)
    onnx.save(model, str(folder / "model.onnx"))
    if record:
        report = json.loads((folder / "export.json").read_text())
        report["files"]["model.onnx"]["sha256"] = file_sha256(folder / "model.onnx")
        (folder / "export.json").write_text(json.dumps(report))
    return folder


def test_a_model_that_is_not_what_the_export_recorded_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    images = photos(tmp_path / "images", 2)
    damaged = shutil.copytree(tiny_artifact, tmp_path / "damaged")
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside the weights: the file still parses and runs
    (damaged / "model.onnx").write_bytes(bytes(data))
    proc = cli("runtime.infer", str(images), "--model", str(damaged), "--backend", "ort-cpu")
    last = assert_one_line(proc.stderr, "infer: error: ")
    assert proc.returncode == 5 and f"{damaged / 'model.onnx'}: contents differ from what the export recorded" in last
    assert proc.stdout == ""

    def rename_input(model: onnx.ModelProto) -> None:
        model.graph.input[0].name = "images"
        for node in model.graph.node:
            node.input[:] = ["images" if name == "pixel_values" else name for name in node.input]

    other = edited_artifact(tiny_artifact, tmp_path / "other", rename_input)
    proc = cli("runtime.infer", str(images), "--model", str(other), "--backend", "ort-cpu")
    last = assert_one_line(proc.stderr, "infer: error: ")
    assert proc.returncode == 5 and "model.onnx: the model takes ['images']" in last and "feeds ['pixel_values']" in last


def test_a_model_with_a_nan_weight_gives_error_rows_and_valid_json(tiny_artifact: Path, tmp_path: Path) -> None:
    def poison(model: onnx.ModelProto) -> None:
        weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(weight).copy()
        values.flat[0] = np.nan
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))

    artifact = edited_artifact(tiny_artifact, tmp_path / "nan", poison)
    images = photos(tmp_path / "images", 3)
    proc = cli("runtime.infer", str(images), "--model", str(artifact), "--backend", "ort-cpu", "--format", "json")
    assert proc.returncode == 1, proc.stderr

    def bare(constant: str) -> None:
        raise AssertionError(f"bare {constant} in the JSON output")

    doc = json.loads(proc.stdout, parse_constant=bare)
    assert [("top" in p, "not finite" in p.get("error", "")) for p in doc["predictions"]] == [(False, True)] * 3


def test_a_folder_reads_every_format_pillow_decodes_and_counts_what_it_skips(tiny_artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    picture.save(folder / "a.jfif", format="JPEG")
    picture.save(folder / "b.apng", format="PNG", save_all=True, append_images=[picture.rotate(90)])
    picture.save(folder / "c.avif", format="AVIF")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "data.json").write_text("{}")
    (folder / "more.txt").write_text("nor this")
    proc = cli("runtime.infer", str(folder), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(Path(line.split("\t")[0]).name for line in proc.stdout.splitlines()) == ["a.jfif", "b.apng", "c.avif"]
    assert "infer: note: 3 files skipped for their extension (.txt 2, .json 1)" in proc.stderr


def test_a_calibration_report_of_another_shape_is_no_int8_gate(tiny_artifact: Path, tmp_path: Path) -> None:
    from runtime.backends.auto import int8_gate_passed

    images = photos(tmp_path / "images", 1)
    artifact = shutil.copytree(tiny_artifact, tmp_path / "artifact")
    for text in ("[]", '"passed"', '{"passed": true, "gate": []}', "{not json"):
        (artifact / "calibration.json").write_text(text)
        assert int8_gate_passed(artifact) is False, text
    proc = cli("runtime.infer", str(images), "--model", str(artifact), "--backend", "auto", "--no-progress")
    assert proc.returncode == 0 and "infer: backend: " in proc.stderr, proc.stderr


def test_unreadable_and_symlinked_folders(tiny_artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    photos(root / "ok", 1)
    photos(root / "secret", 1).chmod(0o000)
    photos(tmp_path / "elsewhere", 2)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "ok" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: must not loop
    proc = cli("runtime.infer", str(root), "-r", "--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", "csv",
               prefix=without_dac_override())
    (root / "secret").chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert sorted(Path(r["path"]).relative_to(root).as_posix() for r in rows if not r["error"]) == [
        "linked/0000.png", "linked/0001.png", "ok/0000.png"]
    assert [r["error"] for r in rows if r["error"]] == [f"{root / 'secret'}: cannot read folder (Permission denied)"]
    assert "already visited (a symlink loop)" in proc.stderr


def test_images_that_would_decode_to_another_picture(tiny_artifact: Path, tmp_path: Path) -> None:
    folder = tmp_path / "deep"
    folder.mkdir()
    grey = np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)
    Image.fromarray(grey).save(folder / "grey8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray((grey // 64).astype(np.uint16)).save(folder / "dark16.png")  # 0..3 of 65535: black on screen
    Image.fromarray(grey.astype(np.float32) / 255.0, mode="F").save(folder / "unit.tif")
    Image.fromarray(grey.astype(np.float32) * 10.0, mode="F").save(folder / "hdr.tif")
    proc = cli("runtime.infer", str(folder), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--format", "json",
               "--topk", "10")
    assert proc.returncode == 1
    by_name = {Path(p["path"]).name: p for p in json.loads(proc.stdout)["predictions"]}
    assert "a viewer shows it black" in by_name["dark16.png"]["error"]
    assert "only [0, 1] has a defined look" in by_name["hdr.tif"]["error"]
    for same in ("grey16.png", "unit.tif"):
        assert by_name[same]["top"] == by_name["grey8.png"]["top"], same


def test_output_keeps_its_own_format(tiny_artifact: Path, tmp_path: Path) -> None:
    folder = photos(tmp_path / "odd", 1)
    (folder / "0000.png").rename(folder / "tab\there\nnewline.png")
    proc = cli("runtime.infer", str(folder), "--model", str(tiny_artifact), "--backend", "ort-cpu")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 1 and lines[0].split("\t")[0].endswith("tab\\there\\nnewline.png")
    proc = cli("runtime.infer", str(folder), "--model", str(tiny_artifact), "--backend", "ort-cpu", "--topk", "11")
    assert proc.returncode == 2 and "only 10 classes" in assert_one_line(proc.stderr, "infer: error: --topk")


def test_no_progress_bars_when_stderr_is_not_a_terminal(tiny_artifact: Path, tmp_path: Path) -> None:
    """Progress bars only on a terminal: a log file gets no carriage returns, and errors start at column 0."""
    images = photos(tmp_path / "images", 2)
    (images / "broken.png").write_bytes(b"nope")
    proc = cli("runtime.infer", str(images), "--model", str(tiny_artifact), "--backend", "ort-cpu")
    assert proc.returncode == 1 and "\r" not in proc.stderr
    assert any(line.startswith("infer: error: ") for line in proc.stderr.splitlines())
    artifact = shutil.copytree(tiny_artifact, tmp_path / "artifact")
    proc = cli("calibration", "--model", str(artifact), "--calib-dir", str(images), "--num-images", "2",
               "--num-eval", "1", "--no-cpu-variant", "--no-cache")
    assert "\r" not in proc.stderr and "\r" not in proc.stdout, proc.stderr
