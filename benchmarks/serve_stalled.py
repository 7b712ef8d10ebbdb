"""`python -m benchmarks.serve_stalled`: runtime.serve's throughput for normal clients while others stall uploads.

    python -m benchmarks.serve_stalled --model artifacts/deit-tiny-distilled-patch16-224 --images ../shared/imagenet-sample
    python -m benchmarks.serve_stalled --model artifacts/deit-tiny-distilled-patch16-224 --stalled 64 --body-timeout 5 \\
        --concurrency 16 --seconds 15 --out docs/results

1. Unloaded: --concurrency clients send one photo per request (BYTES, Triton's asyncio HTTP client) for --seconds.
2. Attacked: the same, while --stalled other connections each declare a 60 MB body, send 1 KiB of it and then
   nothing; each one that is answered (408 once --body-timeout has passed) or closed opens again at once, so
   the server always faces --stalled stalled uploads. The normal load runs from the start; throughput is
   counted from the moment --body-timeout has passed since the attack began, for --seconds.
3. --rounds times both, alternating, so a neighbour's load on a shared machine falls on both alike; the
   target: the attacked images/s (all rounds) are at least 80% of the unloaded ones. Each phase records the
   cores other processes kept busy meanwhile.

Writes serving-stalled.json and serving-stalled.md into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import environment
from benchmarks.serve import NeighbourLoad, _drive, _inputs, add_server_arguments, launch
from benchmarks.report import publish
from runtime.artifact import MODEL_FILES, find_model, read_onnx_meta
from runtime.errors import ArgumentParser, UsageError, doc_parser, run_cli
from runtime.inputs import list_images

FILES = {"json": "serving-stalled.json", "markdown": "serving-stalled.md"}
DECLARED = 60_000_000
TARGET = 0.8


async def stall_forever(host: str, port: int, model: str, stop: asyncio.Event, answers: dict[str, int]) -> None:
    """One stalled upload, opened again each time the server answers or closes it, until `stop`."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            answers["connect_failed"] = answers.get("connect_failed", 0) + 1
            await asyncio.sleep(0.05)  # the server refused the connection: the attacker tries again
            continue
        writer.write(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {DECLARED}\r\n\r\n".encode() + b"{" + b" " * 1023)
        try:
            reading = asyncio.ensure_future(reader.read())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if reading.done():
                status = reading.result().split(b" ", 2)[1].decode() if reading.result() else "closed"
                answers[status] = answers.get(status, 0) + 1
            else:
                reading.cancel()
        except OSError:
            answers["reset"] = answers.get("reset", 0) + 1
        finally:
            writer.close()


async def attacked(url: str, model: str, requests: list[list[Any]], args: argparse.Namespace,
                   load: NeighbourLoad) -> dict[str, Any]:
    """The normal load beside --stalled stalled uploads; throughput counted once --body-timeout has passed."""
    host, port = url.rsplit(":", 1)
    stop = asyncio.Event()
    answers: dict[str, int] = {}
    attackers = [asyncio.ensure_future(stall_forever(host, int(port), model, stop, answers)) for _ in range(args.stalled)]
    try:
        before = await _drive(url, model, requests, args.concurrency, args.body_timeout)
        load.start()
        cpu = cpu_s(load.server_pid)
        after = await _drive(url, model, requests, args.concurrency, args.seconds)
        cpu = cpu_s(load.server_pid) - cpu
    finally:
        stop.set()
        await asyncio.gather(*attackers)
    return {"before_timeout": summary(before), "after_timeout": summary(after, load, cpu), "stalled_answers": answers}


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system) that process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(run: tuple[list[float], int, int, float, dict[int, int]], load: NeighbourLoad | None = None,
            server_cpu_s: float | None = None) -> dict[str, Any]:
    """One phase's figures; the server's CPU time per answered image shows its own cost whatever the neighbours do."""
    latencies, refused, errors, seconds, _ = run
    ordered = sorted(latencies)
    return {"answered": len(latencies), "refused_503": refused, "errors": errors, "seconds": round(seconds, 2),
            "images_per_s": round(len(latencies) / seconds, 2),
            "p50_ms": round(ordered[len(ordered) // 2], 1) if ordered else None,
            "other_load_cores": load.stop(seconds) if load else None,
            "server_cpu_ms_per_image": round(1000 * server_cpu_s / len(latencies), 1)
            if server_cpu_s is not None and latencies else None}


def measure_round(url: str, model: str, requests: list[list[Any]], args: argparse.Namespace, pid: int) -> dict[str, Any]:
    load = NeighbourLoad(pid)
    load.start()
    cpu = cpu_s(pid)
    unloaded = summary(asyncio.run(_drive(url, model, requests, args.concurrency, args.seconds)), load, cpu_s(pid) - cpu)
    under_attack = asyncio.run(attacked(url, model, requests, args, load))
    print(f"serve-stalled: unloaded {unloaded}; attacked {under_attack}", file=sys.stderr)
    return {"unloaded": unloaded, **under_attack}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    artifact, model_file = find_model(args.model, "artifacts")
    if model_file is not None:
        raise UsageError(f"--model {args.model}: give the artifact folder")
    files = list_images([args.images])[: args.photos]
    if not files:
        raise UsageError(f"--images {args.images}: no images found")
    requests = [_inputs("BYTES", f.read_bytes()) for f in files]
    server_args = ["--backend", args.backend, "--body-timeout", str(args.body_timeout), "--max-queue-size", "64",
                   *(["--threads", str(args.threads)] if args.threads else [])]
    with launch(artifact, *server_args) as (proc, url, model):
        asyncio.run(_drive(url, model, requests, args.concurrency, None, total=4 * args.concurrency))  # warm-up
        rounds = [measure_round(url, model, requests, args, proc.pid) for _ in range(args.rounds)]
    env = environment(args.threads)
    for dist in ("uvicorn", "starlette", "httptools", "tritonclient", "aiohttp"):
        env["versions"][dist] = importlib.metadata.version(dist)
    answered = {phase: sum(r[phase]["answered"] for r in rounds) for phase in ("unloaded", "after_timeout")}
    seconds = {phase: sum(r[phase]["seconds"] for r in rounds) for phase in ("unloaded", "after_timeout")}
    ratio = (answered["after_timeout"] / seconds["after_timeout"]) / (answered["unloaded"] / seconds["unloaded"]) \
        if answered["unloaded"] else 0.0
    return {"date": time.strftime("%Y-%m-%d"), "artifact": str(artifact), "model": artifact.name,
            "synthetic": read_onnx_meta(artifact / MODEL_FILES["fp32"]).synthetic,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env, "rounds": rounds, "ratio": round(ratio, 3), "target": TARGET, "met": ratio >= TARGET}


def markdown(r: dict[str, Any]) -> str:
    env, s = r["environment"], r["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items()))
    phases = [("unloaded", "unloaded"), ("before_timeout", f"first {s['body_timeout']:g} s of the attack"),
              ("after_timeout", f"attack, after --body-timeout {s['body_timeout']:g} s")]
    lines = [
        f"# Serving under stalled uploads: `runtime.serve`, {r['model']} (measured)", "",
        f"- **Date:** {r['date']}.",
        f"- **Hardware:** `lscpu` model name \"{env['cpu']}\", {env['cpu_cores_usable']} usable cores; the clients and the "
        "stalled uploads run on the same cores as the server.",
        f"- **Versions:** Python {env['python']}, {versions}.",
        f"- **Model:** `{r['artifact']}` on {s['backend']}" + (", SYNTHETIC weights." if r["synthetic"] else "."),
        f"- **Command:** `python -m benchmarks.serve_stalled --model {r['artifact']} --images {s['images']} "
        f"--photos {s['photos']} --stalled {s['stalled']} --body-timeout {s['body_timeout']:g} "
        f"--concurrency {s['concurrency']} --seconds {s['seconds']:g} --rounds {s['rounds']}`.", "",
        f"{s['concurrency']} clients send one photo per request (BYTES); {s['stalled']} other connections each declare a "
        "60 MB body, send 1 KiB and stall, and open again as soon as the server answers them. Phases alternate; "
        "\"other load\" is the cores that processes other than the benchmark and the server kept busy meanwhile.", "",
        "| round | phase | images/s | p50 ms | answered | 503 | other errors | other load (cores) | server CPU ms per image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, round_ in enumerate(r["rounds"], 1):
        for key, name in phases:
            row = round_[key]
            load = row["other_load_cores"] if row["other_load_cores"] is not None else "-"
            cpu = row["server_cpu_ms_per_image"] if row["server_cpu_ms_per_image"] is not None else "-"
            lines.append(f"| {i} | {name} | {row['images_per_s']} | {row['p50_ms']} | {row['answered']} | "
                         f"{row['refused_503']} | {row['errors']} | {load} | {cpu} |")
    answers: dict[str, int] = {}
    for round_ in r["rounds"]:
        for k, v in round_["stalled_answers"].items():
            answers[k] = answers.get(k, 0) + v
    verdict = "met" if r["met"] else "NOT met"
    lines += ["", f"What the stalled uploads got: {', '.join(f'{k}: {v}' for k, v in sorted(answers.items())) or 'none'}.", "",
              f"Over all rounds, after --body-timeout, normal requests kept **{100 * r['ratio']:.0f}%** of their unloaded "
              f"images/s (target {100 * r['target']:.0f}%: {verdict})."]
    return "\n".join(lines) + "\n"


def build_parser() -> ArgumentParser:
    p = doc_parser("python -m benchmarks.serve_stalled", __doc__)
    add_server_arguments(p, "the server's backend")
    p.add_argument("--photos", type=int, default=64, help="photos the normal clients cycle through (default 64)")
    p.add_argument("--stalled", type=int, default=64, help="stalled uploads held open at once (default 64)")
    p.add_argument("--body-timeout", type=float, default=5.0, help="the server's --body-timeout (default 5)")
    p.add_argument("--concurrency", type=int, default=16, help="normal clients (default 16)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase (default 15)")
    p.add_argument("--rounds", type=int, default=3, help="unloaded and attacked phases, alternating (default 3)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where serving-stalled.{json,md} go")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.photos, args.stalled, args.concurrency, args.rounds) < 1 or min(args.seconds, args.body_timeout) <= 0:
        p.error("--photos, --stalled, --concurrency, --rounds, --seconds and --body-timeout must be positive")
    if not args.images.is_dir():
        p.error(f"--images {args.images}: no such folder")

    return run_cli("serve-stalled", lambda: publish(run_benchmark(args), args.out, FILES, markdown), entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
