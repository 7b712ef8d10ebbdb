"""One job on a connected Ray: the plan settled on a worker, the Ray Data pipeline (decode tasks, an
inference actor pool), and the driver loop that commits what arrives."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.artifact import find_model
from runtime.auto import choose
from runtime.backends import BackendUnavailable, backend_kind, create
from runtime.console import progress_bar
from runtime.cpuinfo import usable_cores
from runtime.distributed.sources import decode_batch, is_uri, list_inputs
from runtime.distributed.writer import PartWriter, error_rows, output_schema
from runtime.errors import DeitError, Interrupted, Unavailable, UsageError, signals_deferred
from runtime.classify import Summary
from runtime.predictor import Prediction, Predictor
from runtime.preprocess import DEFAULT_MAX_PIXELS, Preprocessing

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

# What a decode task can hold at once: one image at --max-pixels decoded and converted to RGB (two
# copies of 3 bytes a pixel; a 16k x 16k image is 1.5 GB) besides its block of pixels. Ray reserves it
# per task, so a node runs no more decoders than its memory holds.
DECODE_BYTES_PER_PIXEL = 6
# Inputs per decode task: large enough that a 50-million-image job stays at ~50,000 blocks, small
# enough that a small job still gives every CPU a few tasks.
MAX_BLOCK_ROWS = 1024
# Decoded pixels travel in blocks of at most this size (~50 DeiT inputs), so inference starts early
# and the object store holds only a few blocks per actor.
PIXEL_BLOCK_BYTES = 32 * 2**20
MAX_LISTED_FAILURES = 20


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


@dataclass(frozen=True)
class Plan:
    """What the actors run, settled once on a worker (where the model and the GPUs are)."""

    backend: str
    precision: str | None  # None: the named model file's own
    artifact: str
    model_file: str | None
    device: str
    resolved_precision: str
    spec: Preprocessing
    checkpoint: str
    synthetic: bool
    choice: str | None = None  # what `auto` chose and why


class Classifier:
    """The inference stage: one backend per actor, loaded once, and the project's one Predictor."""

    def __init__(self, plan: Plan, batch_size: int, threads: int | None, topk: int) -> None:
        self._context = contextlib.ExitStack()
        model_file = Path(plan.model_file) if plan.model_file else None
        backend = create(plan.backend, plan.artifact, precision=plan.precision, max_batch=batch_size,
                         threads=threads, model_file=model_file)
        self.predictor = Predictor(self._context.enter_context(backend), topk)

    def __del__(self) -> None:
        """Ray Data drops the actor's instance when the pool shuts down: the backend leaves its context then."""
        self._context.close()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow as pa

        decoded = [str(e) if e else pixels for e, pixels in zip(batch["error"], batch["pixels"])]
        rows = self.predictor.predict([str(p) for p in batch["path"]], decoded)
        return pa.table({
            "path": [str(r.source) for r in rows],
            "indices": [[i for i, _, _ in r.top] if r.top else None for r in rows],
            "labels": [[label for _, label, _ in r.top] if r.top else None for r in rows],
            "probs": [[p for _, _, p in r.top] if r.top else None for r in rows],
            "error": [r.error for r in rows],
        }, schema=output_schema())


