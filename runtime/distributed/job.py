"""One job on a connected Ray: the plan settled on a worker, the Ray Data pipeline, and the driver's commits.

    listing (tasks) -> settle: one row per key, what the output holds left out (a hash-sharded group-by)
      -> decode tasks (1 CPU each) -> inference actors (an autoscaling pool) -> write tasks (parts)
      -> the driver renames each finished part into place

The driver holds no listing and no rows: only the names and counts of finished parts. A progress
counter (a small actor) hears from the inference actors as they go; it feeds the progress bar and a
stall watchdog, which ends a job that makes no progress for `stall_s` (a node lost and its demand
unmet) with the cluster's pending demand and the command that resumes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.artifact import file_sha256
from runtime.backends import BackendUnavailable
from runtime.classify import Summary
from runtime.console import progress_bar
from runtime.cpuinfo import usable_cores
from runtime.distributed.sources import InputsDataset, decode_batch, is_uri, list_inputs
from runtime.distributed.writer import MAX_LISTED_FAILURES, Output, Part, output_schema, write_part
from runtime.errors import DeitError, Interrupted, Unavailable, UsageError, signals_raise_interrupted
from runtime.decode import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, DecodeFailure
from runtime.predictor import ModelOptions, Prediction, Settled, open_predictor, settle
from runtime.preprocess import Preprocessing

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

# What a decode task can hold at once: one image at --max-pixels decoded and converted to RGB (two
# copies of 3 bytes a pixel; a 16k x 16k image is 1.5 GB) besides its block of pixels. Ray reserves it
# per task, so a node runs no more decoders than its memory holds.
DECODE_BYTES_PER_PIXEL = 6
# Decoded pixels travel in blocks of at most this size (~50 DeiT inputs), so inference starts early
# and the object store holds only a few blocks per actor.
PIXEL_BLOCK_BYTES = 32 * 2**20
# Keys per settle shard at most (about 100 bytes each in the group-by); more inputs, more shards.
SHARD_KEYS = 2_000_000
TODO, DONE, DONE_FAILED, LISTED = 0, 1, 2, -1  # a settled row's state; LISTED before settling


class Stalled(DeitError):
    """No input was classified for the watchdog's time: the cluster cannot run what the job needs."""


