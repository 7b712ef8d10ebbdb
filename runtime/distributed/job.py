"""One job on a connected Ray: the plan settled on a worker, the Ray Data pipeline, and the driver's commits.

    what the output holds -> the ledgers (tasks; before anything is listed)
    listing (tasks) -> claims: each key once, those the output holds left out (tasks asking the ledgers)
      -> decode tasks (1 CPU each) -> inference actors (an autoscaling pool) -> write tasks (parts)
      -> the driver renames each finished part into place

Everything streams: the first inputs are decoded while the listing goes on, whatever its size. The
driver holds no listing and no rows: only the names and counts of finished parts. A progress counter
(a small actor) hears from the claims and the inference actors as they go; it feeds the progress bar
and a watchdog, which says when the job waits for room other jobs hold, and ends a job that makes
no progress for `stall_s` (a node lost and its demand unmet) with the cluster's pending demand and
the command that resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
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
from runtime.distributed.admission import Claim, wait_for_admission
from runtime.distributed.ledger import Ledger, claim_batch, load_done
from runtime.distributed.sources import LIST_CPUS, InputsDataset, decode_batch, is_uri, list_inputs
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
# Ledger actors beside the driver (each input's digest is held by one); claims ask them in parallel.
LEDGERS = 2
# Inputs claimed and not yet classified at most (more on a cluster of many CPUs: a few rounds of decode
# blocks for each): the listing keeps ahead of the decoders, and no further.
CLAIM_AHEAD = 16_384
CLAIM_TASKS = 2  # at once: they ask the ledgers, a few milliseconds each; more would only take CPU shares
# Listed inputs a claim task asks the ledgers about: a few milliseconds of hashing, so its decode
# blocks leave it at once, and few enough calls that the ledgers keep up.
CLAIM_ROWS = 4096


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
    """Inputs the claims found to do and rows classified (a Ray actor on the driver's node; progress, not
    accounting). It lives as long as the driver, so it is also the job's lease on its admission."""

    def __init__(self) -> None:
        self.todo = self.rows = 0

    def listed(self, n: int) -> None:
        self.todo += n

    def add(self, n: int) -> None:
        self.rows += n

    def get(self) -> tuple[int, int]:
        return self.todo, self.rows


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
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # A stage capped at a few tasks (listing, claims) that gets fewer inputs than its cap is no news.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    # Task options without a named parameter yet (a node to run on, retries) still go as `ray_remote_args`.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
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


