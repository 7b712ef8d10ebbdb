"""Dynamic batching with Triton's semantics: concurrent requests become one backend batch.

Requests wait in a queue; one worker thread takes the oldest and adds the next ones while the
batch stays within `max_batch` images, until it is full or `max_delay_s` has passed since the
oldest arrived (requests are never split, so each is answered from one batch, in order). With
batching off each request runs alone. Unlike Triton, the batcher waits only while `arriving()` says
more requests are on their way (received by the server, still being read or decoded): a lone request
runs at once instead of paying the delay, and a burst is still gathered. The backend runs in the worker thread (ONNX Runtime,
OpenVINO and torch release the GIL), so the event loop keeps reading requests meanwhile.
A draining server flushes the batcher: what is queued runs at once, without waiting for a delay,
since no more requests will come to fill the batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

R = TypeVar("R")  # what the run function returns for one row


@dataclass
class _Item:
    pixels: np.ndarray
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    """The batcher's part of Triton's statistics: per request its queue and compute time, per batch size the runs.
    Whether a request succeeded is the data plane's to count: it may fail after its batch ran."""

    executions: int = 0  # backend runs
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> runs
    last_ms: int = 0


class DynamicBatcher(Generic[R]):
    """Gather images from concurrent `submit` calls into backend batches; see the module docstring."""

    def __init__(self, run: Callable[[np.ndarray], list[R]], max_batch: int, max_delay_s: float, enabled: bool = True,
                 arriving: Callable[[], int] = lambda: 1) -> None:
        self._run, self.max_batch, self.max_delay_s, self.enabled = run, max_batch, max_delay_s, enabled
        self._arriving = arriving
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._flushing = False  # no more waiting for a batch to fill: nothing else will come
        self.stats = BatchStats()
        self.stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._thread.start()

    def queued(self) -> tuple[int, int]:
        """(requests, images) waiting for a batch."""
        with self._cond:
            return len(self._queue), sum(len(i.pixels) for i in self._queue)

    def submit(self, pixels: np.ndarray) -> asyncio.Future[list[R]]:
        """Queue a request of at most `max_batch` images; the future holds one result per image, in order."""
        if not 1 <= len(pixels) <= self.max_batch:
            raise ValueError(f"a request holds 1 to {self.max_batch} images, not {len(pixels)}")
        loop = asyncio.get_running_loop()
        item = _Item(pixels, loop.create_future(), loop)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(item)
            self._cond.notify()
        return item.future

    def poke(self) -> None:
        """`arriving()` went down without a submit (a refused request): look again whether to wait."""
        with self._cond:
            self._cond.notify()

    def flush(self) -> None:
        """From now on run what is queued at once (a draining server expects no requests to fill batches)."""
        with self._cond:
            self._flushing = True
            self._cond.notify()

    def close(self) -> None:
        """Run what is queued now, then stop the worker."""
        with self._cond:
            self._closed = self._flushing = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[_Item]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            batch = [self._queue.popleft()]
            size = len(batch[0].pixels)
            deadline = batch[0].enqueued + self.max_delay_s
            while self.enabled and size < self.max_batch:
                if self._queue:
                    if size + len(self._queue[0].pixels) > self.max_batch:
                        break
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].pixels)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._flushing or self._arriving() <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _work(self) -> None:
        while batch := self._take():
            start = time.monotonic()
            pixels = np.concatenate([i.pixels for i in batch]) if len(batch) > 1 else batch[0].pixels
            try:
                rows: list[R] | BaseException = self._run(pixels)
            except Exception as err:  # the requests of this batch get the error; the worker serves on
                rows = err
            done = time.monotonic()
            self._record(batch, len(pixels), start, done)
            at = 0
            for item in batch:
                n = len(item.pixels)
                result = rows if isinstance(rows, BaseException) else rows[at : at + n]
                at += n
                item.loop.call_soon_threadsafe(_settle, item.future, result)

    def _record(self, batch: list[_Item], images: int, start: float, done: float) -> None:
        with self.stats_lock:
            s = self.stats
            s.executions += 1
            s.batches.setdefault(images, Duration()).add(done - start)
            s.compute.add(done - start, len(batch))
            for item in batch:
                s.queue.add(start - item.enqueued)
            s.last_ms = int(time.time() * 1000)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the client went away and its request was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
