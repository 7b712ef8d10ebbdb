"""Output locations, checked before the work starts: a run must not end by failing to save what it made."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UsageError


def _existing_ancestor(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def _check_writable_folder(folder: Path, shown: Path, flag: str, needed_bytes: int) -> None:
    """`folder` exists, is a folder, accepts a new file, and has room for `needed_bytes`."""
    if not folder.is_dir():
        raise UsageError(f"{flag} {shown}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {shown}: cannot write in {folder} ({err.strerror or err})") from None
    free = shutil.disk_usage(folder).free
    if needed_bytes and free < needed_bytes:
        raise UsageError(f"{flag} {shown}: {folder} has {free / 2**20:.0f} MiB free, about {needed_bytes / 2**20:.0f} MiB "
                         "are needed")


def check_output_file(path: Path, flag: str = "--output", needed_bytes: int = 0) -> Path | None:
    """Where a run may write the file `path` names, checked before the work: the path of a regular file
    or a new name (a symlink is followed to its target, so the link stays a link; the file there is
    replaced, and missing folders are created), or None for a character device or FIFO, which are
    written straight through (replacing `/dev/null` with a file would break the machine). Anything else
    (a folder, a socket, a block device) is refused.
    """
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name")
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new name (a missing or wrong folder is said below)
        mode = None
    except OSError as err:
        raise UsageError(f"{flag} {path}: {err.strerror or err}") from None
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        return None
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(f"{flag} {path}: not a regular file, character device or FIFO")
    real = Path(os.path.realpath(path))
    _check_writable_folder(_existing_ancestor(real.parent), path, flag, needed_bytes)
    return real


def check_output_dir(path: Path, flag: str = "--out", needed_bytes: int = 0) -> None:
    """Files can be written inside `path` (created if missing)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a folder")
    _check_writable_folder(_existing_ancestor(path), path, flag, needed_bytes)


@dataclass
class HeldLock:
    """An output lock while it is held: what the run holding it is, and whether to remove the file at the end."""

    fd: int
    previous: str  # the note of the last run that held it ("" if none): an interrupted run's identity
    remove: bool = False  # set when the output is finished: nothing is left to resume

    def note(self, text: str) -> None:
        """Record what this run is (kept after it ends, for a later run to compare)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n{text}".encode(), 0)


@contextmanager
def output_lock(lock_file: Path, shown: str, kind: str | None = None) -> Iterator[HeldLock]:
    """Hold a lock on `lock_file` while a run writes `shown`, so two runs never write one output.

    The lock is the kernel's (flock): it goes with the process, so a killed run never leaves a stale
    lock behind. The file holds the owner's pid, which the refusal names, and a note of what the run
    is, which outlives the run (unless the holder sets `remove`) for a later --resume to compare.

    Without `kind` the lock is exclusive. With one (e.g. "shard jobs of 4") it is shared with the runs
    of the same kind only, which cooperate on the output, and refuses every other run: the first run
    of a kind takes the lock exclusively, writes the kind as its note, then shares it; a later run
    reads the note while it shares the lock. Its note is the kind (not for `note` to change).
    """
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                exclusive = True
            except BlockingIOError:
                if kind is None:
                    raise
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # only holders of some kind let this through
                exclusive = False
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UsageError(f"{shown}: another run ({holder}) is writing it; wait for it or choose another output") from None
        try:  # a holder that finished removed the file after we opened it: lock the new one instead
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        held = HeldLock(fd, _read(fd).partition("\n")[2])
        if kind is not None and not exclusive and held.previous != kind:
            raise UsageError(f"{shown}: another run ({_holder(fd)}) is writing it; wait for it or choose another output")
        if exclusive:
            held.note(kind if kind is not None else held.previous)  # our pid; for an exclusive lock, the earlier
            # run's note stays until this run says what it is
        if kind is not None and exclusive:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # now others of this kind may join
        yield held
        if held.remove and kind is not None:
            try:  # the last of its kind removes the file; others still hold it
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.remove = False
        if held.remove:
            lock_file.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")


def _holder(fd: int) -> str:
    """Who holds the lock on `fd`'s file, for a refusal: its pid, and its kind when it shares the lock."""
    owner, _, note = _read(fd).partition("\n")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted: the holders share it, and the note is their kind
    except BlockingIOError:
        return f"pid {owner.strip() or 'unknown'}"
    fcntl.flock(fd, fcntl.LOCK_UN)
    return f"pid {owner.strip() or 'unknown'}, one of {note.strip() or 'unknown'}"
