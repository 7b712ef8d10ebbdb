"""`python -m runtime.serve` against slow and hostile clients: stalled uploads, idle and trickling connections,
oversized headers, the open-file limit, and signals while a client holds a half-sent body. Every wait is for
a sign (an answer, a closed connection, a statistic, the process's exit), never a fixed sleep; a deadline
that must pass is set short by its flag, and no test asserts how long anything took."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_serve import NAME, httpclient, images_input, pixels_input, queue_now, read_raw_answer, receiving, serving, wait_for

STALLED_DECLARED = 60 << 20


def stall(url: str) -> socket.socket:
    """An upload that declares a large body, sends 1 KiB of it and then nothing."""
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {STALLED_DECLARED}\r\n\r\n".encode() + b"{" + b" " * 1023)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Blocks until the server closes the connection (or answers and closes it): True once it did."""
    while sock.recv(65536):
        pass
    return True


def test_stalled_uploads_hold_no_queue_slot_and_get_408(tiny_artifact: Path) -> None:
    """More stalled uploads than --max-queue-size: normal requests are answered meanwhile; each stalled one gets
    408 once --body-timeout passes, its connection is closed, and the statistics count it."""
    with serving(tiny_artifact, "--max-queue-size", "2", "--body-timeout", "2") as (_, url):
        client = httpclient.InferenceServerClient(url, network_timeout=120)
        stalled = [stall(url) for _ in range(4)]
        wait_for(lambda: receiving(client) == 4, "the server receives the four stalled uploads")
        pixels = np.zeros((1, 3, 32, 32), np.float32)
        assert client.infer(NAME, [pixels_input(pixels)]).as_numpy("logits").shape == (1, 10)
        for sock in stalled:
            status, payload = read_raw_answer(sock)  # returns once the server answered and closed the connection
            assert status.split()[1] == b"408" and b"--body-timeout" in payload, (status, payload)
        stats = client.get_inference_statistics(NAME)["model_stats"][0]
        assert stats["rejected"]["408"] == 4 and stats["rejected_by_reason"]["body_timeout"] == 4
        assert queue_now(client)["receiving"] == 0 and stats["inference_stats"]["fail"]["count"] == 4


def test_idle_and_trickling_connections_are_closed(tiny_artifact: Path) -> None:
    """A connection that never sends a request, one whose headers trickle in, and an idle keep-alive connection
    after its answer are all closed by the server (here after --header-timeout 1)."""
    with serving(tiny_artifact, "--header-timeout", "1") as (_, url):
        host, port = url.rsplit(":", 1)
        idle = socket.create_connection((host, int(port)), timeout=120)
        trickling = socket.create_connection((host, int(port)), timeout=120)
        trickling.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        kept = socket.create_connection((host, int(port)), timeout=120)
        kept.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        assert closed_by_server(idle) and closed_by_server(trickling) and closed_by_server(kept)
        assert httpclient.InferenceServerClient(url).is_server_ready()


