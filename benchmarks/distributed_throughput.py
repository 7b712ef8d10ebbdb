"""Images/s of one folder through runtime.infer's pipeline and through Ray (runtime.distributed), and what Ray costs.

    python -m benchmarks.distributed_throughput artifacts/deit-small-distilled-patch16-224 ../shared/imagenet-sample \\
        --backend ort-cpu --threads 2

In-process: `runtime.classify.classify` (what `python -m runtime.infer` runs) on a warm backend, timed
from the first file to the last result. Through Ray: `runtime.distributed.Job` over the same folder
into a fresh output folder, on a local Ray started once. A Ray job also pays a fixed cost before its
first rows (a task opens the model, the actors start and load it, the first block is decoded), so its
rate is measured from its first rows to its last; that fixed cost (the time to the first rows), Ray's
start and the job's end-to-end rate are reported beside it. Every figure is the best of `--repeats` passes from
the one timing core (`runtime.backends.timing.measure`), re-measured when other processes loaded the machine
(the local Ray's daemons and workers count as this benchmark's own load).
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime.artifact import SYNTHETIC_WARNING, find_artifact, write_json
from runtime.backends import create
from runtime.classify import ClassifyOptions, classify, default_workers
from runtime.predictor import Predictor
from runtime.errors import ArgumentParser, UsageError, run_cli
from runtime.inputs import list_images
from runtime.backends.timing import Timing, host_ms, measure


def _others_cpu() -> dict[int, int]:
    """Clock ticks used so far by each process that is not this one or its descendant (a local Ray's daemons and
    workers are ours). Counted per process, because Ray's workers can exit before anyone reaps their time."""
    me, parents, ticks = os.getpid(), {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry.name)] = int(fields[1])
            ticks[int(entry.name)] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime

    def ours(pid: int) -> bool:
        while pid > 1 and pid != me:
            pid = parents.get(pid, 0)
        return pid == me

    return {pid: t for pid, t in ticks.items() if not ours(pid)}


class OthersLoad:
    """Cores other processes kept busy (a `runtime.backends.timing.LoadMeter`): with Ray the work runs in processes of our
    own, which the default meter (the machine's load minus this process's) would count as someone else's."""

    def start(self) -> None:
        self._before = _others_cpu()

    def stop(self, wall_s: float) -> float | None:
        if wall_s <= 0:
            return None
        used = sum(t - self._before.get(pid, 0) for pid, t in _others_cpu().items())
        return round(max(0, used) / os.sysconf("SC_CLK_TCK") / wall_s, 2)


def _best(run_once: Any, images: int, repeats: int) -> Timing:
    return measure(lambda: host_ms(run_once), images, warmup=0, min_iters=repeats, min_time_s=0.0, max_iters=repeats,
                   retries=1, load=OthersLoad())


