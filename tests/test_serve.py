"""`python -m runtime.serve` as a client sees it: a real server process on a free port, the official
`tritonclient.http`, the tiny exported DeiT. Every wait is for a sign (the printed URL, a statistic,
the readiness endpoint), never a fixed sleep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from conftest import SAMPLE_DIR, needs_sample, photo_bytes, predictor_answers
from benchmarks.serve import launch
from runtime.backends import create
from runtime.classify import ClassifyOptions, classify
from runtime.predictor import Prediction, Predictor
from runtime.decode import load_and_preprocess
from runtime.serve import main

if TYPE_CHECKING:
    import tritonclient.http as httpclient
else:
    httpclient = pytest.importorskip("tritonclient.http", reason="the serve extra is not installed: pip install -e '.[serve]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

NAME = "tiny-deit"


@contextmanager
def serving(artifact: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A server process on the tiny model; yields it and its host:port once it printed that it is ready."""
    with launch(artifact, "--backend", "ort-cpu", "--threads", "1", *args) as (proc, url, name):
        assert name == NAME
        yield proc, url


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[str]:
    with serving(tiny_artifact, "--max-batch-size", "4", "--max-queue-delay-ms", "1", "--max-request-bytes", "2000000") as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server, concurrency=4)


def images_input(items: list[bytes]) -> httpclient.InferInput:
    x = httpclient.InferInput("images", [len(items)], "BYTES")
    x.set_data_from_numpy(np.array(items, dtype=np.object_))
    return x