def test_oversized_headers_get_431_in_the_protocols_form(tiny_artifact: Path) -> None:
    with serving(tiny_artifact) as (_, url):
        host, port = url.rsplit(":", 1)
        many = "".join(f"X-{i}: {i}\r\n" for i in range(10_000))
        for headers in (many, f"X-Big: {'a' * (64 << 20)}\r\n"):
            with socket.create_connection((host, int(port)), timeout=120) as sock:
                try:
                    sock.sendall(f"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
                except (BrokenPipeError, ConnectionResetError):  # refused before the client finished sending
                    pass
                status, payload = read_raw_answer(sock)
            assert status.split()[1] == b"431" and b'"error"' in payload, (status, payload[:200])
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_ready()
        assert client.get_inference_statistics(NAME)["model_stats"][0]["rejected"]["431"] == 2


def test_at_the_open_file_limit_new_connections_are_refused_at_once(tiny_artifact: Path) -> None:
    """Under a hard limit of 256 open files, idle connections fill what the server allows; the next request gets
    503 saying so (not a timeout), and once the idle ones go, requests are served again."""
    proc = subprocess.Popen(["prlimit", "--nofile=256:256", sys.executable, "-m", "runtime.serve", "--model",
                             str(tiny_artifact), "--port", "0", "--backend", "ort-cpu", "--threads", "1",
                             "--header-timeout", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        match = re.search(r"http://([^/]+)/v2/models/", proc.stdout.readline())
        assert match, proc.communicate()[1]
        url = match.group(1)
        host, port = url.rsplit(":", 1)
        for _ in range(250):
            held.append(socket.create_connection((host, int(port)), timeout=120))
        status, payload = read_raw_answer(held.pop())  # past the limit: answered at once, without a request
        assert status.split()[1] == b"503" and b"open-file limit" in payload, (status, payload)
        assert not ready(url)  # refused (503, or the connection closed under the request), not left waiting
        for sock in held:
            sock.close()
        held.clear()
        wait_for(lambda: ready(url), "the server serves again once the idle connections are gone")
        pixels = np.zeros((1, 3, 32, 32), np.float32)
        assert httpclient.InferenceServerClient(url).infer(NAME, [pixels_input(pixels)]).as_numpy("logits").shape == (1, 10)
    finally:
        for sock in held:
            sock.close()
        proc.kill()
        proc.communicate()


def ready(url: str) -> bool:
    try:
        return httpclient.InferenceServerClient(url).is_server_ready()
    except Exception:  # still refused
        return False


def test_sigterm_with_a_stalled_upload_exits_143_once_drain_timeout_passes(tiny_artifact: Path) -> None:
    """The client never finishes and never closes; the server still exits, saying it cut one request."""
    with serving(tiny_artifact, "--body-timeout", "600", "--drain-timeout", "1") as (proc, url):
        client = httpclient.InferenceServerClient(url)
        sock = stall(url)
        wait_for(lambda: receiving(client) == 1, "the server receives the stalled upload")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        assert proc.stderr is not None
        assert "serve: terminated; drained: 0 requests answered, 1 cut at --drain-timeout 1 s" in proc.stderr.read()
        sock.close()


@pytest.mark.parametrize("second, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_ends_the_drain_at_once(tiny_artifact: Path, second: int, status: int) -> None:
    """--drain-timeout is far away; the second signal ends the process anyway, with its own exit status."""
    with serving(tiny_artifact, "--body-timeout", "600", "--drain-timeout", "600") as (proc, url):
        client = httpclient.InferenceServerClient(url)
        sock = stall(url)
        wait_for(lambda: receiving(client) == 1, "the server receives the stalled upload")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not ready(url), "the server drains")
        proc.send_signal(second)
        assert proc.wait(timeout=120) == status
        assert proc.stderr is not None
        assert "1 cut by a second signal" in proc.stderr.read()
        sock.close()



def vm_kib(pid: int, field: str) -> int:
    """VmHWM (peak) or VmRSS of a process, in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_huge_pictures_in_concurrent_requests_share_one_decode_budget(tiny_artifact: Path, tmp_path: Path) -> None:
    """Peaks relative to a server that decoded a tiny photo: two requests holding a 6000 x 6000 picture each, under a
    --decode-memory that fits one, cost about what one request does; and the memory goes back afterwards."""
    from PIL import Image

    side = 6000
    pixels = 4 * side * side
    buf = tmp_path / "big.jpg"
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf)
    big = buf.read_bytes()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / "tiny.jpg")
    tiny = (tmp_path / "tiny.jpg").read_bytes()
    peak, rss = {}, {}
    for name, photos in (("tiny", [tiny]), ("one", [big]), ("two", [big, big])):
        with serving(tiny_artifact, "--decode-memory", str(int(1.2 * 2 * pixels))) as (proc, url):
            client = httpclient.InferenceServerClient(url, concurrency=2, network_timeout=300)
            pending = [client.async_infer(NAME, [images_input([photo])]) for photo in photos]
            assert all(p.get_result().as_numpy("logits").shape == (1, 10) for p in pending)
            peak[name], rss[name] = vm_kib(proc.pid, "VmHWM") * 1024, vm_kib(proc.pid, "VmRSS") * 1024
    one, two = peak["one"] - peak["tiny"], peak["two"] - peak["tiny"]
    assert one > pixels / 2, f"one picture of {pixels / 2**20:.0f} MiB of pixels took only {one / 2**20:.0f} MiB"
    assert two < 1.5 * one, f"two requests took {two / 2**20:.0f} MiB, one {one / 2**20:.0f} MiB: decoded at once"
    kept = rss["two"] - rss["tiny"]
    assert kept < 0.5 * one, f"{kept / 2**20:.0f} MiB still held after the answers (the peak was {two / 2**20:.0f} MiB)"


def test_a_small_request_is_not_kept_waiting_by_a_huge_picture(tiny_artifact: Path, tmp_path: Path) -> None:
    """A picture that needs more than the whole --decode-memory holds most of it while it decodes, not all of it:
    a one-image request sent meanwhile is answered while the huge one is still being decoded."""
    from PIL import Image

    side = 8000
    Image.new("RGB", (side, side), (120, 30, 200)).save(tmp_path / "huge.png")
    with serving(tiny_artifact, "--decode-memory", str(2 * side * side)) as (_, url):
        client = httpclient.InferenceServerClient(url, concurrency=2, network_timeout=300)
        huge = client.async_infer(NAME, [images_input([(tmp_path / "huge.png").read_bytes()])])
        wait_for(lambda: queue_now(client)["in_flight"] == 1, "the huge picture is being decoded")
        small = client.infer(NAME, [pixels_input(np.zeros((1, 3, 32, 32), np.float32))])
        assert small.as_numpy("logits").shape == (1, 10)
        assert queue_now(client)["in_flight"] == 1, "the huge picture was decoded first: the small request waited for it"
        assert huge.get_result().as_numpy("logits").shape == (1, 10)