def _on_this_node(ray: Any) -> Any:
    """The driver's node, for the actors and tasks whose state must not be lost with another node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _cut(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """`ds` in blocks of `rows`, cut by the tasks of its last stage themselves.

    A map stage's output is merged into blocks of up to 32 MB, and a task's output leaves it only in
    whole blocks: the claims would reach the decoders as one block of thousands of names (which one
    task would decode alone), and the listing would reach the claims only when a whole folder or
    chunk is listed. Ray Data's streaming repartition cuts them, and runs inside the stage's own tasks
    only when its task options and task count are theirs; it has no parameter for them (as of Ray
    2.60), so they are copied onto its logical operator. Run apart, it would hold a whole CPU for as
    long as the listing lasts and starve the decoders (`tests/test_distributed.py` checks the fusion).
    """
    stage = ds._logical_plan.dag  # pyright: ignore[reportAttributeAccessIssue]
    if not hasattr(stage, "ray_remote_args"):
        return ds  # not a map stage (one image): nothing to cut
    cut = ds.repartition(target_num_rows_per_block=rows)
    op = cut._logical_plan.dag  # pyright: ignore[reportAttributeAccessIssue]
    op.ray_remote_args.update(stage.ray_remote_args)
    object.__setattr__(op, "compute", stage.compute)  # a frozen dataclass
    return cut


def ledger_totals(ray: Any, ledgers: list[Any]) -> Counts:
    """What the ledgers counted, summed."""
    counts = Counts()
    for totals in ray.get([ledger.totals.remote() for ledger in ledgers]):
        counts.todo += totals["todo"]
        counts.done += totals["done"] + totals["done_failed"]
        counts.done_failed += totals["done_failed"]
    return counts


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
    """What the ledgers found: inputs claimed to do, and those the output already held (ok and failed)."""

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

    def settle(self, ray: Any, counter: Any = None) -> tuple[ray.data.Dataset, list[Any], int]:
        """The inputs left to do, each key once, as a stream; the ledgers; how many inputs earlier runs did.

        What the output holds is loaded into the ledgers first (a pass over its parts' `path` and
        `error` columns, by tasks); then each listed block is claimed as it is listed, by tasks on the
        driver's node, which cut what is left to do into one decode task's blocks. Nothing waits for
        the whole listing, and the driver holds none of it.
        """
        here = _on_this_node(ray)
        ledgers = [ray.remote(num_cpus=0)(Ledger).options(scheduling_strategy=here).remote() for _ in range(LEDGERS)]
        done = self.output.done(ray)
        if done is not None:
            done.map_batches(load_done, batch_format="pyarrow", num_cpus=LIST_CPUS,
                             fn_kwargs={"ledgers": ledgers, "job": self.opts.shard}).materialize()
        done_earlier = sum(ray.get([ledger.seal.remote() for ledger in ledgers]))
        claims = {"num_cpus": 0, "scheduling_strategy": here,  # light (hashing names): never short of room
                  "max_retries": 0}  # a second try would find its own keys claimed (runtime.distributed.ledger)
        claimed = _cut(self.listing(ray), CLAIM_ROWS).map_batches(
            claim_batch, batch_size=CLAIM_ROWS, batch_format="pyarrow", concurrency=CLAIM_TASKS,
            fn_kwargs={"ledgers": ledgers, "rows": self.decode_rows(), "job": self.opts.shard, "counter": counter,
                       "ahead": max(CLAIM_AHEAD, 8 * self.decode_rows() * int(ray.cluster_resources().get("CPU", 1)))},
            **claims)
        todo = _cut(claimed, self.decode_rows())
        return todo, ledgers, done_earlier

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
        counter = ray.remote(num_cpus=0)(Counter).options(scheduling_strategy=_on_this_node(ray)).remote()
        claim = Claim(self.output.run, workers * resources["num_cpus"], workers * resources.get("num_gpus", 0.0),
                      self.opts.command)
        s = Summary(plan.backend, plan.resolved_precision, plan.artifact, plan.synthetic, workers=workers)
        ledgers: list[Any] = []
        admission = None
        watch = Watchdog(ray, counter, self.opts.stall_s, need=Need(resources["num_cpus"], resources.get("num_gpus", 0.0)))
        try:
            admission = wait_for_admission(ray, claim, counter)
            todo, ledgers, done_earlier = self.settle(ray, counter)
            s.images = done_earlier
            if report and done_earlier:
                print(f"distributed: resuming: {done_earlier} inputs done earlier are skipped", file=sys.stderr)
            start = time.perf_counter()
            with progress_bar(unit="img", enabled=self.opts.progress) as bar, watch.running(bar):
                stream = iter(self.pipeline(ray, todo, counter).iter_batches(batch_format="pyarrow", batch_size=None))
                with contextlib.closing(stream):  # pyright: ignore[reportArgumentType]
                    for table in stream:
                        for row in table.to_pylist():
                            part = Part(**row)
                            self._commit(part, s, watch, bar, report, start)
                            if on_part is not None:
                                on_part(part)
            counts = ledger_totals(ray, ledgers)
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
                if admission is not None:
                    admission.release.remote(claim.job)
                for actor in (counter, *ledgers):
                    ray.kill(actor)
        if counts.todo + counts.done == 0 and self.opts.shard is None:  # a shard of a short list may hold none
            raise UsageError(f"no images found in {self.input}")
        s.images += counts.done - done_earlier  # those of the output listed again
        s.more_failed += counts.done_failed
        s.resumed = counts.done - counts.done_failed
        s.seconds = time.perf_counter() - start
        return s

    def _commit(self, part: Part, s: Summary, watch: Watchdog, bar: Any, report: bool, start: float) -> None:
        """Commit a part the pipeline wrote, and count it."""
        name = self.output.commit(part)
        if report:
            bar.write(f"distributed: committed {name}: {part.rows} rows ({self.output.committed} this run)",
                      file=sys.stderr)
        watch.committed = self.output.committed
        if s.first_row_s is None:
            s.first_row_s = time.perf_counter() - start
        s.images += part.rows
        kept = max(0, min(part.failed, len(part.failures), MAX_LISTED_FAILURES - len(s.failed)))
        s.failed.extend(Prediction(m.split(": ", 1)[0], error=m) for m in part.failures[:kept])
        s.more_failed += part.failed - kept
        for message in part.failures if report else ():
            bar.write(f"distributed: error: {message}", file=sys.stderr)

    def _kept(self, s: Summary) -> str:
        return f"{self.output.committed} rows of this run committed to {self.output.output} ({s.images} inputs done)"


class Watchdog:
    """Watches the job from a thread: moves the progress bar from the counter, says when a node leaves or
    joins, says where the job stands every `say_s` when no bar shows it, and ends the job (it interrupts
    the main thread, which waits inside Ray; the job turns that into `Stalled`) when no node can hold an
    actor and a decode task for `room_s`, or nothing is classified for `stall_s`."""

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
        listed, seen, last, moved = 0, 0, (0, 0), time.monotonic()
        said, room_since, nodes = moved, None, self._nodes({})
        while not self._stop.wait(self.poll_s):
            try:
                todo, rows = self.ray.get(self.counter.get.remote(), timeout=30)
            except Exception:  # the counter's node is the driver's: if it is gone, so are we
                todo, rows = listed, seen
            if todo != listed:  # the total grows as the listing streams
                listed = bar.total = todo
                bar.refresh()
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
                bar.write(f"distributed: {seen} inputs classified of {listed} listed to do, {self.committed} rows "
                          "committed" + ("" if now - moved < self.say_s else f"; waiting: {pending_demand(self.ray)}"),
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
