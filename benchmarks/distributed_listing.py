"""Driver memory of a Ray job's listing and resume, against the input count: it should stay flat.

    python -m benchmarks.distributed_listing --model artifacts/<model> --counts 100000 1000000 --kinds list folder

For each kind of INPUT (a text list of names, a folder tree of empty `.jpg` files) and each count N,
the inputs and an output folder whose committed parts already hold half of them (so resume has work
to do) are made, then a fresh process starts a local Ray and runs the job's stages up to decoding:
check INPUT and the output, load what the output holds into the ledgers, list INPUT and claim every
input (`Job.settle`, streamed to the end: each input once, those done left out). That driver's resident
memory is sampled every 20 ms; the figure is its peak above the resident memory it had just before
(Ray connected, modules imported). Beside it, what the ledgers hold (on the driver's node, in their own
processes). The slope is the growth per million inputs between the smallest and the largest count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from runtime.errors import ArgumentParser, run_cli

FILES_PER_FOLDER = 1000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_inputs(kind: str, n: int, root: Path) -> str:
    """N inputs of `kind` under `root`; returns INPUT. Files are empty: listing never opens them."""
    if kind == "list":
        path = root / "inputs.txt"
        with path.open("w") as f:
            for i in range(n):
                f.write(f"/data/images/{i // FILES_PER_FOLDER:06d}/img{i:09d}.jpg\n")
        return str(path)
    folder = root / "images"
    for start in range(0, n, FILES_PER_FOLDER):
        sub = folder / f"{start // FILES_PER_FOLDER:06d}"
        sub.mkdir(parents=True)
        for i in range(start, min(n, start + FILES_PER_FOLDER)):
            (sub / f"img{i:09d}.jpg").touch()
    return str(folder)


def make_done(inp: str, kind: str, n: int, out: Path) -> None:
    """An output whose parts hold every other input, as an earlier run would have left it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.distributed.writer import output_schema

    out.mkdir()
    if kind == "list":
        names = [f"/data/images/{i // FILES_PER_FOLDER:06d}/img{i:09d}.jpg" for i in range(0, n, 2)]
    else:
        names = [f"{inp}/{i // FILES_PER_FOLDER:06d}/img{i:09d}.jpg" for i in range(0, n, 2)]
    schema = output_schema()
    for p, start in enumerate(range(0, len(names), 100_000)):
        chunk = names[start : start + 100_000]
        table = pa.table({"path": chunk, **{f.name: pa.nulls(len(chunk), f.type) for f in schema if f.name != "path"}},
                         schema=schema)
        pq.write_table(table, out / f"part-earlier-{p:05d}.parquet")


def measure_one(inp: str, out: str, model: str) -> dict[str, Any]:
    """In this process: Ray connected, then the peak driver memory of the job's checks, listing and claims."""
    import ray

    from runtime.distributed import Job, JobOptions, connect
    from runtime.distributed.job import ledger_totals

    connect()
    baseline, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    try:
        job = Job(inp, out, model, JobOptions(backend="ort-cpu", progress=False))
        todo, ledgers, _ = job.settle(ray)
        listed = sum(block.num_rows for block in todo.iter_batches(batch_format="pyarrow", batch_size=None))
        counts = ledger_totals(ray, ledgers)
        held = sum(ray.get([ledger.held_bytes.remote() for ledger in ledgers]))
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - t
    job.close()
    ray.shutdown()
    assert listed == counts.todo, (listed, counts)
    return {"todo": counts.todo, "done": counts.done, "seconds": round(seconds, 1),
            "baseline_mb": round(baseline / 2**20, 1), "peak_above_baseline_mb": round((peak[0] - baseline) / 2**20, 1),
            "ledgers_mb": round(held / 2**20, 1)}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.distributed_listing", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", required=True, help="artifact folder or model file (the job's plan needs one; never run)")
    p.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000], help="input counts to measure")
    p.add_argument("--kinds", nargs="+", choices=["list", "folder"], default=["list", "folder"])
    p.add_argument("--one", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)  # one measurement, here
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def report(args: Any) -> int:
    if args.one:
        print(json.dumps(measure_one(*args.one, args.model)))
        return 0
    rows = []
    for kind in args.kinds:
        for n in sorted(args.counts):
            with tempfile.TemporaryDirectory(prefix="distributed-listing-") as tmp:
                inp = make_inputs(kind, n, Path(tmp))
                make_done(inp, kind, n, Path(tmp) / "out")
                done = subprocess.run([sys.executable, "-m", "benchmarks.distributed_listing", "--one", inp,
                                       str(Path(tmp) / "out"), "--model", args.model], capture_output=True, text=True,
                                      check=True)
            rows.append({"kind": kind, "inputs": n, **json.loads(done.stdout.strip().splitlines()[-1])})
            r = rows[-1]
            print(f"{kind:6} {n:>9,} inputs ({r['done']:,} done earlier): driver peak +{r['peak_above_baseline_mb']} MB "
                  f"above {r['baseline_mb']} MB, ledgers {r['ledgers_mb']} MB, {r['seconds']} s", flush=True)
        mine = [r for r in rows if r["kind"] == kind]
        if len(mine) > 1:
            lo, hi = mine[0], mine[-1]
            slope = (hi["peak_above_baseline_mb"] - lo["peak_above_baseline_mb"]) / ((hi["inputs"] - lo["inputs"]) / 1e6)
            print(f"{kind:6} slope: {slope:+.1f} MB per million inputs")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("distributed_listing", lambda: report(args), entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