def measure_distributed(
    artifact_dir: str | Path,
    images: str | Path,
    backend: str = "ort-cpu",
    precision: str | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    cpus: int | None = None,
    limit: int | None = None,
    repeats: int = 2,
) -> dict[str, Any]:
    """In-process vs Ray images/s, overhead per image, Ray's start and a job's fixed cost (JSON-serialisable)."""
    from runtime.distributed import Job, JobOptions, connect, import_ray

    ray = import_ray()
    files = list_images([Path(images)], recursive=True)[:limit]
    if not files:
        raise UsageError(f"no images found in {images}")
    artifact = find_artifact(artifact_dir)
    n = len(files)
    workers = default_workers()
    be = create(backend, artifact, precision=precision, max_batch=batch_size, threads=threads)
    opts = ClassifyOptions(batch_size=batch_size, workers=workers)
    with be:
        classify(files[: 2 * batch_size], Predictor(be), opts)  # first runs allocate
        local = _best(lambda: classify(files, Predictor(be), opts), n, repeats)
    meta, resolved = be.meta, be.precision

    t0 = time.perf_counter()
    started = connect(num_cpus=cpus)
    startup_s = time.perf_counter() - t0
    # Small parts, so the rate after the first rows is timed from many commits, not one at the end.
    job_opts = JobOptions(backend=backend, precision=precision, batch_size=batch_size, threads=threads, progress=False,
                          rows_per_file=4 * batch_size)
    runs: list[dict[str, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="distributed-bench-") as tmp:
            listing = Path(tmp) / "images.txt"  # exactly the files measured in-process (--limit)
            listing.write_text("".join(f"{f.resolve()}\n" for f in files))
            outputs = itertools.count()

            def job() -> float:
                """One job; returns the milliseconds `n` images take at its rate after the first rows."""
                arrivals: list[tuple[float, int]] = []
                t = time.perf_counter()
                summary = Job(str(listing), f"{tmp}/out{next(outputs)}", str(artifact), job_opts).run(
                    on_part=lambda part: arrivals.append((time.perf_counter(), part.rows)))
                total_s = time.perf_counter() - t
                if summary.predicted != n or len(arrivals) < 2:
                    raise UsageError(f"{images}: {summary.failures} images failed, or too few to time; use more")
                rate = (n - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0])
                runs.append({"rate": rate, "total_s": total_s, "first_rows_s": arrivals[0][0] - t})
                return n * 1000.0 / rate

            through_ray = measure(job, n, warmup=0, min_iters=repeats, min_time_s=0.0, max_iters=repeats, retries=1,
                                  load=OthersLoad())
            resources = ray.cluster_resources()
    finally:
        if started:
            ray.shutdown()
    local_rate = n * 1000.0 / local.min_ms
    best = max(runs, key=lambda r: r["rate"])
    ray_rate = best["rate"]
    return {
        "model": meta.checkpoint,
        "synthetic_weights": meta.synthetic,
        "backend": backend,
        "precision": resolved,
        "batch_size": batch_size,
        "backend_threads": threads,
        "decode_workers_in_process": workers,
        "ray_cpus": resources.get("CPU", 0),
        "images": n,
        "repeats": repeats,
        "ray_version": ray.__version__,
        "in_process_images_per_s": round(local_rate, 2),
        "ray_images_per_s": round(ray_rate, 2),
        "ratio": round(ray_rate / local_rate, 3),
        "overhead_ms_per_image": round(1000.0 / ray_rate - 1000.0 / local_rate, 3),
        "ray_start_s": round(startup_s, 2),
        "ray_first_rows_s": round(best["first_rows_s"], 2),
        "ray_end_to_end_images_per_s": round(n / min(r["total_s"] for r in runs), 2),
        "other_load_cores": {"in_process": local.other_load_cores, "through_ray": through_ray.other_load_cores},
        "contended": local.contended or through_ray.contended,
    }


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.distributed_throughput", description=(__doc__ or "").split("\n")[0])
    p.add_argument("model", help="artifact folder (or its model.onnx)")
    p.add_argument("images", help="folder of images (searched recursively)")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--precision")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="backend intra-op threads (default: the backend's own)")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: this machine's)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def report(args: Any) -> int:
    r = measure_distributed(args.model, args.images, args.backend, args.precision, args.batch_size, args.threads,
                            args.cpus, args.limit, args.repeats)
    if r["synthetic_weights"]:
        print(SYNTHETIC_WARNING, file=sys.stderr)
    if r["contended"]:
        print(f"WARNING: other processes loaded the machine while it was measured ({r['other_load_cores']} cores); "
              "these figures are not reliable, measure again on a quiet machine", file=sys.stderr)
    print(f"{r['model']} on {r['backend']} ({r['precision']}), batch {r['batch_size']}, {r['images']} images, "
          f"{r['backend_threads'] or 'default'} backend threads, Ray {r['ray_version']} with {r['ray_cpus']:g} CPUs")
    print(f"  runtime.infer's pipeline: {r['in_process_images_per_s']:8.2f} images/s")
    print(f"  through Ray:              {r['ray_images_per_s']:8.2f} images/s  ({r['ratio']:.1%}; "
          f"{r['overhead_ms_per_image']:+.2f} ms per image)")
    print(f"  Ray start {r['ray_start_s']} s (once per session); a job's first rows after {r['ray_first_rows_s']} s; "
          f"one job over the folder, everything but Ray's start included: {r['ray_end_to_end_images_per_s']} images/s")
    if args.json:
        write_json(args.json, r)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("distributed_throughput", lambda: report(args), entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
