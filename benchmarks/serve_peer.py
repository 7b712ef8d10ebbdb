"""`python -m benchmarks.serve --peer mlserver`: runtime.serve beside MLServer, the same ONNX file, interleaved.

    make install-mlserver        # MLServer 1.7.1 in .venv-mlserver, with the lock's onnxruntime and uvloop<0.22
    python -m benchmarks.serve --peer mlserver --model artifacts/deit-small-distilled-patch16-224 --out docs/results

MLServer lives in its own virtual environment (--mlserver-venv, default .venv-mlserver beside the checkout):
it pins its own FastAPI, uvicorn and protobuf, so it is not in this project's lock. uvloop 0.22 and later
stop MLServer 1.7.1's inference workers at start ("There is no current event loop", SeldonIO/MLServer
issue 2286), hence the pin. Without MLServer the run says so in one line and skips. MLServer serves the file runtime.serve's ort-cpu backend runs, through a
custom runtime (benchmarks/mlserver_runtime.py) with the same session options and threads, and adaptive
batching of --max-batch-size within --max-queue-delay-ms, as runtime.serve batches.

Both servers run at once (idle but for the cell being measured). Each round measures, at every
concurrency, runtime.serve over gRPC, runtime.serve over binary HTTP and MLServer over gRPC, one after
the other for --seconds each, so that a neighbour's burst on a shared machine falls on all three rather
than on one; the table gives the median of the rounds. Every request is one preprocessed photo, FP32
`pixel_values` [1,3,H,W], asking for `logits`, sent by Triton's own asyncio clients.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import environment
from runtime.artifact import find_model
from runtime.backends import create
from runtime.errors import UsageError
from runtime.predictor import Predictor
from runtime.decode import load_and_preprocess
from runtime.inputs import list_images

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-mlserver"
FILES = {"json": "serving-peer.json", "markdown": "serving-peer.md"}
TARGETS = ("runtime.serve gRPC", "runtime.serve HTTP binary", "MLServer gRPC")
START_DEADLINE_S = 180.0  # MLServer's start-up (it spawns its inference worker) on a busy 2-core machine


def mlserver_missing(venv: Path) -> str | None:
    """Why MLServer cannot run from `venv` (one line, with the command that installs it), or None."""
    if not (venv / "bin" / "mlserver").is_file():
        return f"MLServer not found in {venv}: make install-mlserver MLSERVER_VENV={venv}"
    return None


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_ready(url: str, proc: subprocess.Popen[str], what: str) -> None:
    """Poll the gRPC readiness of a starting server, until START_DEADLINE_S."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    end = time.monotonic() + START_DEADLINE_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if client.is_server_ready(client_timeout=2):
                return
        except Exception:  # not listening yet
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"{what} was not ready within {START_DEADLINE_S:g} s")
        time.sleep(0.2)


@contextmanager
def mlserver(venv: Path, model_file: Path, name: str, threads: int, max_batch: int, delay_s: float,
             log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """MLServer serving `model_file` as `name` through the custom runtime; yields it and its gRPC host:port."""
    http_port, grpc_port, metrics_port = _free_ports(3)
    with tempfile.TemporaryDirectory(prefix="mlserver-peer-") as tmp:
        folder = Path(tmp)
        shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), folder / "mlserver_runtime.py")
        (folder / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
            "debug": False}))
        (folder / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_runtime.DeitOnnxRuntime",
            "max_batch_size": max_batch, "max_batch_time": delay_s,
            "parameters": {"extra": {"model_file": str(model_file.resolve()), "threads": threads}}}))
        with log.open("w") as out:
            proc = subprocess.Popen([str(venv / "bin" / "mlserver"), "start", str(folder)], stdout=out,
                                    stderr=subprocess.STDOUT, text=True, cwd=folder)
            try:
                url = f"127.0.0.1:{grpc_port}"
                _wait_ready(url, proc, f"MLServer (log: {log})")
                yield proc, url
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process and its living descendants have used: MLServer's inference worker
    is a child process. Divided by the images answered, a cost per image that a neighbour's load moves far less
    than it moves images/s."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                    for c in (task / "children").read_text().split()]
    except (OSError, IndexError, ValueError):
        return 0.0
    return total + sum(tree_cpu_s(c) for c in children)


