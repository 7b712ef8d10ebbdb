"""One error policy for every CLI: the project's error types, their exit status, and one line on stderr.

Every CLI runs its work through `run_cli`, which turns any exception (the project's own, ONNX
Runtime's, CUDA's, an OSError from a full disk) into `<prog>: error: <one line>` and the exit status
of its class, turns Ctrl-C / SIGTERM into exit 130 / 143 after the CLI has saved what was finished,
and ends the process the same way for a `deit-*` console script and its `python -m` twin.
`DEIT_DEBUG=1` prints the traceback as well. What each status means is the README's table (tests
check that it lists every status defined here).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import ClassVar, NoReturn

OK = 0
SOME_FAILED = 1
USAGE = 2
HUB_UNREACHABLE = 3
GATE_FAILED = 4
MODEL = 5
UNAVAILABLE = 6
FAILED = 7
BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `prog | head`


class DeitError(Exception):
    """Base of the project's errors. The message is one line naming the file or argument and the problem."""

    exit_code: ClassVar[int] = FAILED


class UsageError(DeitError):
    """A bad argument, input path or output location, found before any work was done."""

    exit_code = USAGE


class ModelError(DeitError):
    """A checkpoint, artifact or engine that is missing, unreadable or incompatible."""

    exit_code = MODEL


class GateFailed(DeitError):
    """A numerical gate (export verification, int8 accuracy) failed; nothing was written."""

    exit_code = GATE_FAILED


class Unavailable(DeitError):
    """What the command needs (a backend, a library, a GPU) is not here; the message says how to get it."""

    exit_code = UNAVAILABLE


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. `saved` says where the finished work is, for the one-line message."""

    def __init__(self, signum: int = signal.SIGINT, saved: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved = saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(err: BaseException) -> int:
    if isinstance(err, Interrupted):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return getattr(err, "exit_code", FAILED) if isinstance(err, DeitError) else FAILED


def one_line(err: BaseException) -> str:
    """The message a user sees: the project's own errors as written, foreign ones with their type."""
    if isinstance(err, DeitError):
        text = str(err)
    elif isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        text = f"out of memory ({type(err).__name__}{': ' + first_line(err) if str(err) else ''}); try a smaller --batch-size"
    elif isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        text = f"{where}{err.strerror}"
    else:
        text = f"{type(err).__name__}: {first_line(err)}"
    return " ".join(text.split("\n")).strip() or type(err).__name__


def first_line(err: BaseException, limit: int = 400) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(err).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (`<prog>: error: ... (see --help)`) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{cli_name(self.prog)}: error: {message} (see --help)\n")


def doc_parser(prog: str, doc: str | None) -> ArgumentParser:
    """A CLI's parser whose --help shows the module docstring: its first line, then the usage examples under it."""
    title, _, usage = (doc or "").partition("\n")
    return ArgumentParser(prog=prog, description=title, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)


def cli_name(prog: str) -> str:
    """`python -m runtime.infer` -> `infer`: the short name every message of a CLI starts with."""
    return prog.removeprefix("python -m ").split(".")[-1]


class _Deferral:
    depth = 0  # > 0 while a record is being written: a signal waits until it is complete
    pending: int | None = None


@contextmanager
def signals_deferred(deliver: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a record, a file's end or a rename is written, so a file is never half a record.

    A signal that arrived meanwhile raises `Interrupted` when the block ends (not while an exception
    is already on its way out); `deliver=False` drops it, for the last step of a finished run.
    (Blocking the signal instead would not work: in a threaded process another thread receives it.)
    """
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
    if _Deferral.depth == 0 and _Deferral.pending is not None:
        signum, _Deferral.pending = _Deferral.pending, None
        if deliver:
            raise Interrupted(signum)


@contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """SIGTERM (what batch schedulers send) behaves like Ctrl-C: it raises `Interrupted` in the main thread."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if _Deferral.depth:
            _Deferral.pending = signum
            return
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def leave(status: int) -> NoReturn:
    """End the process with `status`. Threads still running now are stuck in a library call, such as a
    decoder scanning a huge file when an interrupt came: what the run keeps is written, so the process
    ends without joining them, instead of waiting minutes for them. A reader of stdout that went away
    while the last lines were flushed makes it 141, silently."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = BROKEN_PIPE if status == OK else status
    except (OSError, ValueError, AttributeError):  # stdout closed or None
        pass
    stuck = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if not stuck:
        sys.exit(status)
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    os._exit(status)


def run_cli(prog: str, work: Callable[[], int], entry: bool) -> int:
    """Run a CLI's work under the one error policy and return its exit status, or, when `entry` (the call is
    the program itself: a `deit-*` console script or `python -m`, whose `main` got no argv), end the process
    with it through `leave`, so an installed script and its `python -m` twin behave alike."""
    status = _run(prog, work)
    if entry:
        leave(status)
    return status


def _run(prog: str, work: Callable[[], int]) -> int:
    try:
        with signals_raise_interrupted():
            return work()
    except KeyboardInterrupt as err:
        saved = getattr(err, "saved", None)
        what = "interrupted" if not isinstance(err, Interrupted) or err.signum == signal.SIGINT else "terminated"
        print(f"{prog}: {what}" + (f"; {saved}" if saved else ""), file=sys.stderr)
        return exit_code(err)
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except Exception as err:  # the one place where anything becomes one line and a status
        if os.environ.get("DEIT_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return exit_code(err)
