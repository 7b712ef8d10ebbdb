"""`python -m benchmarks.serve_ray`: runtime.serve in one process beside runtime.serve as a Ray Serve replica.

    python -m benchmarks.serve_ray --model artifacts/deit-small-distilled-patch16-224 --images ../shared/imagenet-sample --out docs/results

Each way is started --repeats times, alternating (one process, Ray, one process, Ray, ...), so a
neighbour's load falls on both: the seconds from launching the command to its ready line, then
--requests sequential requests (one client, one image each, BYTES and FP32 inputs) for batch-1
latency through the whole HTTP path, then SIGTERM and the seconds until it exited. The Ray way starts
a local Ray each time (`--address local`), which is what its start-up includes.
Writes serving-ray.json and serving-ray.md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import environment
from benchmarks.serve import _drive, _inputs, add_server_arguments, launch
from benchmarks.report import publish
from runtime.artifact import MODEL_FILES, find_model, read_onnx_meta
from runtime.errors import ArgumentParser, UsageError, doc_parser, run_cli
from runtime.decode import load_and_preprocess
from runtime.inputs import list_images

WAYS = {"one process": [], "Ray Serve, 1 replica": ["--address", "local", "--replicas", "1"]}
FILES = {"json": "serving-ray.json", "markdown": "serving-ray.md"}


def one_run(artifact: Path, server_args: list[str], requests: dict[str, list[list[Any]]], count: int) -> dict[str, Any]:
    load = os.getloadavg()[0]  # the machine's other work, which a shared host adds to every figure
    t0 = time.perf_counter()
    with launch(artifact, *server_args) as (proc, url, model):
        ready_s = time.perf_counter() - t0
        asyncio.run(_drive(url, model, requests["BYTES"], 1, None, total=5))  # warm-up
        latency = {kind: asyncio.run(_drive(url, model, reqs, 1, None, total=count))[0] for kind, reqs in requests.items()}
        t1 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
        stop_s = time.perf_counter() - t1
    return {"load_1min": round(load, 2), "ready_s": round(ready_s, 2), "stop_s": round(stop_s, 2), "exit_status": status,
            "latency_ms": {k: [round(x, 2) for x in v] for k, v in latency.items()}}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    artifact, model_file = find_model(args.model, "artifacts")
    if model_file is not None:
        raise UsageError(f"--model {args.model}: give the artifact folder")
    files = list_images([args.images])[: args.requests]
    if not files:
        raise UsageError(f"--images {args.images}: no images found")
    meta = read_onnx_meta(artifact / MODEL_FILES["fp32"])
    requests = {"BYTES": [_inputs("BYTES", f.read_bytes()) for f in files],
                "FP32": [_inputs("FP32", load_and_preprocess(f, meta.preprocessing)) for f in files]}
    server_args = ["--backend", args.backend, *(["--threads", str(args.threads)] if args.threads else [])]
    runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, extra in WAYS.items():
            runs[way].append(one_run(artifact, [*server_args, *extra], requests, args.requests))
            print(f"serve-ray-bench: {way}: ready in {runs[way][-1]['ready_s']} s", file=sys.stderr)
    env = environment(args.threads)
    for dist in ("ray", "uvicorn", "starlette", "fastapi", "tritonclient"):
        env["versions"][dist] = importlib.metadata.version(dist)
    return {"date": time.strftime("%Y-%m-%d"), "artifact": str(artifact), "model": artifact.name,
            "synthetic": meta.synthetic, "backend": args.backend, "requests": len(files), "repeats": args.repeats,
            "environment": env, "runs": runs}


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items()))
    lines = [
        f"# Serving: one process beside Ray Serve, {r['model']} (measured)", "",
        f"- **Date:** {r['date']}.",
        f"- **Hardware:** `lscpu` model name \"{env['cpu']}\", {env['cpu_cores_usable']} usable cores, shared by "
        "the server, its client and (for Ray) Ray's own processes.",
        f"- **Versions:** Python {env['python']}, {versions}.",
        f"- **Model:** `{r['artifact']}` on {r['backend']}" + (", SYNTHETIC weights." if r["synthetic"] else "."),
        f"- **Command:** `python -m benchmarks.serve_ray --model {r['artifact']} --requests {r['requests']} "
        f"--repeats {r['repeats']}`.", "",
        f"Start-up: launch to the ready line (median of {r['repeats']}); stop: SIGTERM to exit. Latency: "
        f"{r['requests']} sequential requests of one image each (one client), over all repeats. The 1-minute load "
        f"average of this {env['cpu_cores_usable']}-core machine at each start says how much other work shared it.", "",
        "| server | start-up s | stop s | BYTES p50 ms | BYTES p90 ms | FP32 p50 ms | FP32 p90 ms | load average at start |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for way, runs in r["runs"].items():
        lat = {k: np.concatenate([run["latency_ms"][k] for run in runs]) for k in ("BYTES", "FP32")}
        cells = [f"{np.median([run['ready_s'] for run in runs]):.1f}", f"{np.median([run['stop_s'] for run in runs]):.1f}",
                 *(f"{np.percentile(lat[k], q):.1f}" for k in ("BYTES", "FP32") for q in (50, 90)),
                 " / ".join(f"{run['load_1min']:g}" for run in runs)]
        lines.append(f"| {way} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> ArgumentParser:
    p = doc_parser("python -m benchmarks.serve_ray", __doc__)
    add_server_arguments(p, "the servers' backend")
    p.add_argument("--requests", type=int, default=50, help="sequential requests per input kind and run (default 50)")
    p.add_argument("--repeats", type=int, default=2, help="starts of each server (default 2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where serving-ray.{json,md} go")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.requests < 1 or args.repeats < 1:
        p.error("--requests and --repeats must be positive")
    if not args.images.is_dir():
        p.error(f"--images {args.images}: no such folder")

    return run_cli("serve-ray-bench", lambda: publish(run_benchmark(args), args.out, FILES, markdown), entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