def pixels_input(pixels: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    x = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    x.set_data_from_numpy(pixels.astype(np.float32), binary_data=binary)
    return x


def refused(client: httpclient.InferenceServerClient, inputs: list[httpclient.InferInput], **kw: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        client.infer(NAME, inputs, **kw)
    return str(info.value.status()), info.value.message()


def test_health_metadata_and_config(client: httpclient.InferenceServerClient, tiny_artifact: Path) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(NAME)
    assert [i["name"] for i in meta["inputs"]] == ["pixel_values", "images"]
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "topk_indices", "topk_labels", "topk_probs"]
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert meta["parameters"]["backend"] == "ort-cpu" and meta["parameters"]["precision"] == "fp32"
    assert meta["parameters"]["checkpoint"].endswith("tiny-deit")
    config = client.get_model_config(NAME)
    assert config["max_batch_size"] == 4
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1000
    assert not client.is_model_ready("no-such-model")


def test_fp32_and_bytes_answers_equal_the_predictor(client: httpclient.InferenceServerClient, tiny_artifact: Path,
                                                    tmp_path: Path) -> None:
    files, expected, pixels, logits = predictor_answers(tiny_artifact, tmp_path)
    by_bytes = client.infer(NAME, [images_input([f.read_bytes() for f in files])])
    for binary in (True, False):  # the binary-tensor extension and plain JSON tensors
        by_pixels = client.infer(NAME, [pixels_input(pixels, binary)],
                                 outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "topk_indices")])
        np.testing.assert_allclose(by_pixels.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
        assert by_pixels.as_numpy("topk_indices").tolist() == [[i for i, _, _ in p.top or []] for p in expected]
    np.testing.assert_allclose(by_bytes.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    labels = by_bytes.as_numpy("topk_labels")
    probs = by_bytes.as_numpy("topk_probs")
    for pred, row_labels, row_probs in zip(expected, labels, probs):
        assert pred.top is not None
        assert [lab.decode() for lab in row_labels] == [lab for _, lab, _ in pred.top]
        np.testing.assert_allclose(row_probs, [p for _, _, p in pred.top], rtol=1e-5)


def test_topk_parameter_and_triton_classification(client: httpclient.InferenceServerClient) -> None:
    items = [photo_bytes(7), photo_bytes(8)]
    full = client.infer(NAME, [images_input(items)])
    two = client.infer(NAME, [images_input(items)], parameters={"topk": 2})
    assert two.as_numpy("topk_indices").tolist() == full.as_numpy("topk_indices")[:, :2].tolist()
    cls = client.infer(NAME, [images_input(items)], outputs=[httpclient.InferRequestedOutput("logits", class_count=3)])
    rows = cls.as_numpy("logits")
    assert rows.shape == (2, 3)
    logits = full.as_numpy("logits")
    for r, row in enumerate(rows):
        fields = [x.decode().split(":") for x in row]
        assert [int(f[1]) for f in fields] == full.as_numpy("topk_indices")[r, :3].tolist()
        np.testing.assert_allclose([float(f[0]) for f in fields], logits[r, [int(f[1]) for f in fields]], atol=1e-5)
        assert [f[2] for f in fields] == [x.decode() for x in full.as_numpy("topk_labels")[r, :3]]


@needs_sample()
def test_real_photos_give_runtime_infer_top1(client: httpclient.InferenceServerClient, tiny_artifact: Path) -> None:
    files = sorted(SAMPLE_DIR.iterdir())[:8]
    with create("ort-cpu", tiny_artifact, max_batch=4, threads=1) as backend:
        expected: list[Prediction] = []
        classify(files, Predictor(backend, 5), ClassifyOptions(workers=1), expected.append)
    pending = [client.async_infer(NAME, [images_input([f.read_bytes()])]) for f in files]  # one photo a request
    got = [p.get_result().as_numpy("topk_indices")[0, 0] for p in pending]
    assert got == [p.top[0][0] for p in expected if p.top]


def test_bad_requests_get_400_naming_the_input_and_the_server_serves_on(client: httpclient.InferenceServerClient) -> None:
    good = np.zeros((1, 3, 32, 32), np.float32)
    cases = {
        "wrong name": ([httpclient.InferInput("pixels", [1, 3, 32, 32], "FP32").set_data_from_numpy(good)], "'pixels'"),
        "wrong datatype": ([httpclient.InferInput("pixel_values", [1, 3, 32, 32], "FP64").set_data_from_numpy(good.astype(np.float64))], "FP64"),
        "wrong shape": ([pixels_input(np.zeros((1, 3, 16, 32), np.float32))], "[1, 3, 16, 32]"),
        "NaN pixels": ([pixels_input(np.full((1, 3, 32, 32), np.nan, np.float32))], "NaN"),
        "bad image in a batch": ([images_input([photo_bytes(1), b"not a picture", photo_bytes(2)])], "images[1]"),
        "too many images": ([images_input([photo_bytes(i) for i in range(5)])], "5 images"),
    }
    for what, (inputs, needle) in cases.items():
        status, message = refused(client, inputs)
        assert status == "400", (what, status, message)
        assert needle in message and "\n" not in message, (what, message)
    status, message = refused(client, [images_input([photo_bytes(1)])], parameters={"topk": 50})
    assert status == "400" and "topk" in message
    with pytest.raises(InferenceServerException) as info:
        client.infer("other-model", [pixels_input(good)])
    assert str(info.value.status()) == "404"
    assert client.infer(NAME, [pixels_input(good)]).as_numpy("logits").shape == (1, 10)
    rejected = client.get_inference_statistics(NAME)["model_stats"][0]["rejected"]
    assert rejected["400"] >= len(cases) + 1


def test_oversized_request_gets_413(client: httpclient.InferenceServerClient) -> None:
    status, message = refused(client, [images_input([b"x" * 2_500_000])])
    assert status == "413" and "--max-request-bytes" in message
    assert client.is_server_ready()


def raw_request_start(url: str, body: bytes) -> socket.socket:
    """Send an infer request's headers and half its body, so the server holds it in flight."""
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[: len(body) // 2])
    return sock


def wait_for(condition, what: str, limit_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Poll a sign (not a sleep standing in for one); fail with `what` if it never shows."""
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def finish_request(sock: socket.socket, body: bytes) -> None:
    """Send the rest of a held request's body."""
    sock.sendall(body[len(body) // 2 :])


def read_raw_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """A finished request's status line and body."""
    response = b""
    while chunk := sock.recv(65536):
        response += chunk
    sock.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], payload


def read_answer(sock: socket.socket) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    """A finished request's status line and JSON answer."""
    status, payload = read_raw_answer(sock)
    return status, json.loads(payload)


def pixels_body(pixels: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape),
                                   "data": pixels.reshape(-1).tolist()}], "outputs": [{"name": "logits"}]}).encode()


def queue_now(client: httpclient.InferenceServerClient) -> dict[str, int]:
    return client.get_inference_statistics(NAME)["model_stats"][0]["queue_now"]


def receiving(client: httpclient.InferenceServerClient) -> int:
    """Requests whose body is still arriving (they hold no --max-queue-size slot yet)."""
    return queue_now(client)["receiving"]


def test_requests_on_their_way_share_a_backend_batch(tiny_artifact: Path) -> None:
    """Four requests the server has received wait for each other (the queue delay is long): one batch of four,
    each request answered with its own rows. A lone request then runs at once instead of waiting the delay."""
    with serving(tiny_artifact, "--max-batch-size", "4", "--max-queue-delay-ms", "600000") as (_, url):
        client = httpclient.InferenceServerClient(url, network_timeout=120)
        pixels = np.random.default_rng(1).standard_normal((4, 1, 3, 32, 32)).astype(np.float32)
        bodies = [pixels_body(p) for p in pixels]
        held = [raw_request_start(url, b) for b in bodies]
        wait_for(lambda: receiving(client) == 4, "the server receives the four requests")
        for sock, b in zip(held, bodies):
            finish_request(sock, b)
        answers = [read_answer(sock) for sock in held]
        assert all(status.endswith(b"200 OK") for status, _ in answers), answers
        with create("ort-cpu", tiny_artifact, max_batch=4, threads=1) as backend:
            expected = backend.infer(pixels[:, 0])["logits"]
        for (_, answer), row in zip(answers, expected):
            np.testing.assert_allclose(answer["outputs"][0]["data"], row, atol=1e-5)
        stats = client.get_inference_statistics(NAME)["model_stats"][0]
        assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(4, 1)]
        assert client.infer(NAME, [pixels_input(pixels[0])]).as_numpy("logits").shape == (1, 10)
        stats = client.get_inference_statistics(NAME)["model_stats"][0]
        assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stats["batch_stats"]] == [(1, 1), (4, 1)]
        assert stats["inference_count"] == 5 and stats["execution_count"] == 2