def make_plan(backend: str, model: str | None, artifacts: str, precision: str | None, batch_size: int,
              threads: int | None, topk: int) -> Plan:
    """Find the model, settle `auto`, and check the model classifies with `topk` classes; runs on a worker."""
    artifact, model_file = find_model(model, artifacts)
    choice = None
    if backend == "auto":
        picked = choose(artifact, precision, batch_size, threads, model_file)
        backend, precision, choice = picked.backend, (None if model_file else picked.precision), picked.describe()
    be = Predictor(create(backend, artifact, precision=precision, max_batch=batch_size, threads=threads,
                          model_file=model_file), topk).backend
    reason = backend_kind(backend).unavailable_reason()
    if reason:
        raise BackendUnavailable(f"backend {backend!r} is unavailable on the Ray workers: {reason}")
    return Plan(backend, precision, str(artifact), str(model_file) if model_file else None, be.device, be.precision,
                be.meta.preprocessing, be.meta.checkpoint, be.meta.synthetic, choice)


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
        ray.init(address=address, **quiet)
        started = False
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ray.init(num_cpus=num_cpus or usable_cores(), include_dashboard=False,
                 object_store_memory=object_store_bytes or int(min(4 * 2**30, max(2**29, memory // 10))), **quiet)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows written, which is what a user waits for
    ctx.print_on_execution_start = False
    ctx.target_max_block_size = PIXEL_BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return started


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
        return ray.get(task.remote(job.backend, model, artifacts, job.precision, job.batch_size, job.threads, job.topk))
    except Exception as err:
        raise _unwrapped(err) from None


def _pool(ray: Any, plan: Plan, job: JobOptions) -> tuple[int, dict[str, Any]]:
    """Actor count and resources: one per GPU share, or one per node for a CPU backend (which uses the
    node's cores itself), always leaving a CPU for decoding."""
    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0)
    if plan.device == "cuda":
        gpus = resources.get("GPU", 0)
        if not gpus:
            raise BackendUnavailable(f"backend {plan.backend!r} runs on a GPU and the Ray cluster has none")
        size = job.num_workers or max(1, int(gpus // job.num_gpus_per_worker))
        ask = {"num_cpus": job.num_cpus_per_worker, "num_gpus": job.num_gpus_per_worker}
    else:
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        size = job.num_workers or max(1, len(nodes))
        ask = {"num_cpus": job.num_cpus_per_worker}
    if cpus - size * job.num_cpus_per_worker < 1:
        raise UsageError(f"{size} workers x {job.num_cpus_per_worker:g} CPUs leave none of the cluster's {cpus:g} CPUs "
                         "for decoding; lower --num-workers or --num-cpus-per-worker")
    return size, ask


def _decode_memory(ray: Any, max_pixels: int) -> int:
    """The memory a decode task reserves (DECODE_BYTES_PER_PIXEL), at most half the largest node's, so
    a small machine still decodes (where one huge image can then run out of memory, as in runtime.infer)."""
    need = DECODE_BYTES_PER_PIXEL * max_pixels + PIXEL_BLOCK_BYTES
    largest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    return int(min(need, largest // 2)) if largest else need


def build_dataset(ray: Any, sources: pa.Array, plan: Plan, job: JobOptions, workers: int,
                  actor_resources: dict[str, Any]) -> ray.data.Dataset:
    """The pipeline over `sources`: decode tasks (1 CPU each), then the actor pool, streamed."""
    import pyarrow as pa

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows = max(job.batch_size, min(MAX_BLOCK_ROWS, math.ceil(len(sources) / (8 * cpus))))
    blocks = [pa.table({"source": sources.slice(i, rows)}) for i in range(0, len(sources), rows)]
    h, w = plan.spec.input_size
    decode_rows = max(1, min(rows, PIXEL_BLOCK_BYTES // (3 * h * w * 4)))
    # Fault tolerance is Ray Data's default, which exactly-once needs: a task lost with its worker runs
    # again (max_retries=-1), a dead actor restarts and its tasks run again (max_restarts=-1,
    # max_task_retries=-1). The decode tasks' memory reservation also keeps Ray from fusing decoding
    # into the actors (fused, the two would run one after the other instead of overlapping).
    return (ray.data.from_arrow(blocks)
            .map_batches(decode_batch, batch_size=decode_rows, batch_format="numpy", num_cpus=1,
                         memory=_decode_memory(ray, job.max_pixels),
                         fn_kwargs={"spec": plan.spec, "draft": job.draft, "max_pixels": job.max_pixels})
            .map_batches(Classifier, batch_size=job.batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=workers),
                         fn_constructor_kwargs={"plan": plan, "batch_size": job.batch_size, "threads": job.threads,
                                                "topk": job.topk},
                         **actor_resources))


@dataclass(frozen=True)
class JobOptions:
    backend: str = "auto"
    precision: str | None = None
    batch_size: int = 8
    topk: int = 5
    threads: int | None = None  # intra-op threads of CPU backends (default: the node's cores)
    num_workers: int | None = None  # inference actors (default: one per GPU share, or per node)
    num_gpus_per_worker: float = 1.0
    num_cpus_per_worker: float = 1.0
    fmt: str = "parquet"
    rows_per_file: int = 10_000
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = False
    progress: bool = True


class Job:
    """One classification job: inputs listed and the output read when made (no Ray needed, so a bad
    argument fails at once), then `plan()` and `run()` on the connected Ray."""

    def __init__(self, input: str, output: str, model: str | None = None, opts: JobOptions = JobOptions(),
                 artifacts: str = "artifacts") -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        self.opts = opts
        self.model = os.path.abspath(model) if model and not is_uri(model) else model
        self.artifacts = os.path.abspath(artifacts)
        self.inputs = list_inputs(input)
        self.writer = PartWriter(output, opts.fmt, opts.rows_per_file)
        done = self.writer.done()
        keys = self.inputs.keys
        folders = pa.array([k for k, _ in self.inputs.errors], pa.string())
        mine = done.filter(pc.is_in(done["path"], value_set=pa.concat_arrays([keys, folders])))  # not other jobs' rows
        self.done_rows = mine.num_rows
        self.done_failed = mine.num_rows - mine["error"].null_count
        self.todo = self.inputs.sources.filter(pc.invert(pc.is_in(keys, value_set=done["path"])))
        reported = pc.is_in(folders, value_set=done["path"]).to_pylist()
        self.folder_errors = [e for e, r in zip(self.inputs.errors, reported) if not r]
        self.settled: tuple[Plan, int, dict[str, Any]] | None = None

    def plan(self) -> tuple[Plan, int, dict[str, Any]]:
        """What runs and how many actors (a worker opens the model and settles `auto`), once per job."""
        if self.settled is None:
            ray = import_ray()
            plan = _remote_plan(ray, self.opts, self.model, self.artifacts)
            self.settled = (plan, *_pool(ray, plan, self.opts))
        return self.settled

    def run(self, show_errors: bool = False, on_rows: Callable[[pa.Table], None] | None = None) -> Summary:
        """Classify what is left (per-file errors on stderr if asked). Rows go to the output as they arrive and, if
        given, to `on_rows` (like runtime.classify's on_prediction). Interrupted: commits what arrived, then raises
        `Interrupted`; failed: commits what arrived, then raises."""
        ray = import_ray()
        plan, workers, resources = self.plan()
        s = Summary(plan.backend, plan.resolved_precision, plan.artifact, plan.synthetic, workers=workers,
                    images=self.done_rows, more_failed=self.done_failed, resumed=self.done_rows - self.done_failed)
        start = time.perf_counter()
        total = len(self.todo) + len(self.folder_errors)
        with progress_bar(total=total, unit="img", enabled=self.opts.progress) as bar:
            def take(rows: pa.Table) -> None:
                failed = [(p, e) for p, e in zip(rows["path"].to_pylist(), rows["error"].to_pylist()) if e]
                with signals_deferred():  # the rows and the count of them go together
                    self.writer.add(rows)
                    s.images += rows.num_rows
                    kept = max(0, MAX_LISTED_FAILURES - len(s.failed))
                    s.failed.extend(Prediction(p, error=e) for p, e in failed[:kept])
                    s.more_failed += len(failed[kept:])
                bar.update(rows.num_rows)
                if on_rows is not None:
                    on_rows(rows)
                for _, message in failed if show_errors else ():
                    bar.write(f"distributed: error: {message}", file=sys.stderr)

            try:
                if self.folder_errors:
                    take(error_rows(self.folder_errors))
                if len(self.todo):
                    ds = build_dataset(ray, self.todo, plan, self.opts, workers, resources)
                    # closing the stream on the way out stops the execution (its actors) at once, not at GC
                    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))  # a generator
                    with contextlib.closing(batches) as stream:  # pyright: ignore[reportArgumentType]
                        for rows in stream:
                            if s.first_row_s is None:
                                s.first_row_s = time.perf_counter() - start
                            take(rows)
                self.writer.commit()
            except KeyboardInterrupt as err:
                self.writer.commit()
                saved = (f"{self.writer.committed} rows of this run committed to {self.writer.output} "
                         f"({s.images} of {len(self.inputs.sources) + len(self.inputs.errors)} inputs done); "
                         "run the same command again to resume")
                raise Interrupted(getattr(err, "signum", signal.SIGINT), saved) from None
            except Exception as err:  # what arrived is kept; a re-run resumes from it
                self.writer.commit()
                raise _unwrapped(err) from None
        s.seconds = time.perf_counter() - start
        return s
