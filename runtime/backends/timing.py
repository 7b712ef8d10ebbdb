"""The one timing core: warm-up, then runs until a count and a time are reached, with the machine's other load watched.

Every latency this project reports comes from `measure`: the benchmark harness, the int8 and
pipeline benchmarks, and `auto`'s short measurement. `run_once` returns the milliseconds of one
run on whatever clock its backend is timed with (the host clock around a call, or CUDA events on
the device); one table never mixes clocks.

On a shared machine a neighbour's burst can double a latency, so each measurement also records
how many cores other processes kept busy meanwhile (from /proc/stat) and is repeated, keeping the
quietest attempt, when that is above `CONTENDED`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

CONTENDED = 0.25  # cores of other processes' load during a measurement that make it suspect


@dataclass
class Timing:
    batch_size: int
    iterations: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float
    other_load_cores: float | None = None  # above CONTENDED the number is suspect
    attempts: int = 1

    @property
    def contended(self) -> bool:
        return (self.other_load_cores or 0.0) > CONTENDED


class LoadMeter(Protocol):
    def start(self) -> None: ...

    def stop(self, wall_s: float) -> float | None:
        """Cores other processes kept busy since start(); None where the OS does not say."""
        ...


class ProcStatLoad:
    """Other processes' CPU use: the machine's busy time (/proc/stat) minus this process's own."""

    def start(self) -> None:
        self._busy, self._own = _machine_busy_s(), _own_cpu_s()

    def stop(self, wall_s: float) -> float | None:
        busy = _machine_busy_s()
        if self._busy is None or busy is None or wall_s <= 0:
            return None
        return round(max(0.0, (busy - self._busy) - (_own_cpu_s() - self._own)) / wall_s, 2)


def _machine_busy_s() -> float | None:
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def measure(
    run_once: Callable[[], float],
    batch_size: int,
    *,
    warmup: int = 3,
    min_iters: int = 10,
    min_time_s: float = 1.0,
    max_iters: int = 1000,
    retries: int = 2,
    load: LoadMeter | None = None,
) -> Timing:
    """Latency statistics of `run_once` (which returns one run's milliseconds); the quietest of up to 1 + `retries` attempts."""
    load = load or ProcStatLoad()
    for _ in range(warmup):
        run_once()
    best: Timing | None = None
    for attempt in range(1, retries + 2):
        load.start()
        start = time.perf_counter()
        samples: list[float] = []
        while len(samples) < min_iters or (time.perf_counter() - start < min_time_s and len(samples) < max_iters):
            samples.append(run_once())
        timing = _stats(samples, batch_size, load.stop(time.perf_counter() - start))
        if best is None or (timing.other_load_cores or 0.0) < (best.other_load_cores or 0.0):
            best = timing
        best.attempts = attempt
        if not best.contended:
            break
    assert best is not None
    return best


def _stats(samples: list[float], batch_size: int, other_load: float | None) -> Timing:
    ms = np.asarray(samples, dtype=np.float64)
    median = float(np.median(ms))
    return Timing(
        batch_size=batch_size,
        iterations=len(samples),
        median_ms=round(median, 4),
        p90_ms=round(float(np.percentile(ms, 90)), 4),
        p99_ms=round(float(np.percentile(ms, 99)), 4),
        mean_ms=round(float(ms.mean()), 4),
        min_ms=round(float(ms.min()), 4),
        images_per_s=round(batch_size * 1000.0 / median, 2) if median > 0 else 0.0,
        other_load_cores=other_load,
    )


def host_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call on the host's monotonic clock."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0