def test_full_queue_gets_503_and_sigterm_drains(tiny_artifact: Path) -> None:
    """A request that has arrived takes the one queue slot (it waits for a batch while another is still arriving);
    a third gets 503. SIGTERM: new requests get 503, the queued one is answered at once, the arriving one when
    its body is complete, then the server exits 143."""
    with serving(tiny_artifact, "--max-queue-size", "1", "--max-queue-delay-ms", "600000") as (proc, url):
        client = httpclient.InferenceServerClient(url)
        pixels = np.random.default_rng(0).standard_normal((2, 1, 3, 32, 32)).astype(np.float32)
        bodies = [pixels_body(p) for p in pixels]
        arriving = raw_request_start(url, bodies[1])
        wait_for(lambda: receiving(client) == 1, "the server receives the first request")
        queued = raw_request_start(url, bodies[0])
        finish_request(queued, bodies[0])
        wait_for(lambda: queue_now(client)["in_flight"] == 1, "the second request is queued")
        status, message = refused(client, [pixels_input(pixels[0])])
        assert status == "503" and "--max-queue-size" in message

        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not client.is_server_ready(), "the server reports it is draining")
        status, message = refused(client, [pixels_input(pixels[0])])
        assert status == "503" and "shutting down" in message
        status, answer = read_answer(queued)
        assert status.endswith(b"200 OK"), answer
        assert proc.poll() is None  # it waits for the request still arriving

        finish_request(arriving, bodies[1])
        status, answer = read_answer(arriving)
        assert status.endswith(b"200 OK"), answer
        (out,) = answer["outputs"]
        with create("ort-cpu", tiny_artifact, max_batch=1, threads=1) as backend:
            np.testing.assert_allclose(np.array(out["data"]).reshape(1, 10), backend.infer(pixels[1])["logits"], atol=1e-5)
        assert proc.wait(timeout=60) == 143
        assert proc.stderr is not None
        assert "serve: terminated; drained: 2 requests answered, none cut" in proc.stderr.read()


