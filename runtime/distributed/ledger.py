"""Each input once, those the output holds left out, as the listing streams: the job's ledger of keys.

A barrier over the whole listing (a group-by) would make a job of a million inputs wait a minute before
its first image, and hold every settled block's reference on the driver. Instead the listing flows
straight into a claim stage: each key's 16-byte digest is claimed from one of a few ledger actors (by
its first byte), which answers whether it is new and to do, done by an earlier run, or listed before.
The ledgers hold digests, not names (16 bytes an input in sorted arrays, plus a set of the recent ones),
and live on the driver's node with the claim tasks: a lost worker node cannot take the record of what
was claimed with it. A claim task is not retried (a second try would find its own keys claimed and
drop them); if one fails the job fails, keeping its committed parts, and a re-run resumes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

TODO, DONE, DONE_FAILED, REPEATED = 0, 1, 2, 3  # what a claim answers for a key
DIGEST = np.dtype("S16")
# Recent claims are kept in a set (fast to add to) and folded into the sorted array once it holds this
# many, or a quarter of the array: the set's ~100 bytes a key stay a small share of the memory.
FOLD_AT = 1 << 16


def digests(keys: list[str]) -> np.ndarray:
    """The keys' 16-byte digests (the same in every process; 128 bits, so no two inputs of a job share one)."""
    return np.array([hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest() for k in keys],
                    dtype=DIGEST)


def ledger_of(digest: np.ndarray, ledgers: int) -> np.ndarray:
    """Which ledger holds each digest: its first byte, modulo their number."""
    return digest.view(np.uint8).reshape(-1, DIGEST.itemsize)[:, 0] % ledgers


def _contains(sorted_digests: np.ndarray, digest: np.ndarray) -> np.ndarray:
    at = np.searchsorted(sorted_digests, digest)
    found = np.zeros(len(digest), dtype=bool)
    inside = at < len(sorted_digests)
    found[inside] = sorted_digests[at[inside]] == digest[inside]
    return found


class Ledger:
    """One share of the job's keys (a Ray actor): what earlier runs did, loaded first, then each listed key
    claimed once, and the counts a summary needs."""

    def __init__(self) -> None:
        self.loading: list[tuple[np.ndarray, np.ndarray]] = []
        self.done = np.empty(0, DIGEST)
        self.done_failed = np.empty(0, bool)
        self.seen = np.empty(0, DIGEST)
        self.recent: set[bytes] = set()
        self.counts = {"todo": 0, "done": 0, "done_failed": 0, "repeated": 0}

    def add_done(self, digest: np.ndarray, failed: np.ndarray) -> None:
        self.loading.append((digest, failed))

    def seal(self) -> int:
        """Done loading (a task that loaded twice adds nothing): how many distinct keys earlier runs did."""
        if self.loading:
            digest = np.concatenate([d for d, _ in self.loading])
            failed = np.concatenate([f for _, f in self.loading])
            self.done, first = np.unique(digest, return_index=True)
            self.done_failed = failed[first]
            self.loading = []
        return len(self.done)

    def claim(self, digest: np.ndarray) -> np.ndarray:
        """Each digest's state: TODO the first time it is listed, DONE or DONE_FAILED the first time when an
        earlier run did it, REPEATED after that."""
        state = np.full(len(digest), REPEATED, np.int8)
        _, first = np.unique(digest, return_index=True)
        new = first[~_contains(self.seen, digest[first])]
        new = np.array([i for i in new if digest[i] not in self.recent], dtype=np.int64)
        if len(new):
            self.recent.update(digest[new].tolist())
            done = _contains(self.done, digest[new])
            failed = np.zeros(len(new), dtype=bool)
            failed[done] = self.done_failed[np.searchsorted(self.done, digest[new][done])]
            state[new] = np.where(failed, DONE_FAILED, np.where(done, DONE, TODO))
            if len(self.recent) >= max(FOLD_AT, len(self.seen) // 4):
                self.seen = np.sort(np.concatenate([self.seen, np.array(list(self.recent), DIGEST)]))
                self.recent = set()
        for name, code in (("todo", TODO), ("done", DONE), ("done_failed", DONE_FAILED), ("repeated", REPEATED)):
            self.counts[name] += int(np.count_nonzero(state == code))
        return state

    def totals(self) -> dict[str, int]:
        return dict(self.counts)

    def held_bytes(self) -> int:
        """What the record takes (the sorted arrays, and about 100 bytes a recent key): its cost per input."""
        return self.done.nbytes + self.done_failed.nbytes + self.seen.nbytes + 100 * len(self.recent)


def claim_states(keys: list[str], ledgers: list[Any]) -> np.ndarray:
    """Each key's claim state, asked of the ledgers holding them (one call each, in parallel)."""
    import ray

    digest = digests(keys)
    which = ledger_of(digest, len(ledgers))
    state = np.empty(len(keys), np.int8)
    asked = [(i, ledgers[i].claim.remote(digest[which == i])) for i in range(len(ledgers)) if (which == i).any()]
    for i, answer in asked:
        state[which == i] = ray.get(answer)
    return state


def claim_batch(batch: pa.Table, ledgers: list[Any], rows: int, job: tuple[int, int] | None = None,
                counter: Any = None, ahead: int | None = None) -> Iterator[pa.Table]:
    """The claim stage (a task on the driver's node): a listed block's inputs to do (of shard `job`), in
    blocks of `rows` (one decode task's), as soon as each is known. `counter` hears how many there were;
    with `ahead`, the claims wait while that many inputs claimed are not yet classified: every block
    waiting between the stages costs the driver a few KB, so the listing must not run far ahead."""
    import pyarrow as pa

    if counter is not None and ahead is not None:
        _wait_for_room(counter, ahead)
    batch = in_job_shard(batch, job)
    todo = batch.filter(pa.array(claim_states(batch["key"].to_pylist(), ledgers) == TODO))
    if counter is not None:
        counter.listed.remote(todo.num_rows)
    for start in range(0, todo.num_rows, rows):
        yield todo.slice(start, rows)


def _wait_for_room(counter: Any, ahead: int, poll_s: float = 0.2) -> None:
    import ray

    while True:
        listed, classified = ray.get(counter.get.remote(), timeout=60)
        if listed - classified < ahead:
            return
        time.sleep(poll_s)


def load_done(batch: pa.Table, ledgers: list[Any], job: tuple[int, int] | None = None) -> pa.Table:
    """A block of what the output holds (of shard `job`) -> the ledgers (a task anywhere: loading twice is
    harmless)."""
    import pyarrow as pa
    import ray

    batch = in_job_shard(batch, job)
    digest = digests(batch["key"].to_pylist())
    failed = np.asarray(batch["error"].is_valid().to_pylist(), dtype=bool)
    which = ledger_of(digest, len(ledgers))
    ray.get([ledgers[i].add_done.remote(digest[which == i], failed[which == i])
             for i in range(len(ledgers)) if (which == i).any()])
    return pa.table({"rows": [batch.num_rows]})


def job_shard(key: str, count: int) -> int:
    """Which of `count` shard jobs (`--shard i/count`) takes the input whose output `path` is `key`: a hash
    that every process and machine computes alike (Python's `hash` of a str is salted per process)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def in_job_shard(batch: pa.Table, job: tuple[int, int] | None) -> pa.Table:
    """The rows of `batch` (listed or done) whose key falls in shard `job` = (i, n); all of them without one."""
    if job is None:
        return batch
    import pyarrow as pa

    index, count = job
    return batch.filter(pa.array([job_shard(k, count) == index for k in batch["key"].to_pylist()], pa.bool_()))
