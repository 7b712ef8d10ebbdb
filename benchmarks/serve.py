"""`python -m benchmarks.serve`: runtime.serve under load, beside runtime.infer's offline throughput.

    python -m benchmarks.serve --model artifacts/deit-small-distilled-patch16-224 --images ../shared/imagenet-sample
    python -m benchmarks.serve --model artifacts/deit-small-distilled-patch16-224 --images ../shared/imagenet-sample \\
        --concurrency 1,4,16,64 --seconds 10 --overload 640 --out docs/results

1. Offline: runtime.infer's pipeline (`runtime.classify.classify`, batches of --max-batch-size) over the
   photos on the same backend: images/s and each photo's top-1; the backend's batch-1 latency on FP32.
2. A server (`python -m runtime.serve`, a subprocess) with dynamic batching, then one with `--no-batching`,
   each driven by Triton's asyncio HTTP client at every concurrency for --seconds: one image per request,
   BYTES (the encoded photo) and FP32 (the preprocessed photo), p50/p90/p99 latency and images/s.
3. Overload: --overload clients at once against a fresh server, three requests each: every answer must be
   200 or 503, the server's peak RSS is read from /proc (VmHWM), and it must be ready and right afterwards.
4. Agreement: every photo sent once as BYTES; its top-1 must equal the offline run's.

The client shares the machine with the server: on a small CPU its own work is part of what is measured.
Other processes' load during each cell is recorded (cores), since a neighbour's burst skews a cell.
Writes serving.json, serving.md and serving.png into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.export_time import _vm_hwm_kib
from benchmarks.harness import environment
from benchmarks.report import write_report
from benchmarks.serve_peer import DEFAULT_VENV, run_peer, write_peer_report
from runtime.artifact import SYNTHETIC_WARNING, find_model
from runtime.backends import create
from runtime.classify import ClassifyOptions, classify
from runtime.errors import ArgumentParser, UsageError, doc_parser, run_cli
from runtime.predictor import Prediction, Predictor
from runtime.decode import load_and_preprocess
from runtime.inputs import list_images
from runtime.backends.timing import _machine_busy_s, host_ms, measure

ROOT = Path(__file__).resolve().parents[1]
FILES = {"json": "serving.json", "markdown": "serving.md", "plot": "serving.png"}


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    url: str  # host:port of HTTP
    model: str
    grpc_url: str | None  # host:port of gRPC (None from a server that does not say, such as Ray Serve's)


@contextmanager
def serve_process(artifact: Path, *args: str) -> Iterator[Launched]:
    """`python -m runtime.serve` on free ports, once it printed that it is ready (with the model loaded)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--model", str(artifact), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the banner comes once the server listens with the model loaded
        match = re.search(r"http://([^/]+)/v2/models/(\S+) ready", line)
        if not match:
            proc.kill()
            raise RuntimeError(f"the server did not start: {line.strip()} {proc.communicate()[1].strip()}")
        grpc = re.search(r"gRPC (\S+?),?$", line.strip())
        yield Launched(proc, match.group(1), match.group(2), grpc.group(1) if grpc else None)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@contextmanager