@pytest.mark.parametrize("where", [[], ["--address", "local"]], ids=["one process", "Ray Serve"])
def test_port_in_use_is_a_one_line_usage_error(tiny_artifact: Path, where: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Found before the model loads (and before Ray starts: Ray Serve's proxy would never come up)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--model", str(tiny_artifact), "--port", str(port), *where]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"serve: error: 127.0.0.1:{port}: ") and "--port" in err and "\n" not in err


@pytest.mark.parametrize("args, needle", [(["--max-queue-size", "0"], "--max-queue-size"),
                                          (["--max-batch-size", "999"], "--max-batch-size 999"),
                                          (["--port", "70000"], "--port 70000")])
def test_bad_flags_are_usage_errors(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_drain_with_nothing_in_flight_exits_143_at_once(tiny_artifact: Path) -> None:
    with serving(tiny_artifact) as (proc, url):
        assert httpclient.InferenceServerClient(url).is_server_ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143


def test_the_load_benchmark_reports_every_cell(tiny_artifact: Path, tmp_path: Path) -> None:
    from benchmarks.serve import main as bench

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"p{i}.png").write_bytes(photo_bytes(i))
    out = tmp_path / "out"
    assert bench(["--model", str(tiny_artifact), "--images", str(photos), "--concurrency", "1,2", "--seconds", "0.5",
                  "--overload", "8", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads((out / "serving.json").read_text())
    cells = {(c["inputs"], c["batching"], c["concurrency"]) for c in report["cells"]}
    assert cells == {(k, b, c) for k in ("BYTES", "FP32") for b in (True, False) for c in (1, 2)}
    assert all(c["requests"] > 0 and c["errors"] == 0 for c in report["cells"])
    assert report["agreement"]["same_top1"] == 6 and not report["agreement"]["differ"]
    overload = report["overload"]
    assert overload["ok"] + overload["refused_503"] == 24 and overload["errors"] == 0 and overload["alive_and_ready_after"]
    assert report["offline"]["images_per_s"] > 0
    text = (out / "serving.md").read_text()
    assert "| BYTES | on | 2 |" in text and "6 of 6 photos" in text and (out / "serving.png").stat().st_size > 0


def ray_serve_missing() -> str | None:
    """Why Ray Serve cannot run here (found without importing Ray into the test process), or None."""
    import importlib.util

    missing = [m for m in ("ray", "fastapi", "grpc") if importlib.util.find_spec(m) is None]
    return f"Ray Serve is not installed ({', '.join(missing)} missing): pip install -e '.[distributed]'" if missing else None


def replica_pid(client: httpclient.InferenceServerClient) -> int:
    return client.get_inference_statistics(NAME)["model_stats"][0]["process"]["pid"]


@pytest.mark.skipif(ray_serve_missing() is not None, reason=str(ray_serve_missing()))
def test_ray_serve_replica_answers_like_the_predictor_and_is_restarted(tiny_artifact: Path, tmp_path: Path) -> None:
    """The same routes as Ray Serve replicas on a local Ray: the answers equal the backend's; a replica killed
    with a request in flight answers it with an error, comes back, serves again; SIGTERM exits 143."""
    with serving(tiny_artifact, "--address", "local", "--replicas", "1", "--max-batch-size", "4") as (proc, url):
        client = httpclient.InferenceServerClient(url, network_timeout=120)
        assert client.is_server_ready() and client.get_model_metadata(NAME)["parameters"]["backend"] == "ort-cpu"
        files = [tmp_path / f"p{i}.png" for i in range(3)]
        for i, f in enumerate(files):
            f.write_bytes(photo_bytes(i))
        items = [f.read_bytes() for f in files]
        pixels = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
        with create("ort-cpu", tiny_artifact, max_batch=4, threads=1) as backend:
            expected = backend.infer(pixels)["logits"]
            spec = Predictor(backend, 5).spec
            expected_bytes = backend.infer(np.stack([load_and_preprocess(f, spec) for f in files]))["logits"]
        np.testing.assert_allclose(client.infer(NAME, [pixels_input(pixels)]).as_numpy("logits"), expected, atol=1e-5)
        np.testing.assert_allclose(client.infer(NAME, [images_input(items)]).as_numpy("logits"), expected_bytes, atol=1e-5)

        pid = replica_pid(client)
        body = pixels_body(pixels[:1])
        held = raw_request_start(url, body)
        wait_for(lambda: receiving(client) == 1, "the replica receives the request")
        os.kill(pid, signal.SIGKILL)
        finish_request(held, body)
        status, answer = read_raw_answer(held)  # Ray Serve's proxy answers, in plain text
        assert status.split()[1] in (b"500", b"503") and answer and b"\n" not in answer.strip(), (status, answer)
        wait_for(lambda: ready_again(client), "Ray Serve restarted the replica", limit_s=120)
        assert replica_pid(client) != pid
        np.testing.assert_allclose(client.infer(NAME, [pixels_input(pixels)]).as_numpy("logits"), expected, atol=1e-5)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 143
        assert proc.stderr is not None
        assert "serve: terminated; the replicas answered the requests they held and stopped" in proc.stderr.read()


def ready_again(client: httpclient.InferenceServerClient) -> bool:
    try:
        return client.is_server_ready()
    except Exception:  # the proxy has no replica to ask yet
        return False


def raw_exchange(url: str, request: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Send one raw HTTP request (Connection: close) and return its status and JSON answer."""
    host, port = url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        status, payload = read_raw_answer(sock)
    return int(status.split()[1]), json.loads(payload)


def post(url: str, body: bytes, path: str = f"/v2/models/{NAME}/infer") -> tuple[int, dict]:  # type: ignore[type-arg]
    return raw_exchange(url, f"POST {path} HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def images_json(items: list[str], **extra: object) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(items)], "data": items}],
                       **extra}).encode()


def test_malformed_bodies_get_400_in_the_protocols_form_without_a_traceback(tiny_artifact: Path) -> None:
    """Deep JSON, a lone surrogate and fields Triton refuses are 400 (shared memory: not supported), each a
    one-line JSON error; the server logs no traceback and serves on."""
    good = [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]
    cases = {
        b"[" * 100_000 + b"]" * 100_000: (400, "nested too deeply"),
        b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ' + b"[" * 5000 + b'"x"' + b"]" * 5000
        + b"}]}": (400, "nested too deeply"),
        images_json(["\ud800"]): (400, "lone surrogate"),
        json.dumps({"id": 7, "inputs": good}).encode(): (400, "'id' must be a string"),
        json.dumps({"inputs": good, "parameters": {"binary_data_output": "false"}}).encode(): (400, "true or false"),
        json.dumps({"inputs": good, "outputs": [{"name": "logits"}, {"name": "logits"}]}).encode(): (400, "twice"),
        json.dumps({"inputs": [{**good[0], "parameters": {"shared_memory_region": "r0"}}]}).encode():
            (501, "shared memory is not supported; send the tensor in the body"),
        b"\xff\xfe not utf-8": (400, "not valid JSON"),
    }
    with serving(tiny_artifact, "--max-json-bytes", "200000") as (proc, url):
        for body, (status, needle) in cases.items():
            got, answer = post(url, body)
            assert (got, needle in answer["error"], "\n" in answer["error"]) == (status, True, False), (body[:80], answer)
        big = {"name": "pixel_values", "datatype": "FP32", "shape": [8, 3, 32, 32], "data": [0.123456789] * 8 * 3072}
        got, answer = post(url, json.dumps({"inputs": [big]}).encode())
        assert got == 413 and "--max-json-bytes" in answer["error"]
        client = httpclient.InferenceServerClient(url)
        pixels = np.full((8, 3, 32, 32), 0.123456789, np.float32)  # as binary tensors the same request is not limited by it
        assert client.infer(NAME, [pixels_input(pixels)]).as_numpy("logits").shape == (8, 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()


def test_unknown_routes_and_missing_extensions_answer_json_errors(client: httpclient.InferenceServerClient, server: str) -> None:
    """tritonclient shows the server's reason instead of a parse error; each answer says what is not supported."""
    for call, needle in [(client.get_system_shared_memory_status, "shared memory is not supported"),
                         (client.get_cuda_shared_memory_status, "shared memory is not supported"),
                         (client.get_model_repository_index, "repository control is not supported"),
                         (lambda: client.load_model(NAME), "repository control is not supported"),
                         (client.get_trace_settings, "trace settings are not supported"),
                         (client.get_log_settings, "log settings are not supported")]:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert needle in info.value.message() and str(info.value.status()) == "501", info.value.message()
    status, answer = raw_exchange(server, f"GET /v2/nothing HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n".encode())
    assert status == 404 and "no route GET /v2/nothing" in answer["error"]
    status, answer = raw_exchange(server, f"GET /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 405 and "GET" in answer["error"]


def model_stats(client: httpclient.InferenceServerClient) -> dict:  # type: ignore[type-arg]
    return client.get_inference_statistics(NAME)["model_stats"][0]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed by prometheus_client's own parser: (sample name, labels) -> value."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://{url}/metrics", timeout=60) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_have_tritons_names_and_count_what_was_sent(tiny_artifact: Path) -> None:
    """Successes, failures (by Triton's reason and by ours), images, executions and durations, as the statistics say."""
    with serving(tiny_artifact, "--max-batch-size", "4") as (_, url):
        client = httpclient.InferenceServerClient(url)
        for n in (1, 3, 2):
            client.infer(NAME, [images_input([photo_bytes(i) for i in range(n)])])
        for _ in range(2):
            refused(client, [pixels_input(np.full((1, 3, 32, 32), np.nan, np.float32))])
        metrics = scrape(url)
        stats = model_stats(client)
    labels = (("model", NAME), ("version", "1"))
    assert metrics[("nv_inference_request_success", labels)] == 3 == stats["inference_stats"]["success"]["count"]
    assert metrics[("nv_inference_count", labels)] == 6 == stats["inference_count"]
    assert metrics[("nv_inference_exec_count", labels)] == stats["execution_count"] >= 3
    failure = {reason: metrics[("nv_inference_request_failure", (*labels[:1], ("reason", reason), labels[1]))]
               for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER")}
    assert failure == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 2}
    assert metrics[("deit_serve_rejected_requests_total", (*labels[:1], ("reason", "bad_request"), labels[1]))] == 2
    assert stats["inference_stats"]["fail"]["count"] == 2 and stats["rejected"] == {"400": 2}
    for name in ("nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
        assert metrics[(name, labels)] > 0, name
    assert metrics[("nv_inference_pending_request_count", labels)] == 0


def test_metadata_and_config_agree(client: httpclient.InferenceServerClient) -> None:
    """Triton's rule: with max_batch_size set, a tensor's metadata shape is [-1] followed by its config dims."""
    meta, config = client.get_model_metadata(NAME), client.get_model_config(NAME)
    for kind, section in (("inputs", "input"), ("outputs", "output")):
        shapes = {t["name"]: t["shape"] for t in meta[kind]}
        dims = {t["name"]: [-1, *t["dims"]] for t in config[section]}
        assert shapes == dims, kind
    assert model_stats(client)["inference_stats"]["cache_hit"] == {"count": 0, "ns": 0}


def test_a_host_reachable_from_other_machines_is_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.serve.cli import warn_if_exposed

    for host in ("127.0.0.1", "localhost", "::1"):
        warn_if_exposed(host)
    assert capsys.readouterr().err == ""
    warn_if_exposed("0.0.0.0")
    err = capsys.readouterr().err
    assert err.startswith("serve: warning: --host 0.0.0.0: the endpoint is reachable from other hosts") and err.count("\n") == 1


def test_the_serve_package_keeps_its_shape() -> None:
    """Layers that import only downwards (no cycle), no file over 400 lines, no function over 60."""
    import ast

    package = Path(__file__).resolve().parents[1] / "runtime" / "serve"
    imports: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        assert len(path.read_text().splitlines()) <= 400, path.name
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None and node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name}"
        imports[path.stem] = {n.module.rsplit(".", 1)[1] for n in ast.walk(tree)
                              if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("runtime.serve.")}
    assert {"protocol", "dataplane", "rest", "grpc", "server", "cli", "ray_serve", "failures"} <= set(imports)

    def reaches(start: str, seen: set[str]) -> set[str]:
        for nxt in imports.get(start, set()) - seen:
            seen.add(nxt)
            reaches(nxt, seen)
        return seen

    for module in imports:
        if module not in ("__init__", "__main__"):
            assert module not in reaches(module, set()), f"import cycle through {module}"


def test_a_request_answered_500_counts_as_a_failure(tiny_artifact: Path, tmp_path: Path) -> None:
    """A model whose logits are not finite: the answer is 500, and neither the statistics nor the metrics count
    a success or an inference for it."""
    import onnx.numpy_helper

    from test_hostile import edited_artifact

    def poison(model: onnx.ModelProto) -> None:
        weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        values = onnx.numpy_helper.to_array(weight).copy()
        values.flat[0] = np.nan
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))

    with serving(edited_artifact(tiny_artifact, tmp_path / "nan", poison), "--name", NAME) as (_, url):
        client = httpclient.InferenceServerClient(url)
        status, message = refused(client, [pixels_input(np.zeros((1, 3, 32, 32), np.float32))])
        assert status == "500" and "not finite" in message
        stats, metrics = model_stats(client), scrape(url)
    assert stats["inference_count"] == 0 and stats["inference_stats"]["success"]["count"] == 0
    assert stats["inference_stats"]["fail"]["count"] == 1 and stats["execution_count"] == 1
    labels = (("model", NAME), ("version", "1"))
    assert metrics[("nv_inference_request_success", labels)] == 0 and metrics[("nv_inference_count", labels)] == 0
    assert metrics[("nv_inference_request_failure", (labels[0], ("reason", "BACKEND"), labels[1]))] == 1
