"""Driver memory of a Ray job while rows flow: it should stay flat whatever the number of rows.

    python -m benchmarks.distributed_memory --inputs 100000 --model artifacts/<model>

A text list of N inputs that do not exist (each becomes a row with an error, so the job is paced by
Ray's own work per row, not by decoding) is run through `Job.run` in this process on a local Ray; the
driver's resident memory is read at every committed part. Figures: the baseline (Ray connected,
before the job), the peak above it, and the growth per million rows between the first 20% of the
rows and the end (what a longer job would add), and when the first part was committed. With
`--first-part-only` the job stops there: how long a job of N inputs takes to start classifying.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runtime.errors import ArgumentParser, run_cli


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(inputs: int, model: str, rows_per_file: int, cpus: int | None, first_part_only: bool = False) -> dict[str, Any]:
    from runtime.distributed import Job, JobOptions, connect
    from runtime.errors import Interrupted

    samples: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory(prefix="distributed-memory-") as tmp:
        listing = Path(tmp) / "inputs.txt"
        with listing.open("w") as f:
            for i in range(inputs):
                f.write(f"{tmp}/missing/{i // 1000:06d}/img{i:09d}.jpg\n")
        connect(num_cpus=cpus)
        baseline, t0 = _rss_mb(), time.perf_counter()
        done = [0]

        def on_part(part: Any) -> None:
            done[0] += part.rows
            samples.append((done[0], _rss_mb()))
            if not first:
                first.append(time.perf_counter() - t0)
            if first_part_only:
                raise KeyboardInterrupt

        first: list[float] = []
        opts = JobOptions(backend="ort-cpu", progress=False, rows_per_file=rows_per_file)
        try:
            rows = Job(str(listing), str(Path(tmp) / "out"), model, opts).run(on_part=on_part).images
        except Interrupted:
            rows = done[0]
        seconds = time.perf_counter() - t0
    if first_part_only:
        return {"inputs": inputs, "rows": rows, "first_part_s": round(first[0], 1)}
    early = next((s for s in samples if s[0] >= inputs // 5), samples[0])
    end = samples[-1]
    slope = (end[1] - early[1]) / max(1, end[0] - early[0]) * 1e6
    return {"inputs": inputs, "rows": rows, "first_part_s": round(first[0], 1), "seconds": round(seconds, 1),
            "baseline_mb": round(baseline, 1),
            "peak_above_baseline_mb": round(max(m for _, m in samples) - baseline, 1),
            "at_20pct_mb": round(early[1] - baseline, 1), "at_end_mb": round(end[1] - baseline, 1),
            "growth_mb_per_million_rows": round(slope, 1)}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.distributed_memory", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="rows the job makes (default 100,000)")
    p.add_argument("--model", required=True, help="artifact folder or model file (its speed does not matter here)")
    p.add_argument("--rows-per-file", type=int, default=5000)
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: the machine's)")
    p.add_argument("--first-part-only", action="store_true",
                   help="stop at the first committed part: the time a job of this size takes to start classifying")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def report(args: Any) -> int:
    r = measure(args.inputs, args.model, args.rows_per_file, args.cpus, args.first_part_only)
    if args.first_part_only:
        print(f"{r['inputs']:,} inputs: first part ({r['rows']} rows) committed {r['first_part_s']} s after the job started")
    else:
        print(f"{r['rows']:,} rows in {r['seconds']} s: driver baseline {r['baseline_mb']} MB, peak +{r['peak_above_baseline_mb']} MB; "
              f"+{r['at_20pct_mb']} MB at 20% of the rows, +{r['at_end_mb']} MB at the end: "
              f"{r['growth_mb_per_million_rows']:+.1f} MB per million rows; first part after {r['first_part_s']} s")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("distributed_memory", lambda: report(args), entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