def launch(artifact: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """`serve_process` as (the process, its HTTP host:port, the model's name)."""
    with serve_process(artifact, *args) as server:
        yield server.proc, server.url, server.model


@dataclass
class Cell:
    inputs: str  # BYTES | FP32
    batching: bool
    concurrency: int
    requests: int  # answered 200
    refused: int  # 503
    errors: int  # anything else
    seconds: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    other_load_cores: float | None


class NeighbourLoad:
    """Cores that processes other than this benchmark and its server kept busy: the machine's busy time
    (/proc/stat) minus both of theirs."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def _ours_s(self) -> float:
        t = os.times()
        try:
            fields = Path(f"/proc/{self.server_pid}/stat").read_text().rsplit(")", 1)[1].split()
            server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            server = 0.0
        return t.user + t.system + server

    def start(self) -> None:
        self._busy, self._ours = _machine_busy_s(), self._ours_s()

    def stop(self, wall_s: float) -> float | None:
        busy = _machine_busy_s()
        if busy is None or self._busy is None or wall_s <= 0:
            return None
        return round(max(0.0, (busy - self._busy) - (self._ours_s() - self._ours)) / wall_s, 2)


def _client_module(protocol: str) -> Any:
    """Triton's asyncio client of a protocol ("http" or "grpc")."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as grpc_aio

        return grpc_aio
    import tritonclient.http.aio as http_aio

    return http_aio


def _inputs(kind: str, photo: bytes | np.ndarray, protocol: str = "http") -> list[Any]:
    aioclient = _client_module(protocol)
    if kind == "BYTES":
        x = aioclient.InferInput("images", [1], "BYTES")
        x.set_data_from_numpy(np.array([photo], dtype=np.object_))
    else:
        x = aioclient.InferInput("pixel_values", [1, *np.shape(photo)], "FP32")
        x.set_data_from_numpy(np.asarray(photo, dtype=np.float32)[None])
    return [x]


async def _drive(url: str, model: str, requests: list[list[Any]], concurrency: int, seconds: float | None,
                 total: int | None = None, protocol: str = "http", output: str = "topk_indices",
                 ) -> tuple[list[float], int, int, float, dict[int, int]]:
    """`concurrency` clients sending `requests` (built for `protocol`) in turn, for `seconds`, or until `total`
    requests were sent, asking for `output` (topk_indices, or logits: MLServer's peer has only those):
    (latencies of the answered in ms, 503/UNAVAILABLE count, other failures, wall seconds, top-1 per answered index)."""
    from tritonclient.utils import InferenceServerException

    aioclient = _client_module(protocol)
    client = (aioclient.InferenceServerClient(url) if protocol == "grpc"
              else aioclient.InferenceServerClient(url, conn_limit=concurrency))
    outputs = [aioclient.InferRequestedOutput(output)]
    latencies: list[float] = []
    counts = {"refused": 0, "errors": 0, "next": 0}
    top1: dict[int, int] = {}
    start = time.perf_counter()
    stop_at = start + (seconds or 0)

    async def worker() -> None:
        while (counts["next"] < total) if total is not None else (time.perf_counter() < stop_at):
            index = counts["next"]
            counts["next"] += 1
            t0 = time.perf_counter()
            try:
                result = await client.infer(model, requests[index % len(requests)], outputs=outputs)
            except InferenceServerException as err:
                counts["refused" if str(err.status()) in ("503", "StatusCode.UNAVAILABLE") else "errors"] += 1
                continue
            except Exception:  # a reset connection or a timeout: the overload check counts these as failures
                counts["errors"] += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            row = np.asarray(result.as_numpy(output))[0]
            top1[index] = int(row.argmax() if output == "logits" else row[0])

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return latencies, counts["refused"], counts["errors"], time.perf_counter() - start, top1


def measure_cell(url: str, model: str, kind: str, requests: list[list[Any]], batching: bool, concurrency: int,
                 seconds: float, server_pid: int) -> Cell:
    load = NeighbourLoad(server_pid)
    load.start()
    latencies, refused, errors, wall, _ = asyncio.run(_drive(url, model, requests, concurrency, seconds))
    p50, p90, p99 = (round(float(np.percentile(np.asarray(latencies or [np.nan]), q)), 2) for q in (50, 90, 99))
    return Cell(kind, batching, concurrency, len(latencies), refused, errors, round(wall, 2),
                round(len(latencies) / wall, 2), p50, p90, p99, load.stop(wall))


def offline(artifact: Path, backend_name: str, files: list[Path], batch: int, threads: int | None) -> dict[str, Any]:
    """runtime.infer's pipeline over the photos (warm backend) and the backend's batch-1 latency."""
    with create(backend_name, artifact, max_batch=batch, threads=threads) as backend:
        predictor = Predictor(backend, 5)
        opts = ClassifyOptions(batch_size=batch)
        classify(files[: 2 * batch], predictor, opts)  # warm-up
        records: list[Prediction] = []
        summary = classify(files, predictor, opts, records.append)
        x = load_and_preprocess(files[0], predictor.spec)[None]
        batch1 = measure(lambda: host_ms(lambda: backend.run(x)), 1, warmup=3, min_iters=20, min_time_s=2.0)
        return {"backend": backend.name, "precision": backend.precision, "images": summary.images,
                "images_per_s": round(summary.images_per_s, 2), "batch1_ms": batch1.median_ms,
                "batch1_other_load_cores": batch1.other_load_cores, "synthetic": backend.meta.synthetic,
                "top1": [r.top[0][0] if r.top else None for r in records], "spec": predictor.spec}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    artifact, model_file = find_model(args.model, "artifacts")
    if model_file is not None:
        raise UsageError(f"--model {args.model}: give the artifact folder")
    files = list_images([args.images])
    if not files:
        raise UsageError(f"--images {args.images}: no images found")
    base = offline(artifact, args.backend, files, args.max_batch_size, args.threads)
    spec = base.pop("spec")
    photos = [f.read_bytes() for f in files]
    pixels = [load_and_preprocess(f, spec) for f in files]
    requests = {"BYTES": [_inputs("BYTES", p) for p in photos], "FP32": [_inputs("FP32", p) for p in pixels]}
    server_args = ["--backend", args.backend, "--max-batch-size", str(args.max_batch_size),
                   "--max-queue-delay-ms", str(args.max_queue_delay_ms), *(["--threads", str(args.threads)] if args.threads else [])]
    cells: list[Cell] = []
    agreement: dict[str, Any] = {}
    for batching in (True, False):
        with launch(artifact, *server_args, *([] if batching else ["--no-batching"])) as (proc, url, model):
            asyncio.run(_drive(url, model, requests["BYTES"], 4, None, total=4 * args.max_batch_size))  # warm-up
            for kind in ("BYTES", "FP32"):
                for c in args.concurrency:
                    cells.append(measure_cell(url, model, kind, requests[kind], batching, c, args.seconds, proc.pid))
                    print(f"serve-bench: {cells[-1]}", file=sys.stderr)
            if batching:
                agreement = _agreement(url, model, requests["BYTES"], base["top1"], files)
    overload = _overload(artifact, server_args, requests["BYTES"], photos[0], args.overload)
    env = environment(args.threads)
    for dist in ("uvicorn", "starlette", "tritonclient", "aiohttp"):
        env["versions"][dist] = importlib.metadata.version(dist)
    base.pop("top1")
    return {"date": time.strftime("%Y-%m-%d"), "artifact": str(artifact), "model": artifact.name, "photos": len(files),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env, "offline": base, "cells": [asdict(c) for c in cells], "overload": overload,
            "agreement": agreement}


def _agreement(url: str, model: str, requests: list[list[Any]], expected: list[int | None], files: list[Path]) -> dict[str, Any]:
    _, refused, errors, _, top1 = asyncio.run(_drive(url, model, requests, 16, None, total=len(requests)))
    differ = [files[i].name for i, e in enumerate(expected) if top1.get(i) != e]
    return {"photos": len(requests), "answered": len(top1), "refused": refused, "errors": errors,
            "same_top1": len(requests) - len(differ), "differ": differ}


def _overload(artifact: Path, server_args: list[str], requests: list[list[Any]], photo: bytes, clients: int) -> dict[str, Any]:
    import tritonclient.http as httpclient

    with launch(artifact, *server_args) as (proc, url, model):
        rss_before = _vm_rss_kib(proc.pid)
        latencies, refused, errors, wall, _ = asyncio.run(_drive(url, model, requests, clients, None, total=3 * clients))
        peak = _vm_hwm_kib(Path(f"/proc/{proc.pid}/status"))
        client = httpclient.InferenceServerClient(url)
        x = httpclient.InferInput("images", [1], "BYTES")
        x.set_data_from_numpy(np.array([photo], dtype=np.object_))
        ready = client.is_server_ready() and np.asarray(client.infer(model, [x]).as_numpy("topk_indices")).shape[0] == 1
        alive = proc.poll() is None
    return {"clients": clients, "requests": clients * 3, "ok": len(latencies), "refused_503": refused, "errors": errors,
            "seconds": round(wall, 2), "rss_before_mib": round(rss_before / 1024, 1), "peak_rss_mib": round(peak / 1024, 1),
            "alive_and_ready_after": bool(alive and ready),
            "p50_ms_of_200s": round(float(np.median(latencies)), 1) if latencies else None}


def _vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def markdown(r: dict[str, Any]) -> str:
    env, base, settings = r["environment"], r["offline"], r["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items()))
    lines = [
        f"# Serving: `runtime.serve` under load, {r['model']} (measured)", "",
        f"- **Date:** {r['date']}.",
        f"- **Hardware:** `lscpu` model name \"{env['cpu']}\", {env['cpu_cores_usable']} usable cores; the load generator "
        "runs on the same cores as the server.",
        f"- **Versions:** Python {env['python']}, {versions}.",
        f"- **Model:** `{r['artifact']}` on {base['backend']} ({base['precision']})"
        + (", SYNTHETIC weights (latency and agreement only)." if base["synthetic"] else "."),
        f"- **Command:** `python -m benchmarks.serve --model {r['artifact']} --images {settings['images']} "
        f"--concurrency {','.join(map(str, settings['concurrency']))} --seconds {settings['seconds']:g} "
        f"--max-batch-size {settings['max_batch_size']} --max-queue-delay-ms {settings['max_queue_delay_ms']:g} "
        f"--overload {settings['overload']}`.",
        "",
        f"Offline, `runtime.infer`'s pipeline on the same backend and {r['photos']} photos (batches of "
        f"{settings['max_batch_size']}): **{base['images_per_s']} images/s**; the backend's batch-1 latency on FP32: "
        f"**{base['batch1_ms']:.1f} ms** (median).", "",
        "One image per request, Triton's asyncio HTTP client, binary tensors; images/s counts answered requests.", "",
        "| input | batching | concurrency | images/s | % of offline | p50 ms | p90 ms | p99 ms | 503 | other load (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in r["cells"]:
        share = 100 * c["images_per_s"] / base["images_per_s"] if base["images_per_s"] else 0
        lines.append(f"| {c['inputs']} | {'on' if c['batching'] else 'off'} | {c['concurrency']} | {c['images_per_s']} | "
                     f"{share:.0f}% | {c['p50_ms']} | {c['p90_ms']} | {c['p99_ms']} | {c['refused']} | "
                     f"{c['other_load_cores'] if c['other_load_cores'] is not None else '?'} |")
    o, a = r["overload"], r["agreement"]
    lines += [
        "", f"**Overload:** {o['clients']} clients at once, {o['requests']} requests: {o['ok']} answered 200, "
        f"{o['refused_503']} refused with 503, {o['errors']} other failures, in {o['seconds']} s; server RSS "
        f"{o['rss_before_mib']} MiB before, peak {o['peak_rss_mib']} MiB; ready and answering afterwards: "
        f"{'yes' if o['alive_and_ready_after'] else 'NO'}.",
        "", f"**Agreement:** {a['same_top1']} of {a['photos']} photos sent through `tritonclient.http` as BYTES got the "
        f"top-1 `runtime.infer` gives" + (f" (differ: {', '.join(a['differ'][:10])})" if a["differ"] else "") + ".",
        "", "![images/s and p50 latency per concurrency](serving.png)", "",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[dict[str, Any]]] = {}
    for c in r["cells"]:
        series.setdefault(f"{c['inputs']}, batching {'on' if c['batching'] else 'off'}", []).append(c)
    for label, cells in series.items():
        xs = [c["concurrency"] for c in cells]
        left.plot(xs, [c["images_per_s"] for c in cells], marker="o", label=label)
        right.plot(xs, [c["p50_ms"] for c in cells], marker="o", label=label)
    left.axhline(r["offline"]["images_per_s"], color="grey", linestyle="--", label="runtime.infer offline")
    for ax, title in ((left, "images/s"), (right, "p50 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"runtime.serve, {r['model']} on {r['offline']['backend']}, {r['environment']['cpu']}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def add_server_arguments(p: ArgumentParser, backend_help: str) -> None:
    """The flags that say what the served model is and where the photos are (this benchmark and benchmarks.serve_ray)."""
    p.add_argument("--model", help="artifact folder (default: the newest under artifacts/)")
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "imagenet-sample", help="folder of photos")
    p.add_argument("--backend", default="ort-cpu", help=f"{backend_help} (default ort-cpu)")
    p.add_argument("--threads", type=int, help="backend threads (default: one per core)")


def build_parser() -> ArgumentParser:
    p = doc_parser("python -m benchmarks.serve", __doc__)
    add_server_arguments(p, "the backend of the server and of the offline run")
    p.add_argument("--concurrency", type=_ints, help="concurrent clients per cell (default 1,4,16,64; with --peer 1,16)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each cell (default 10)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the server's and the offline batch (default 8)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="the server's queue delay (default 5)")
    p.add_argument("--overload", type=int, default=640, help="clients at once in the overload check (default 640)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where serving.{json,md,png} go")
    p.add_argument("--peer", choices=["mlserver"], help="instead: this server over gRPC and binary HTTP against MLServer "
                   "over gRPC on the same ONNX file, FP32 inputs, interleaved rounds (serving-peer.{json,md})")
    p.add_argument("--mlserver-venv", type=Path, default=DEFAULT_VENV,
                   help="with --peer mlserver: MLServer's own virtual environment (default .venv-mlserver in the checkout)")
    p.add_argument("--rounds", type=int, default=3, help="with --peer: interleaved rounds, the median is shown (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.max_batch_size < 1 or args.overload < 1 or args.rounds < 1:
        p.error("--seconds, --max-batch-size, --overload and --rounds must be positive")
    args.concurrency = args.concurrency or ([1, 16] if args.peer else [1, 4, 16, 64])
    if not args.images.is_dir():
        p.error(f"--images {args.images}: no such folder")

    def peer() -> int:
        results = run_peer(args)
        if results is not None:
            print(write_peer_report(results, args.out).read_text())
        return 0

    def work() -> int:
        results = run_benchmark(args)
        paths = write_report(results, args.out, FILES, markdown, plot)
        print(paths["markdown"].read_text())
        if results["offline"]["synthetic"]:
            print(SYNTHETIC_WARNING, file=sys.stderr)
        return 0

    return run_cli("serve-bench", peer if args.peer else work, entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
