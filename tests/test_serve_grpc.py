"""`python -m runtime.serve`'s gRPC endpoint as a client sees it: a real server process on free ports, the
official `tritonclient.grpc` (Triton's own generated stubs), the tiny exported DeiT. Every wait is for a
sign (the ready line, a statistic), never a fixed sleep."""

from __future__ import annotations

import json
import queue
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from benchmarks.serve import Launched, serve_process
from conftest import photo_bytes, predictor_answers
from runtime.backends import create
from runtime.serve import main

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient
else:
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed: pip install -e '.[serve]'")
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

NAME = "tiny-deit"
SERVER_ARGS = ("--backend", "ort-cpu", "--threads", "1", "--max-batch-size", "4", "--max-queue-delay-ms", "1",
               "--max-request-bytes", "2000000")


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[Launched]:
    with serve_process(tiny_artifact, *SERVER_ARGS) as launched:
        assert launched.model == NAME
        yield launched


@pytest.fixture(scope="module")
def client(server: Launched) -> grpcclient.InferenceServerClient:
    assert server.grpc_url is not None, "the ready line names no gRPC address"
    return grpcclient.InferenceServerClient(server.grpc_url)


def images_input(items: list[bytes]) -> grpcclient.InferInput:
    x = grpcclient.InferInput("images", [len(items)], "BYTES")
    x.set_data_from_numpy(np.array(items, dtype=np.object_))
    return x


def pixels_input(pixels: np.ndarray) -> grpcclient.InferInput:
    x = grpcclient.InferInput("pixel_values", list(pixels.shape), "FP32")
    x.set_data_from_numpy(pixels.astype(np.float32))
    return x