def _mlserver_versions(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
            "('mlserver', 'onnxruntime', 'grpcio', 'protobuf', 'fastapi', 'uvicorn')}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return dict(json.loads(out.stdout))


def run_peer(args: argparse.Namespace) -> dict[str, Any] | None:
    """The interleaved comparison; None (after one line on stderr) when MLServer is not installed."""
    from benchmarks.serve import _drive, _inputs, serve_process

    venv: Path = args.mlserver_venv
    missing = mlserver_missing(venv)
    if missing:
        print(f"serve-bench: --peer mlserver skipped: {missing}", file=sys.stderr)
        return None
    if args.backend != "ort-cpu":
        raise UsageError(f"--peer mlserver compares ONNX Runtime on the CPU: --backend ort-cpu, not {args.backend}")
    artifact, model_file = find_model(args.model, "artifacts")
    if model_file is not None:
        raise UsageError(f"--model {args.model}: give the artifact folder")
    files = list_images([args.images])[:64]
    if not files:
        raise UsageError(f"--images {args.images}: no images found")
    with create(args.backend, artifact, max_batch=args.max_batch_size, threads=args.threads) as backend:
        onnx_file, threads, synthetic = backend.model_file, int(backend.threads or 1), backend.meta.synthetic
        spec = Predictor(backend, 5).spec
    pixels = [load_and_preprocess(f, spec) for f in files]
    requests = {p: [_inputs("FP32", x, p) for x in pixels] for p in ("grpc", "http")}
    server_args = ["--backend", args.backend, "--threads", str(threads), "--max-batch-size", str(args.max_batch_size),
                   "--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    log = Path(tempfile.gettempdir()) / f"mlserver-peer-{os.getpid()}.log"  # MLServer's own output, named if it fails
    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with serve_process(artifact, *server_args) as ours, \
            mlserver(venv, onnx_file, ours.model, threads, args.max_batch_size, args.max_queue_delay_ms / 1000, log) as (peer_proc, theirs):
        assert ours.grpc_url is not None, "runtime.serve's ready line names no gRPC address"
        where = {TARGETS[0]: (ours.grpc_url, "grpc"), TARGETS[1]: (ours.url, "http"), TARGETS[2]: (theirs, "grpc")}
        pids = {TARGETS[0]: ours.proc.pid, TARGETS[1]: ours.proc.pid, TARGETS[2]: peer_proc.pid}
        for target, (url, protocol) in where.items():  # warm-up, and every server answers
            _, refused, errors, _, _ = asyncio.run(_drive(url, ours.model, requests[protocol], 4, None, total=16,
                                                          protocol=protocol, output="logits"))
            if refused or errors:
                raise RuntimeError(f"{target} failed {refused + errors} of 16 warm-up requests")
        for round_ in range(args.rounds):
            for c in args.concurrency:
                order = TARGETS[round_ % 3:] + TARGETS[: round_ % 3]  # each target first, second and last in turn
                for target in order:
                    url, protocol = where[target]
                    cpu = tree_cpu_s(pids[target])
                    lat, refused, errors, wall, _ = asyncio.run(_drive(url, ours.model, requests[protocol], c, args.seconds,
                                                                       protocol=protocol, output="logits"))
                    cpu = tree_cpu_s(pids[target]) - cpu
                    cell = {"round": round_, "images_per_s": round(len(lat) / wall, 2),
                            "server_cpu_ms_per_image": round(1000 * cpu / len(lat), 1) if lat else None,
                            "p50_ms": round(float(np.median(lat)), 2) if lat else None, "requests": len(lat),
                            "refused": refused, "errors": errors, "load_1min": round(os.getloadavg()[0], 2)}
                    samples.setdefault((target, c), []).append(cell)
                    print(f"serve-bench: peer {target} c={c} round {round_ + 1}: {cell}", file=sys.stderr)
    rows = [row(target, c, samples) for c in args.concurrency for target in TARGETS]
    env = environment(threads)
    for dist in ("uvicorn", "starlette", "tritonclient", "grpcio", "protobuf"):
        env["versions"][dist] = importlib.metadata.version(dist)
    return {"date": time.strftime("%Y-%m-%d"), "artifact": str(artifact), "model": artifact.name, "onnx_file": onnx_file.name,
            "synthetic": synthetic, "threads": threads, "photos": len(files),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": env, "mlserver": _mlserver_versions(venv), "rows": rows}


def row(target: str, c: int, samples: dict[tuple[str, int], list[dict[str, Any]]]) -> dict[str, Any]:
    """One target at one concurrency: medians over the rounds, and against MLServer the median of the per-round
    ratios (each round's cells ran back to back, so a neighbour's load shifts both sides of a ratio alike)."""
    cells, peer = samples[(target, c)], samples[(TARGETS[2], c)]

    def ratio(key: str) -> float | None:
        pairs = [a[key] / b[key] for a, b in zip(cells, peer) if a[key] and b[key]]
        return round(float(np.median(pairs)), 3) if pairs else None

    p50s = [x["p50_ms"] for x in cells if x["p50_ms"] is not None]
    cpu = [x["server_cpu_ms_per_image"] for x in cells if x.get("server_cpu_ms_per_image")]
    out = {"target": target, "concurrency": c, "images_per_s": round(float(np.median([x["images_per_s"] for x in cells])), 2),
           "p50_ms": round(float(np.median(p50s)), 2) if p50s else None,
           "server_cpu_ms_per_image": round(float(np.median(cpu)), 1) if cpu else None,
           "failed": sum(x["errors"] + x["refused"] for x in cells), "rounds": cells}
    if target != TARGETS[2]:
        out["throughput_ratio"], out["p50_ratio"] = ratio("images_per_s"), ratio("p50_ms")
        out["at_least_as_fast"] = bool(out["throughput_ratio"] and out["p50_ratio"]
                                       and out["throughput_ratio"] >= 1 and out["p50_ratio"] <= 1)
        out["rounds_faster"] = sum(1 for a, b in zip(cells, peer) if a["images_per_s"] >= b["images_per_s"]
                                   and a["p50_ms"] is not None and b["p50_ms"] is not None and a["p50_ms"] <= b["p50_ms"])
    return out


def markdown(r: dict[str, Any]) -> str:
    env, s, ml = r["environment"], r["settings"], r["mlserver"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items()))
    ml_versions = ", ".join(f"{k} {v}" for k, v in sorted(ml.items()))
    ours = [x for x in r["rows"] if x["target"] != TARGETS[2]]
    slower = [f"{x['target']} at concurrency {x['concurrency']}" for x in ours if not x["at_least_as_fast"]]
    lines = [
        f"# Serving beside MLServer: {r['model']} on ONNX Runtime (measured)", "",
        f"- **Date:** {r['date']}.",
        f"- **Hardware:** `lscpu` model name \"{env['cpu']}\", {env['cpu_cores_usable']} usable cores, shared with other "
        f"work during the run (1-minute load average per cell in serving-peer.json); both servers and the load generator "
        "run on the same cores.",
        f"- **Versions:** runtime.serve: Python {env['python']}, {versions}. MLServer (its own virtual environment): "
        f"{ml_versions}.",
        f"- **Model:** `{r['artifact']}/{r['onnx_file']}` on ONNX Runtime's CPU provider, {r['threads']} intra-op threads "
        "in both servers" + (", SYNTHETIC weights (speed only)." if r["synthetic"] else "."),
        f"- **Batching:** runtime.serve dynamic batching, MLServer adaptive batching: at most {s['max_batch_size']} images "
        f"within {s['max_queue_delay_ms']:g} ms. MLServer with its default settings otherwise (one parallel inference worker).",
        f"- **Command:** `python -m benchmarks.serve --peer mlserver --model {r['artifact']} --images {s['images']} "
        f"--concurrency {','.join(map(str, s['concurrency']))} --seconds {s['seconds']:g} --rounds {s['rounds']} "
        f"--max-batch-size {s['max_batch_size']} --max-queue-delay-ms {s['max_queue_delay_ms']:g} --out {s['out']}`.",
        "",
        f"One preprocessed photo per request (FP32 `pixel_values` [1,3,H,W], `logits` back), Triton's asyncio clients "
        f"(`tritonclient.grpc.aio`, `tritonclient.http.aio` with binary tensors); {s['rounds']} interleaved rounds of "
        f"{s['seconds']:g} s per cell, the three targets of a concurrency back to back in a rotating order. images/s "
        "and p50: medians over the rounds; against MLServer: the median of the per-round ratios (a neighbour's load "
        "shifts both sides of a ratio alike). images/s counts answered requests. Server CPU ms per image: the CPU time "
        "the server's processes used during a cell (MLServer's with its inference worker) over the images answered, "
        "median of the rounds: what an image costs, which other work on the machine moves far less than images/s.", "",
        "| concurrency | server, protocol | images/s | p50 ms | images/s / MLServer's | p50 / MLServer's | rounds as fast or faster (both) | server CPU ms per image | failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in r["rows"]:
        ratios = " | ".join("1" if x["target"] == TARGETS[2] else "-" if x[k] is None else f"{x[k]:.2f}"
                            for k in ("throughput_ratio", "p50_ratio"))
        won = f"{x['rounds_faster']} of {len(x['rounds'])}" if x["target"] != TARGETS[2] else "-"
        lines.append(f"| {x['concurrency']} | {x['target']} | {x['images_per_s']} | {x['p50_ms']} | {ratios} | {won} | "
                     f"{x['server_cpu_ms_per_image']} | {x['failed']} |")
    lines += ["", "**runtime.serve at least as fast as MLServer over gRPC (images/s ratio at least 1, p50 ratio at most 1) "
              f"at every concurrency, over gRPC and over binary HTTP: {'yes' if not slower else 'NO'}**"
              + (f" (slower: {', '.join(slower)})" if slower else "") + ".", ""]
    return "\n".join(lines)


def write_peer_report(r: dict[str, Any], out: Path) -> Path:
    from runtime.artifact import atomic_path, write_json

    write_json(out / FILES["json"], r)
    with atomic_path(out / FILES["markdown"]) as tmp:
        tmp.write_text(markdown(r))
    return out / FILES["markdown"]

