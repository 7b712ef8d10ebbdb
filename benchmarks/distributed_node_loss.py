"""A node lost mid-job, on a real two-node cluster: how much longer than the surviving node alone.

    python -m benchmarks.distributed_node_loss artifacts/<model> ../shared/imagenet-sample --kill-after 2

Starts the cluster recipe of docs/distributed.md on this machine (a token, `ray start --head`, a second
node joining it with `ray start --address`, both on loopback, `--num-cpus` each), runs
`python -m runtime.distributed INPUT --address <head>:<port>`, and SIGKILLs the second node's raylet
once `--kill-after` parts are committed (a crash, as the head sees it). Then, on the head alone, it
times the same command over as many inputs as were left at the kill. The figure is the ratio of the
two: the time the job took after the kill over the time the head needs for the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from runtime.errors import ArgumentParser, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayStartCluster:
    """The recipe of docs/distributed.md on this machine: a token, `ray start --head`, and a second node
    joining it with `ray start --address`, each `--block`ed so that it is our child; every process they
    start carries a marker in its environment, and `stop` kills those by pid (never a `ray stop`, which
    would stop every Ray on the machine). `HOME` is a folder of its own, so the token is not the user's."""

    def __init__(self, tmp: Path, cpus: int = 2) -> None:
        self.marker, self.cpus = uuid.uuid4().hex, cpus
        home = tmp / "home"
        home.mkdir()
        self.temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # Ray's socket paths must stay short
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(HOME=str(home), DEIT_TEST_CLUSTER=self.marker, PYTHONPATH=str(ROOT))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.ray = str(Path(sys.executable).with_name("ray"))

    def start(self) -> None:
        subprocess.run([self.ray, "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True,
                       timeout=60)  # docs: step 1

        def common() -> list[str]:  # two nodes on one machine: each its own agent ports
            return ["--block", "--num-cpus", str(self.cpus), "--node-ip-address", "127.0.0.1",
                    "--disable-usage-stats", "--object-store-memory", str(256 * 2**20),
                    "--dashboard-agent-listen-port", str(_free_port()), "--metrics-export-port", str(_free_port())]

        self._node(["--head", "--port", str(self.port), "--temp-dir", str(self.temp), "--include-dashboard", "false",
                    "--ray-client-server-port", str(_free_port()), *common()], {})
        self.wait_for_nodes(1)
        self._node([f"--address={self.address}", *common()], {"RAY_AUTH_MODE": "token"})  # docs: step 2
        self.wait_for_nodes(2)

    def _node(self, args: list[str], env: dict[str, str]) -> None:
        log = open(self.temp / f"node{len(self.nodes)}.log", "wb")  # noqa: SIM115 (the child holds it)
        self.nodes.append(subprocess.Popen([self.ray, "start", *args], env={**self.env, **env}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def wait_for_nodes(self, n: int, deadline_s: float = 120) -> None:
        """Until `ray status` counts `n` active nodes (a sign of readiness, bounded)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.nodes[:n]):  # the first n: the one after may be killed
                logs = "\n".join((self.temp / f"node{i}.log").read_text()[-2000:] for i in range(len(self.nodes)))
                raise RuntimeError(f"a `ray start` ended:\n{logs}")
            done = subprocess.run([self.ray, "status", "--address", self.address],
                                  env={**self.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=60)
            active = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if done.returncode == 0 and active.count("node_") == n:
                return
        raise RuntimeError(f"{n} nodes did not join within {deadline_s} s")

    def pids(self) -> list[int]:
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if self.marker.encode() in Path(f"/proc/{entry.name}/environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def raylet_of(self, node: int) -> int:
        """The pid of node `node`'s raylet (a child of its `ray start`)."""
        for pid in self.pids():
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except (OSError, ValueError, IndexError):
                continue
            if parent == self.nodes[node].pid and cmd.endswith(b"/raylet"):
                return pid
        raise RuntimeError(f"no raylet for node {node}")

    def stop(self) -> None:
        for p in self.nodes:
            if p.poll() is None:
                p.terminate()  # `ray start --block` stops what it started
        for p in self.nodes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for pid in self.pids():  # whatever outlived them (workers of a killed raylet)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


def run_job(cluster: RayStartCluster, inp: str, out: Path, args: Any, kill_after: int | None = None,
            timeout_s: float = 1800) -> dict[str, Any]:
    """The job's command, timed; with `kill_after`, node 1's raylet is SIGKILLed once that many parts are committed."""
    cmd = [sys.executable, "-m", "runtime.distributed", inp, "--output", str(out), "--model", args.model,
           "--backend", args.backend, "--no-progress", "--rows-per-file", str(args.rows_per_file),
           "--address", cluster.address]
    t0 = time.monotonic()
    job = subprocess.Popen(cmd, env=cluster.env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    found: dict[str, Any] = {"parts": 0, "log": []}

    def read() -> None:
        assert job.stderr is not None
        for line in job.stderr:
            found["log"].append(line)
            if line.startswith("distributed: committed "):
                found["parts"] += 1
                found.setdefault("first_part_s", time.monotonic() - t0)
                if kill_after and found["parts"] == kill_after:
                    found["rows_at_kill"] = int(line.split("(")[1].split()[0])
                    os.kill(cluster.raylet_of(1), signal.SIGKILL)
                    found["kill_s"] = time.monotonic() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        status = job.wait(timeout=timeout_s)
    finally:
        if job.poll() is None:
            job.kill()
    reader.join(timeout=30)
    found.update(status=status, seconds=time.monotonic() - t0)
    return found


def count_rows(out: Path) -> tuple[int, int]:
    import pyarrow.parquet as pq

    table = pq.read_table(out, columns=["path"])
    return table.num_rows, len(set(table["path"].to_pylist()))


def measure(args: Any) -> dict[str, Any]:
    from runtime.inputs import list_images

    with tempfile.TemporaryDirectory(prefix="node-loss-") as tmp:
        files = [str(f) for f in list_images([Path(args.input)], recursive=True)]
        originals = list(files)
        for copy in range(1, args.copies):  # more work after the kill, under distinct paths (hard links)
            folder = Path(tmp) / f"copy{copy}"
            folder.mkdir()
            for i, f in enumerate(originals):
                linked = folder / f"{i:06d}{Path(f).suffix}"
                os.link(f, linked)
                files.append(str(linked))
        cluster = RayStartCluster(Path(tmp), cpus=args.cpus)
        try:
            cluster.start()
            listing = Path(tmp) / "inputs.txt"
            listing.write_text("".join(f"{f}\n" for f in files))
            lost = run_job(cluster, str(listing), Path(tmp) / "lost", args, kill_after=args.kill_after)
            if lost["status"] != 0 or "kill_s" not in lost:
                raise RuntimeError("the job with a lost node failed:\n" + "".join(lost["log"][-30:]))
            rows, unique = count_rows(Path(tmp) / "lost")
            rest = len(files) - lost["rows_at_kill"]
            cluster.wait_for_nodes(1)  # the head alone, as the GCS sees it
            rest_list = Path(tmp) / "rest.txt"
            rest_list.write_text("".join(f"{f}\n" for f in files[:rest]))
            alone = run_job(cluster, str(rest_list), Path(tmp) / "alone", args)
        finally:
            cluster.stop()
    after = lost["seconds"] - lost["kill_s"]
    return {"inputs": len(files), "rows": rows, "unique_rows": unique, "exit": lost["status"],
            "rows_at_kill": lost["rows_at_kill"], "kill_s": round(lost["kill_s"], 1),
            "job_s": round(lost["seconds"], 1), "after_kill_s": round(after, 1),
            "head_alone_rest_s": round(alone["seconds"], 1), "ratio": round(after / alone["seconds"], 2),
            "lost_node_said": any("lost node" in line for line in lost["log"])}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.distributed_node_loss", description=(__doc__ or "").split("\n")[0])
    p.add_argument("model", help="artifact folder or model file")
    p.add_argument("input", help="a folder of images")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--cpus", type=int, default=2, help="CPUs each node tells Ray (default 2)")
    p.add_argument("--rows-per-file", type=int, default=50)
    p.add_argument("--kill-after", type=int, default=2, help="parts committed before the kill (default 2)")
    p.add_argument("--copies", type=int, default=1, help="run INPUT's images this many times (hard links)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def report(args: Any) -> int:
    r = measure(args)
    print(f"{r['inputs']} inputs, {r['rows']} rows ({r['unique_rows']} distinct), exit {r['exit']}; raylet killed at "
          f"{r['kill_s']} s with {r['rows_at_kill']} rows committed; job {r['job_s']} s, {r['after_kill_s']} s after "
          f"the kill; the head alone for the {r['inputs'] - r['rows_at_kill']} left: {r['head_alone_rest_s']} s; "
          f"ratio {r['ratio']}; lost node said: {r['lost_node_said']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("distributed_node_loss", lambda: report(args), entry=argv is None)


if __name__ == "__main__":
    sys.exit(main())