def refused(call, *args: object, **kw: object) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The gRPC status code and message of a call that must fail."""
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kw)
    return str(info.value.status()), info.value.message()


def test_health_metadata_config_and_statistics(server: Launched, client: grpcclient.InferenceServerClient) -> None:
    assert server.grpc_url is not None and not server.grpc_url.endswith(":0")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    assert client.is_model_ready(NAME, "1") and not client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]
    meta = client.get_model_metadata(NAME, as_json=True)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("pixel_values", "FP32", ["-1", "3", "32", "32"]), ("images", "BYTES", ["-1", "1"])]  # int64 as JSON strings
    assert [o["name"] for o in meta["outputs"]] == ["logits", "topk_indices", "topk_labels", "topk_probs"]
    # The same metadata and configuration as over HTTP, field for field.
    http = httpclient.InferenceServerClient(server.url)
    assert meta["outputs"][0]["shape"] == [str(d) for d in http.get_model_metadata(NAME)["outputs"][0]["shape"]]
    config = client.get_model_config(NAME, as_json=True)["config"]
    assert config["max_batch_size"] == 4 and config["dynamic_batching"]["max_queue_delay_microseconds"] == "1000"
    assert config["input"][0] == {"name": "pixel_values", "data_type": "TYPE_FP32", "dims": ["3", "32", "32"]}
    assert config["name"] == http.get_model_config(NAME)["name"]

    before = client.get_inference_statistics(NAME, as_json=True)["model_stats"][0]
    client.infer(NAME, [pixels_input(np.zeros((2, 3, 32, 32), np.float32))])
    after = client.get_inference_statistics(NAME, as_json=True)["model_stats"][0]
    assert int(after.get("inference_count", 0)) == int(before.get("inference_count", 0)) + 2
    assert int(after["inference_stats"]["success"]["count"]) == int(before["inference_stats"].get("success", {}).get("count", 0)) + 1

    status, message = refused(client.get_model_metadata, "other-model")
    assert status == "StatusCode.NOT_FOUND" and message == f"unknown model 'other-model'; this server holds '{NAME}'"
    status, message = refused(client.get_system_shared_memory_status)
    assert status == "StatusCode.UNIMPLEMENTED" and "send the tensor in the body" in message


def test_fp32_and_bytes_answers_equal_the_predictor(server: Launched, client: grpcclient.InferenceServerClient,
                                                    tiny_artifact: Path, tmp_path: Path) -> None:
    files, expected, pixels, logits = predictor_answers(tiny_artifact, tmp_path)
    tops = [p.top or [] for p in expected]

    by_pixels = client.infer(NAME, [pixels_input(pixels)], request_id="r1",
                             outputs=[grpcclient.InferRequestedOutput(n) for n in ("logits", "topk_indices")])
    assert by_pixels.get_response().id == "r1"
    assert [o.name for o in by_pixels.get_response().outputs] == ["logits", "topk_indices"]
    np.testing.assert_allclose(by_pixels.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    assert by_pixels.as_numpy("topk_indices").tolist() == [[i for i, _, _ in t] for t in tops]

    # Typed `contents` instead of raw bytes, from a stub generated from Triton's proto (what other clients send).
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    typed = service_pb2.ModelInferRequest(model_name=NAME)
    typed.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape)).contents.fp32_contents.extend(
        pixels.reshape(-1).tolist())
    typed.outputs.add(name="logits")
    assert server.grpc_url is not None
    with grpc.insecure_channel(server.grpc_url) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed, timeout=60)
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [("logits", "FP32", [3, 10])]
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 10), logits,
                               rtol=1e-5, atol=1e-5)

    by_bytes = client.infer(NAME, [images_input([f.read_bytes() for f in files])])
    np.testing.assert_allclose(by_bytes.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    assert [[x.decode() for x in row] for row in by_bytes.as_numpy("topk_labels")] == [[lab for _, lab, _ in t] for t in tops]
    np.testing.assert_allclose(by_bytes.as_numpy("topk_probs"), [[p for _, _, p in t] for t in tops], rtol=1e-5)

    # The request parameter topk and Triton's classification extension, as over HTTP.
    two = client.infer(NAME, [images_input([files[0].read_bytes()])], parameters={"topk": 2})
    assert two.as_numpy("topk_indices").tolist() == [[i for i, _, _ in tops[0][:2]]]
    cls = client.infer(NAME, [pixels_input(pixels[:1])], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    fields = [x.decode().split(":") for x in cls.as_numpy("logits")[0]]
    assert [(int(f[1]), f[2]) for f in fields] == [(i, lab) for i, lab, _ in tops[0][:3]]


def test_bad_requests_get_invalid_argument_with_the_http_message(server: Launched,
                                                                  client: grpcclient.InferenceServerClient) -> None:
    http = httpclient.InferenceServerClient(server.url)

    def http_message(name: str, shape: list[int], datatype: str, array: np.ndarray) -> str:
        x = httpclient.InferInput(name, shape, datatype)
        x.set_data_from_numpy(array)
        status, message = refused(http.infer, NAME, [x])
        assert status == "400"
        return message

    cases = {  # what -> (input name, shape, datatype, array), each refused over both protocols
        "wrong shape": ("pixel_values", [1, 3, 16, 32], "FP32", np.zeros((1, 3, 16, 32), np.float32)),
        "wrong name": ("pixels", [1, 3, 32, 32], "FP32", np.zeros((1, 3, 32, 32), np.float32)),
        "NaN pixels": ("pixel_values", [1, 3, 32, 32], "FP32", np.full((1, 3, 32, 32), np.nan, np.float32)),
        "bad image": ("images", [2], "BYTES", np.array([photo_bytes(1), b"not a picture"], dtype=np.object_)),
    }
    for what, (name, shape, datatype, array) in cases.items():
        x = grpcclient.InferInput(name, shape, datatype)
        x.set_data_from_numpy(array)
        status, message = refused(client.infer, NAME, [x])
        assert status == "StatusCode.INVALID_ARGUMENT", (what, status, message)
        assert message == http_message(name, shape, datatype, array) and "\n" not in message, what
    assert "shape [1, 3, 16, 32], expected [N, 3, 32, 32]" in refused(
        client.infer, NAME, [pixels_input(np.zeros((1, 3, 16, 32), np.float32))])[1]
    status, message = refused(client.infer, NAME, [images_input([photo_bytes(1)])], parameters={"topk": 50})
    assert status == "StatusCode.INVALID_ARGUMENT" and "topk" in message
    status, _ = refused(client.infer, "other-model", [images_input([photo_bytes(1)])])
    assert status == "StatusCode.NOT_FOUND"
    assert client.infer(NAME, [images_input([photo_bytes(2)])]).as_numpy("logits").shape == (1, 10)  # serves on


def test_grpc_refusals_show_in_the_metrics_and_statistics(server: Launched, client: grpcclient.InferenceServerClient) -> None:
    """A refused gRPC inference counts as a failure, by Triton's reason and by ours, as an HTTP one does: a bad
    request refused by the data plane, and a streaming call refused by the endpoint itself."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from test_serve import scrape

    labels = (("model", NAME), ("version", "1"))
    other = ("nv_inference_request_failure", (labels[0], ("reason", "OTHER"), labels[1]))

    def ours(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return "deit_serve_rejected_requests_total", (labels[0], ("reason", reason), labels[1])

    http = httpclient.InferenceServerClient(server.url)
    before, stats_before = scrape(server.url), http.get_inference_statistics(NAME)["model_stats"][0]
    assert refused(client.infer, NAME, [pixels_input(np.zeros((1, 3, 16, 32), np.float32))])[0] == "StatusCode.INVALID_ARGUMENT"
    assert server.grpc_url is not None
    with grpc.insecure_channel(server.grpc_url) as channel, pytest.raises(grpc.RpcError) as info:
        list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([service_pb2.ModelInferRequest(model_name=NAME)]), timeout=60))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    after, stats_after = scrape(server.url), http.get_inference_statistics(NAME)["model_stats"][0]
    assert after[other] == before[other] + 2
    assert after[ours("bad_request")] == before.get(ours("bad_request"), 0) + 1
    assert after[ours("unsupported")] == before.get(ours("unsupported"), 0) + 1
    assert stats_after["inference_stats"]["fail"]["count"] == stats_before["inference_stats"]["fail"]["count"] + 2