def import_ray() -> Any:
    """Ray (and pyarrow), or a one-line Unavailable saying how to install them."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise Unavailable(f"runtime.distributed needs Ray Data ({err}); install it with "
                          "`pip install -e '.[distributed]'` (or `make install`)") from None
    return ray


# ------------------------------------------------------------------------------------------- the stages

@dataclass(frozen=True)
class Plan:
    """What the actors run, settled once on a worker (where the model and the GPUs are)."""

    settled: Settled  # what every actor opens alike
    device: str
    resolved_precision: str
    spec: Preprocessing
    checkpoint: str
    synthetic: bool
    loaded: str  # the file the backend loads
    sha256: str | None  # of that file (None for a folder)

    @property
    def backend(self) -> str:
        return self.settled.backend

    @property
    def artifact(self) -> str:
        return str(self.settled.artifact)

    @property
    def choice(self) -> str | None:
        """What `auto` chose and why."""
        return self.settled.choice


class Counter:
    """Rows the inference actors have classified (a Ray actor on the driver's node; progress, not accounting)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def get(self) -> int:
        return self.rows


class Classifier:
    """The inference stage: one backend per actor, loaded once, and the project's one Predictor.

    A CPU backend shares its node's cores with the decode tasks, so by default its threads take the
    node's cores (split between the job's actors there: `per_node`) and do not busy-wait between operators:
    the cores the model leaves idle go to decoding, and neither half of the work is capped at half
    the node (see `actor_threads`).
    """

    def __init__(self, plan: Plan, counter: Any = None, per_node: int = 1) -> None:
        import ray

        self._context = contextlib.ExitStack()
        context = ray.get_runtime_context()
        threads = plan.settled.options.threads
        if threads is None and plan.device == "cpu":
            node = next(n for n in ray.nodes() if n["NodeID"] == context.get_node_id())
            threads = actor_threads(node["Resources"]["CPU"], per_node, usable_cores())
        self.predictor = open_predictor(plan.settled, threads=threads)
        self.predictor.backend.shares_cores = plan.device == "cpu"
        self._context.enter_context(self.predictor.backend)
        self.node, self.counter = context.get_node_id(), counter

    def __del__(self) -> None:
        """Ray Data drops the actor's instance when the pool shuts down: the backend leaves its context then."""
        self._context.close()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow as pa

        paths = [str(p) for p in batch["path"]]
        decoded = [DecodeFailure(p, str(e)) if e else pixels for p, e, pixels in zip(paths, batch["error"], batch["pixels"])]
        rows = self.predictor.predict(paths, decoded)
        if self.counter is not None:
            self.counter.add.remote(len(rows))
        return pa.table({
            "path": [str(r.source) for r in rows],
            "indices": [[i for i, _, _ in r.top] if r.top else None for r in rows],
            "labels": [[label for _, label, _ in r.top] if r.top else None for r in rows],
            "probs": [[p for _, _, p in r.top] if r.top else None for r in rows],
            "error": [r.error for r in rows],
            "node": [self.node] * len(rows),
        }, schema=output_schema())


def actor_threads(node_cpus: float, per_node: int, cores: int) -> int:
    """A CPU actor's default threads: its node's CPUs (at most the cores there are) over the job's actors
    a node holds. Not just what the actor reserved: with busy-waiting off, a model that outweighs
    decoding (DeiT-S) would otherwise idle half the node, and one that does not (DeiT-Ti) loses little,
    as the threads sleep while decoders run (docs/results/distributed.md)."""
    return max(1, int(min(node_cpus, cores) // max(1, per_node)))


def make_plan(options: ModelOptions) -> Plan:
    """Find the model, settle `auto`, check the model classifies with `topk` classes, hash it; runs on a worker."""
    settled = settle(options, "on the Ray workers")
    be = open_predictor(settled).backend
    loaded = Path(be.model_file)
    return Plan(settled, be.device, be.precision, be.meta.preprocessing, be.meta.checkpoint, be.meta.synthetic,
                str(loaded), file_sha256(loaded) if loaded.is_file() else None)


# ---------------------------------------------------------------------------------------------- settling

def _shard(keys: pa.Array, shards: int) -> pa.Array:
    import pyarrow as pa

    return pa.array([zlib.crc32(k.encode("utf-8", "surrogatepass")) % shards for k in keys.to_pylist()], pa.int32())


def job_shard(key: str, count: int) -> int:
    """Which of `count` shard jobs (`--shard i/count`) takes the input whose output `path` is `key`: a hash
    that every process and machine computes alike (Python's `hash` of a str is salted per process), and
    independent of the settle shards' crc32."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def in_job_shard(batch: pa.Table, job: tuple[int, int] | None) -> pa.Table:
    """The rows of `batch` (listed or done) whose key falls in shard `job` = (i, n); all of them without one."""
    if job is None:
        return batch
    import pyarrow as pa

    index, count = job
    return batch.filter(pa.array([job_shard(k, count) == index for k in batch["key"].to_pylist()], pa.bool_()))


def tag_listed(batch: pa.Table, shards: int, job: tuple[int, int] | None = None) -> pa.Table:
    import pyarrow as pa

    batch = in_job_shard(batch, job)
    n = batch.num_rows
    return pa.table({"shard": _shard(batch["key"], shards), "key": batch["key"], "source": batch["source"],
                     "error": batch["error"], "state": pa.array([LISTED] * n, pa.int8())})


def tag_done(batch: pa.Table, shards: int, job: tuple[int, int] | None = None) -> pa.Table:
    import pyarrow as pa

    batch = in_job_shard(batch, job)
    failed = batch["error"].is_valid().to_pylist()
    return pa.table({"shard": _shard(batch["key"], shards), "key": batch["key"],
                     "source": pa.nulls(batch.num_rows, pa.binary()), "error": pa.nulls(batch.num_rows, pa.string()),
                     "state": pa.array([DONE_FAILED if f else DONE for f in failed], pa.int8())})


def settle_shard(group: pa.Table) -> pa.Table:
    """One shard of keys: each listed key once (its first listing), TODO unless the output holds it."""
    import pyarrow as pa

    states = group["state"].to_pylist()
    keys = group["key"].to_pylist()
    done = {k: s for k, s in zip(keys, states) if s != LISTED}
    keep, state, seen = [], [], set()
    for i, (k, s) in enumerate(zip(keys, states)):
        if s == LISTED and k not in seen:
            seen.add(k)
            keep.append(i)
            state.append(done.get(k, TODO))
    out = group.take(pa.array(keep, pa.int64())).drop_columns(["shard", "state"])
    return out.append_column("state", pa.array(state, pa.int8()))


def only_todo(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch["state"], TODO)).drop_columns(["state"])


def state_counts(batch: pa.Table) -> pa.Table:
    """One row of counts for a settled block: to do, done earlier, of those failed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    states = pc.value_counts(batch["state"]).to_pylist()
    n = {s["values"]: s["counts"] for s in states}
    return pa.table({"todo": [n.get(TODO, 0)], "done": [n.get(DONE, 0) + n.get(DONE_FAILED, 0)],
                     "done_failed": [n.get(DONE_FAILED, 0)]})


# ---------------------------------------------------------------------------------------------- Ray

def connect(address: str | None = None, num_cpus: int | None = None, object_store_bytes: int | None = None) -> bool:
    """Join the cluster at `address`, or start a small local Ray; True when this call started one.

    An already connected process (a notebook, the tests) keeps its connection. The local Ray is kept
    small, for a laptop or CI: no dashboard, worker logs not copied to our stderr (failures still
    arrive as exceptions), and an object store of a tenth of memory (0.5-4 GiB): streaming keeps only
    a few blocks of pixels per stage in it.
    """
    ray = import_ray()
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    if ray.is_initialized():
        started = False
    elif address:
        _token_auth_for(address)
        ray.init(address=address, **quiet)
        started = False
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:
            ray.init(num_cpus=num_cpus or usable_cores(), include_dashboard=False,
                     object_store_memory=object_store_bytes or int(min(4 * 2**30, max(2**29, memory // 10))), **quiet)
        except ValueError as err:  # RAY_ADDRESS, or `ray start` on this host: ray.init joins it and refuses our sizes
            if "existing cluster" not in str(err):
                raise
            raise UsageError("a Ray cluster is running on this host (`ray start`, or RAY_ADDRESS is set); join it "
                             "with --address auto, or stop it with `ray stop`") from None
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows classified, which is what a user waits for
    ctx.print_on_execution_start = False
    ctx.target_max_block_size = PIXEL_BLOCK_BYTES
    # Settling's group-by as tasks (sample, map, reduce): the default hash shuffle first starts a pool of
    # aggregator actors, which costs a small job 10-20 s on 2 cores (0.2 s this way, measured).
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    _no_block_stats()
    return started


def _no_block_stats() -> None:
    """Keep the driver flat while rows flow: every map stage of Ray Data keeps statistics of each block it
    output, for `Dataset.stats()`, until the pipeline ends (there is no setting to turn this off). A job
    never reads them, and on a 2-CPU local Ray they were most of the driver's growth: 150-170 MB per
    million rows with them, 30 MB without (benchmarks.distributed_memory). This replaces the function
    that makes them, in this process, when Ray has it where this version of Ray has it."""
    from ray.data._internal.execution.operators import map_operator

    if callable(getattr(map_operator, "to_stats", None)):
        map_operator.to_stats = lambda metas: []


def _token_auth_for(address: str) -> None:
    """Use Ray's token authentication to join a cluster at host:port when a token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) and RAY_AUTH_MODE says nothing: Ray itself does so only for
    `auto`, so a head started with a token would refuse the same job given its address."""
    if "RAY_AUTH_MODE" in os.environ or address == "auto" or address.startswith("ray://"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # RAY_AUTH_MODE=token, and Ray's cached config told so


@contextlib.contextmanager
def session(address: str | None = None) -> Iterator[bool]:
    """`connect`, with the start-up inside the cleanup: a local Ray this process started (even one
    interrupted half-way through `ray.init`) is shut down on the way out, so no Ray process outlives us."""
    ray = import_ray()
    owned = not ray.is_initialized() and not address
    try:
        yield connect(address)
    finally:
        if owned:
            ray.shutdown()


def _unwrapped(err: BaseException) -> BaseException:
    """The project's own error inside a Ray task error (so its one line and exit status survive), else `err`."""
    from ray.exceptions import RayError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, DeitError) and not isinstance(seen, RayError):  # Ray's copy also subclasses the cause
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return err


def _remote_plan(ray: Any, job: JobOptions, model: str | None, artifacts: str) -> Plan:
    """`make_plan` on a worker, on a GPU node when the cluster has one (where `auto` and the GPU backends run)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(make_plan)
    try:
        return ray.get(task.remote(ModelOptions(model, artifacts, job.backend, job.precision, job.batch_size, job.threads,
                                                job.topk)))
    except Exception as err:
        raise _unwrapped(err) from None


def _cpu_nodes(ray: Any) -> list[float]:
    return [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def _pool(ray: Any, plan: Plan, job: JobOptions) -> tuple[int, dict[str, Any]]:
    """The most actors and what each reserves: one per GPU share, or one per node for a CPU backend,
    reserving (the smallest node's CPUs - 1) / 2 and leaving the rest to decode tasks (its threads take
    the node's cores all the same, see `actor_threads`). Checked
    per node: some node must hold an actor and a decode task (1 CPU) at once, or nothing would move."""
    nodes = _cpu_nodes(ray)
    if plan.device == "cuda":
        gpus = ray.cluster_resources().get("GPU", 0)
        if not gpus:
            raise BackendUnavailable(f"backend {plan.backend!r} runs on a GPU and the Ray cluster has none")
        cpus = job.num_cpus_per_worker or 1.0
        size = job.num_workers or max(1, int(gpus // job.num_gpus_per_worker))
        ask = {"num_cpus": cpus, "num_gpus": job.num_gpus_per_worker}
    else:  # one actor a node, reserving so little that a lost node's actor, restarted on a survivor,
        # still leaves a decode task room there (a 2-CPU node: 0.5, so one decoder as with 1; 1-CPU nodes: 0)
        cpus = job.num_cpus_per_worker or max(0.0, (min(nodes, default=2) - 1) / 2)
        size = job.num_workers or max(1, sum(c >= cpus + 1 for c in nodes))
        ask = {"num_cpus": cpus}  # Ray Data spreads actors over the nodes (its default scheduling strategy)
    if not any(c >= cpus + 1 for c in nodes) and sum(nodes) - cpus < 1:
        raise UsageError(f"no room for decoding: an actor takes {cpus:g} CPUs and a decode task 1, but the nodes "
                         f"have {', '.join(f'{c:g}' for c in nodes) or 'no'} CPUs; lower --num-cpus-per-worker")
    return size, ask


def _decode_memory(ray: Any, max_pixels: int) -> int:
    """The memory a decode task reserves (DECODE_BYTES_PER_PIXEL), at most half the largest node's, so
    a small machine still decodes (where one huge image can then run out of memory, as in runtime.infer)."""
    need = DECODE_BYTES_PER_PIXEL * max_pixels + PIXEL_BLOCK_BYTES
    largest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    return int(min(need, largest // 2)) if largest else need


def pending_demand(ray: Any) -> str:
    """What the cluster waits for (the autoscaler's view of pending tasks and actors), for the stall message."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=10)
        demand = [str(b) for d in status.resource_demands.ray_task_actor_demand for b in d.bundles_by_count]
        free = {k: round(v, 2) for k, v in status.available_resources().items() if k in ("CPU", "GPU")}
    except Exception as err:  # the autoscaler's API is not public; the message must not fail for it
        return f"(pending demand unavailable: {type(err).__name__})"
    return f"pending demand {' '.join(demand) or 'none'}; free {free}; {len(_cpu_nodes(ray))} CPU nodes alive"


# ----------------------------------------------------------------------------------------------- the job

@dataclass(frozen=True)
class JobOptions:
    backend: str = "auto"
    precision: str | None = None
    batch_size: int = 8
    topk: int = 5
    threads: int | None = None  # intra-op threads of CPU backends (default: the CPUs Ray reserved for the actor)
    num_workers: int | None = None  # inference actors at most (default: one per GPU share, or per node)
    num_gpus_per_worker: float = 1.0
    num_cpus_per_worker: float | None = None  # default: 1 with a GPU, else half the smallest node's CPUs
    fmt: str = "parquet"
    rows_per_file: int = 100_000
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    draft: bool = False
    progress: bool = True
    stall_s: float = 300.0  # the watchdog: no input classified for this long ends the job
    decode_timeout_s: float | None = 120.0  # an input not read and decoded in this time becomes its error row
    shard: tuple[int, int] | None = None  # (i, n): only the inputs `job_shard` puts in shard i of n
    command: str = "the same command"  # what resumes the job, for the messages that stop it


@dataclass
class Counts:
    """What settling found: inputs left to do, and those the output already holds (ok and failed)."""

    todo: int = 0
    done: int = 0
    done_failed: int = 0


class Job:
    """One classification job: INPUT and the output checked when made, and the output locked (no Ray
    needed, so a bad argument or a second job on the same output fails at once), then `plan()` and
    `run()` on the connected Ray."""

    def __init__(self, input: str, output: str, model: str | None = None, opts: JobOptions = JobOptions(),
                 artifacts: str = "artifacts") -> None:
        self.opts = opts
        self.model = os.path.abspath(model) if model and not is_uri(model) else model
        self.artifacts = os.path.abspath(artifacts)
        self.input = input
        self.listing: InputsDataset = list_inputs(input)
        self.output = Output(output, opts.fmt, opts.shard)
        self.settled: tuple[Plan, int, dict[str, Any]] | None = None

    def plan(self) -> tuple[Plan, int, dict[str, Any]]:
        """What runs and how many actors (a worker opens the model and settles `auto`), once per job;
        an output made with other settings is refused here, before any input is read."""
        if self.settled is None:
            ray = import_ray()
            plan = _remote_plan(ray, self.opts, self.model, self.artifacts)
            self.output.check_manifest(self.settings(plan))
            self.settled = (plan, *_pool(ray, plan, self.opts))
        return self.settled

    def decode_rows(self) -> int:
        """Inputs a decode batch holds: a few inference batches, at most a pixel block."""
        h, w = self.plan()[0].spec.input_size
        return max(1, min(self.opts.batch_size * 4, PIXEL_BLOCK_BYTES // (3 * h * w * 4)))

    def settings(self, plan: Plan) -> dict[str, Any]:
        """What decides the rows: the manifest's record, compared on resume (all but `model`, a path)."""
        return {"model": plan.loaded, "model_sha256": plan.sha256, "checkpoint": plan.checkpoint, "backend": plan.backend,
                "precision": plan.resolved_precision, "topk": self.opts.topk, "format": self.opts.fmt,
                "draft": self.opts.draft, "max_pixels": self.opts.max_pixels, "max_file_bytes": self.opts.max_file_bytes}

    def settle(self, ray: Any) -> tuple[ray.data.Dataset, Counts]:
        """The inputs left to do, each key once, and the counts: a group-by over hash shards of the listing
        and of what the output holds, on the workers, kept in the object store (spilled to disk when large).
        Only one small row of counts a block comes back to the driver."""
        listed = self.listing(ray)
        done = self.output.done(ray)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shards = max(2 * cpus, (len(self.output.done_parts) * self.opts.rows_per_file) // SHARD_KEYS + 1)
        sharding = {"shards": shards, "job": self.opts.shard}
        tagged = listed.map_batches(tag_listed, batch_format="pyarrow", fn_kwargs=sharding)
        if done is not None:
            tagged = tagged.union(done.map_batches(tag_done, batch_format="pyarrow", fn_kwargs=sharding))
        settled = tagged.groupby("shard").map_groups(settle_shard, batch_format="pyarrow").materialize()
        counts = Counts()
        for row in settled.map_batches(state_counts, batch_format="pyarrow", batch_size=None, num_cpus=0).iter_rows():
            counts.todo += row["todo"]
            counts.done += row["done"]
            counts.done_failed += row["done_failed"]
        # Cut into one decode task's blocks here, while nothing else runs: a task cutting in the pipeline
        # would wait on the stages after it and hold its CPU meanwhile, starving the decoders (and a decode
        # task's pixels reach the actors only when it ends, so a task is one batch).
        todo = settled.map_batches(only_todo, batch_format="pyarrow").repartition(
            target_num_rows_per_block=self.decode_rows()).materialize()
        return todo, counts

    def pipeline(self, ray: Any, todo: ray.data.Dataset, counter: Any) -> ray.data.Dataset:
        """Decode tasks (1 CPU each, a block of `settle`'s each), the autoscaling actor pool, write tasks,
        streamed."""
        plan, workers, resources = self.plan()
        opts = self.opts
        decode_rows = self.decode_rows()
        settings = {**self.settings(plan), "model": plan.loaded}
        # Fault tolerance is Ray Data's default, which exactly-once needs: a task lost with its node runs
        # again, a dead actor restarts (on another node) and its tasks run again, and a part counts only
        # once the driver has it. A CPU actor reserves little enough (`_pool`) that a survivor holds a restarted
        # one beside a decode task, so a lost node slows the job and never stalls it. The decode tasks' memory reservation also
        # keeps Ray from fusing decoding into the actors (fused, the two would take turns instead of overlapping).
        per_node = -(-workers // max(1, len(_cpu_nodes(ray))))
        return (todo.map_batches(decode_batch, batch_size=decode_rows, batch_format="numpy", num_cpus=1,
                             memory=_decode_memory(ray, opts.max_pixels),
                             fn_kwargs={"spec": plan.spec, "draft": opts.draft, "max_pixels": opts.max_pixels,
                                        "max_file_bytes": opts.max_file_bytes, "deadline_s": opts.decode_timeout_s})
                .map_batches(Classifier, batch_size=opts.batch_size, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                             fn_constructor_kwargs={"plan": plan, "counter": counter, "per_node": per_node},
                             **resources)
                .map_batches(write_part, batch_size=opts.rows_per_file, batch_format="pyarrow", num_cpus=0,
                             fn_kwargs={"output": self.output.output, "fmt": opts.fmt, "run": self.output.run,
                                        "settings": settings}))

    def run(self, report: bool = False, on_part: Callable[[Part], None] | None = None) -> Summary:
        """Classify what is left (with `report`, the resume count and each failed file on stderr). Parts are committed as they arrive and, if
        given, handed to `on_part`. Interrupted: keeps the committed parts, then raises `Interrupted`; stalled:
        raises `Stalled`; failed: keeps the committed parts, then raises. Either way the output's lock is
        released at the end: a job runs once."""
        finished = False
        try:
            summary = self._run(report, on_part)
            finished = True
            return summary
        finally:
            self.close(finished)

    def close(self, finished: bool = False) -> None:
        """Release the output (for a job made and not run: its lock is held from `Job(...)` on)."""
        self.output.close(finished)

    def _run(self, report: bool, on_part: Callable[[Part], None] | None) -> Summary:
        ray = import_ray()
        plan, workers, resources = self.plan()
        todo, counts = self.settle(ray)
        s = Summary(plan.backend, plan.resolved_precision, plan.artifact, plan.synthetic, workers=workers,
                    images=counts.done, more_failed=counts.done_failed, resumed=counts.done - counts.done_failed)
        if counts.todo + counts.done == 0 and self.opts.shard is None:  # a shard of a short list may hold none
            raise UsageError(f"no images found in {self.input}")
        if report and counts.done:
            print(f"distributed: resuming: {counts.done} inputs done earlier, {counts.todo} to go", file=sys.stderr)
        start = time.perf_counter()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        counter = ray.remote(num_cpus=0)(Counter).options(scheduling_strategy=here).remote()
        watch = Watchdog(ray, counter, self.opts.stall_s, need=Need(resources["num_cpus"], resources.get("num_gpus", 0.0)))
        try:
            with progress_bar(total=counts.todo, unit="img", enabled=self.opts.progress) as bar, watch.running(bar):
                if counts.todo:
                    stream = iter(self.pipeline(ray, todo, counter).iter_batches(batch_format="pyarrow",
                                                                                 batch_size=None))
                    with contextlib.closing(stream):  # pyright: ignore[reportArgumentType]
                        for table in stream:
                            for row in table.to_pylist():
                                part = Part(**row)
                                name = self.output.commit(part)
                                if report:
                                    bar.write(f"distributed: committed {name}: {part.rows} rows "
                                              f"({self.output.committed} this run)", file=sys.stderr)
                                watch.committed = self.output.committed
                                if s.first_row_s is None:
                                    s.first_row_s = time.perf_counter() - start
                                s.images += part.rows
                                kept = max(0, min(part.failed, len(part.failures), MAX_LISTED_FAILURES - len(s.failed)))
                                s.failed.extend(Prediction(m.split(": ", 1)[0], error=m) for m in part.failures[:kept])
                                s.more_failed += part.failed - kept
                                for message in part.failures if report else ():
                                    bar.write(f"distributed: error: {message}", file=sys.stderr)
                                if on_part is not None:
                                    on_part(part)
        except KeyboardInterrupt as err:
            if watch.stalled:
                raise Stalled(f"{watch.stalled}; {self._kept(s)}; run {self.opts.command} again to resume "
                              "once the cluster has room") from None
            raise Interrupted(getattr(err, "signum", signal.SIGINT),
                              f"{self._kept(s)}; run {self.opts.command} again to resume") from None
        except Exception as err:  # the committed parts are kept; a re-run resumes from them
            raise _unwrapped(err) from None
        finally:
            with contextlib.suppress(Exception):
                self.output.remove_uncommitted()
                ray.kill(counter)
        s.seconds = time.perf_counter() - start
        return s

    def _kept(self, s: Summary) -> str:
        return f"{self.output.committed} rows of this run committed to {self.output.output} ({s.images} inputs done)"


class Watchdog:
    """Watches the job from a thread: moves the progress bar from the actors' counter, says when a node
    leaves or joins, says where the job stands every `say_s` when no bar shows it, and ends the job (it
    interrupts the main thread, which waits inside Ray; the job turns that into `Stalled`) when no node
    can hold an actor and a decode task for `room_s`, or nothing is classified for `stall_s`."""

    def __init__(self, ray: Any, counter: Any, stall_s: float, poll_s: float = 1.0, need: Need | None = None,
                 say_s: float = 30.0, room_s: float = 45.0) -> None:
        self.ray, self.counter, self.stall_s, self.poll_s, self.need = ray, counter, stall_s, poll_s, need
        self.say_s, self.room_s = say_s, room_s
        self.stalled: str | None = None
        self.committed = 0
        self._stop = threading.Event()

    @contextlib.contextmanager
    def running(self, bar: Any) -> Iterator[None]:
        """Watch while the block runs. SIGINT raises in the main thread meanwhile, whatever its disposition
        was (a process started with `cmd &` inherits SIGINT ignored, which would mute the watchdog)."""
        main = threading.current_thread() is threading.main_thread()
        thread = threading.Thread(target=self._watch, args=(bar,), name="stall-watchdog", daemon=True)
        with signals_raise_interrupted() if main else contextlib.nullcontext():
            thread.start()
            try:
                yield
            finally:
                self._stop.set()
                thread.join()

    def _watch(self, bar: Any) -> None:
        seen, last, moved = 0, (0, 0), time.monotonic()
        said, room_since, nodes = time.monotonic(), None, self._nodes({})
        while not self._stop.wait(self.poll_s):
            try:
                rows = self.ray.get(self.counter.get.remote(), timeout=30)
            except Exception:  # the counter's node is the driver's: if it is gone, so are we
                rows = seen
            bar.update(max(0, rows - seen))
            seen = max(seen, rows)
            now = time.monotonic()
            if (seen, self.committed) != last:
                last, moved = (seen, self.committed), now
            if self.need is not None:
                alive = self._nodes(nodes)
                for node in nodes.keys() - alive.keys():
                    bar.write(f"distributed: lost node {node[:12]} ({_describe(nodes[node])}); its tasks and actor "
                              f"move to the {len(alive)} nodes left", file=sys.stderr)
                for node in alive.keys() - nodes.keys():
                    bar.write(f"distributed: node {node[:12]} joined ({_describe(alive[node])})", file=sys.stderr)
                nodes = alive
                missing = self.need.missing(list(alive.values()))
                if missing is None:
                    room_since = None
                elif room_since is None:
                    room_since = now
                elif now - room_since > self.room_s:
                    return self._stall(f"no node can run this job any more ({missing}, for {self.room_s:g} s)")
            if now - moved > self.stall_s:
                return self._stall(f"no input classified for {self.stall_s:g} s ({pending_demand(self.ray)}); the "
                                   "cluster cannot run a decode task and an actor (other jobs hold it?)")
            if bar.disable and now - said >= self.say_s:
                said = now
                bar.write(f"distributed: {seen} inputs classified, {self.committed} rows committed"
                          + ("" if now - moved < self.say_s else f"; waiting: {pending_demand(self.ray)}"),
                          file=sys.stderr)

    def _nodes(self, known: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """The alive nodes' resources, by node id (none when the job needs no watching of them); `known`
        while the GCS does not answer (busy or restarting: asked again at the next poll)."""
        if self.need is None:
            return {}
        try:
            return {n["NodeID"]: n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")}
        except Exception:
            return known

    def _stall(self, why: str) -> None:
        self.stalled = why
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)  # wakes a blocked wait too


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources[k]:g} {k}s" for k in ("CPU", "GPU") if resources.get(k)) or "no CPUs"


@dataclass(frozen=True)
class Need:
    """What the job needs of some node to move: an actor (`cpus`, `gpus`) and a decode task (1 CPU),
    on one node or on two."""

    cpus: float
    gpus: float = 0.0

    def missing(self, nodes: list[dict[str, float]]) -> str | None:
        """None when the nodes can hold an actor and a decode task, else what they lack, in words."""
        actor = [n for n in nodes if n.get("CPU", 0) >= self.cpus and n.get("GPU", 0) >= self.gpus]
        if any(n.get("CPU", 0) >= self.cpus + 1 for n in actor) or (actor and sum(n.get("CPU", 0) for n in nodes) - self.cpus >= 1):
            return None
        gpus = f" and {self.gpus:g} GPUs" if self.gpus else ""
        return (f"an actor needs {self.cpus:g} CPUs{gpus} and a decode task 1 CPU; the {len(nodes)} nodes alive have "
                f"{'; '.join(_describe(n) for n in nodes) or 'nothing'}")