def test_a_message_over_max_request_bytes_is_resource_exhausted(client: grpcclient.InferenceServerClient) -> None:
    status, message = refused(client.infer, NAME, [images_input([b"x" * 2_500_000])])
    assert status == "StatusCode.RESOURCE_EXHAUSTED", message
    assert client.is_server_ready()


def held_http_request(url: str, pixels: np.ndarray) -> tuple[socket.socket, bytes]:
    """An HTTP infer request with only half its body sent: the server holds it in flight."""
    body = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape),
                                   "data": pixels.reshape(-1).tolist()}]}).encode()
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: {url}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[: len(body) // 2])
    return sock, body


def held(http: httpclient.InferenceServerClient, in_flight: int, receiving: int) -> None:
    """Wait (for a sign, polled) until the server holds `in_flight` admitted requests and `receiving` arriving."""
    deadline = time.monotonic() + 60
    while True:
        now = http.get_inference_statistics(NAME)["model_stats"][0]["queue_now"]
        if (now["in_flight"], now["receiving"]) == (in_flight, receiving):
            return
        assert time.monotonic() < deadline, f"the server never held {in_flight} + {receiving} requests: {now}"
        time.sleep(0.02)


def test_a_full_queue_is_unavailable_over_grpc(tiny_artifact: Path) -> None:
    """One admission for both protocols: a gRPC request queued for a batch (an HTTP upload still arriving keeps
    the batcher waiting) fills --max-queue-size 1, so another gRPC request is refused, and so is the HTTP one
    once its body has arrived; then the queued request is answered."""
    with serve_process(tiny_artifact, "--backend", "ort-cpu", "--threads", "1", "--max-queue-size", "1",
                       "--max-queue-delay-ms", "600000") as server:
        assert server.grpc_url is not None
        client = grpcclient.InferenceServerClient(server.grpc_url)
        http = httpclient.InferenceServerClient(server.url)
        pixels = np.zeros((1, 3, 32, 32), np.float32)
        sock, body = held_http_request(server.url, pixels)
        answers: queue.Queue[object] = queue.Queue()
        client.async_infer(NAME, [pixels_input(pixels)], lambda result, error: answers.put(error or result))
        held(http, 1, 1)
        status, message = refused(client.infer, NAME, [pixels_input(pixels)])
        assert status == "StatusCode.UNAVAILABLE"
        assert message == "the server already holds 1 requests (--max-queue-size); retry later"
        sock.sendall(body[len(body) // 2 :])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"--max-queue-size" in answer
        result = answers.get(timeout=60)
        assert isinstance(result, grpcclient.InferResult), result
        assert result.as_numpy("logits").shape == (1, 10)


def test_sigterm_answers_a_grpc_request_in_flight_then_exits_143(tiny_artifact: Path) -> None:
    """A gRPC request queued for a batch (an HTTP request still arriving keeps the batcher waiting) is answered
    when SIGTERM drains the server, which then refuses new gRPC requests with UNAVAILABLE and exits 143."""
    with serve_process(tiny_artifact, "--backend", "ort-cpu", "--threads", "1", "--max-queue-delay-ms", "600000") as server:
        assert server.grpc_url is not None
        client = grpcclient.InferenceServerClient(server.grpc_url)
        http = httpclient.InferenceServerClient(server.url)
        pixels = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
        sock, body = held_http_request(server.url, pixels)
        answers: queue.Queue[object] = queue.Queue()
        client.async_infer(NAME, [pixels_input(pixels)], lambda result, error: answers.put(error or result))
        held(http, 1, 1)
        assert answers.empty()  # queued: the batcher waits for the HTTP request on its way
        server.proc.send_signal(signal.SIGTERM)
        result = answers.get(timeout=60)
        assert isinstance(result, grpcclient.InferResult), result
        with create("ort-cpu", tiny_artifact, max_batch=1, threads=1) as backend:
            np.testing.assert_allclose(result.as_numpy("logits"), backend.infer(pixels)["logits"], rtol=1e-5, atol=1e-5)
        status, message = refused(client.infer, NAME, [pixels_input(pixels)])
        assert status == "StatusCode.UNAVAILABLE" and "shutting down" in message
        sock.sendall(body[len(body) // 2 :])  # the HTTP request it still holds
        while sock.recv(65536):
            pass
        sock.close()
        assert server.proc.wait(timeout=60) == 143


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def stalled_grpc_upload(url: str) -> socket.socket:
    """A raw HTTP/2 connection that starts a ModelInfer call, declares a 1 MB message and sends 1 KiB of it, then
    nothing: what a stalled or hostile client does. (HPACK literals without indexing, no Huffman coding.)"""
    host, port = url.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(0x4, 0, 0, b""))
    sock.recv(65536)  # the server's SETTINGS
    headers = b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
        (b":authority", url.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    message_start = b"\x00" + (1_000_000).to_bytes(4, "big") + b"\x00" * 1024
    sock.sendall(_frame(0x4, 0x1, 0, b"") + _frame(0x1, 0x4, 1, headers) + _frame(0x0, 0, 1, message_start))
    return sock


def test_stalled_grpc_uploads_hold_no_slot_and_do_not_stop_shutdown(tiny_artifact: Path) -> None:
    """Three calls whose message never finishes arriving, against --max-queue-size 1: requests over both protocols
    are still answered, and SIGTERM still ends the server (143), cutting the stalled calls."""
    with serve_process(tiny_artifact, "--backend", "ort-cpu", "--threads", "1", "--max-queue-size", "1") as server:
        assert server.grpc_url is not None
        stalled = [stalled_grpc_upload(server.grpc_url) for _ in range(3)]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        pixels = np.zeros((1, 3, 32, 32), np.float32)
        assert client.infer(NAME, [pixels_input(pixels)], client_timeout=60).as_numpy("logits").shape == (1, 10)
        http = httpclient.InferenceServerClient(server.url)
        x = httpclient.InferInput("pixel_values", [1, 3, 32, 32], "FP32")
        x.set_data_from_numpy(pixels)
        assert http.infer(NAME, [x]).as_numpy("logits").shape == (1, 10)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 143
        for sock in stalled:
            sock.close()


def test_a_taken_grpc_port_is_a_one_line_usage_error(tiny_artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found before the model loads, as a taken HTTP port is."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--model", str(tiny_artifact), "--port", "0", "--grpc-port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"serve: error: 127.0.0.1:{port}: ") and "--grpc-port" in err and "\n" not in err


def test_the_peer_benchmark_without_mlserver_says_so_and_skips(tiny_artifact: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.serve import main as bench

    out = tmp_path / "out"
    assert bench(["--peer", "mlserver", "--mlserver-venv", str(tmp_path / "no-venv"), "--model", str(tiny_artifact),
                  "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (f"serve-bench: --peer mlserver skipped: MLServer not found in {tmp_path / 'no-venv'}: "
                   f"make install-mlserver MLSERVER_VENV={tmp_path / 'no-venv'}")
    assert not out.exists()
