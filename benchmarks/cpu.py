"""CPU figures for the benchmark report: the model's FLOPs, this CPU's MatMul ceilings, and how close each row gets.

A CPU latency alone says little: the same ms is excellent on a 2-core AVX2 machine and poor on one with
VNNI, and the fastest engine changes from CPU to CPU (README, CPU). So the benchmark measures,
in the same run, the peak MatMul throughput each engine reaches alone here (`matmul_ceilings`), counts
the model's FLOPs (`model_gflop`), and reports each row's achieved GFLOP/s and its share of the best
ceiling of its number type (`cpu_report_rows`): fp32 rows against the best fp32 MatMul, bf16 rows against
the best bf16 one, int8 rows against the best int8 GOP/s (fp16 rows too count against fp32: no CPU engine
here has fp16 GEMMs, they compute in fp32). Holding a row to the best engine, not its own, makes the share
say how much faster this CPU could run that arithmetic; the note then says whether the engine's own
MatMul or the work around the MatMuls holds the fastest fp32 row back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cpuinfo import has_bf16, has_int8_dot_product, usable_cores
from runtime.errors import first_line
from runtime.backends.timing import host_ms, measure

DTYPE_CLASS = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16", "int8": "int8"}
ENGINES = {"ort": "onnxruntime", "openvino": "openvino", "torch": "torch"}  # backend name prefix -> ceiling engine
AT_CEILING = 0.7  # below this share of the best fp32 ceiling, the report names what holds the fastest fp32 row back
TORCH_INT8_NOTE = ("torch: no int8 ceiling: PyTorch has no CPU int8 GEMM a backend here uses (its quantized "
                   "Linear is an eager-mode FBGEMM path outside torch.matmul)")


def model_gflop(config: dict[str, Any], image_size: int | None = None, patch_size: int | None = None,
                num_tokens_extra: int | None = None) -> float:
    """GFLOP (2 x multiply-accumulates) of one image's forward pass of a DeiT/ViT, from its transformers config.

    Counts the patch-embedding conv, each layer's QKV, output projection and two MLP Linears, the two attention
    matmuls (Q x K^T, probabilities x V) and the classifier head(s); LayerNorm, softmax, GELU and residual adds
    are under 1% and left out, as in published counts. Special tokens: DeiT has a class and a distillation
    token (transformers' DeiT always adds both), ViT only the class token.
    """
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    image, patch = image_size or config["image_size"], patch_size or config["patch_size"]
    extra = num_tokens_extra if num_tokens_extra is not None else (2 if config.get("model_type") == "deit" else 1)
    patches = (image // patch) ** 2
    tokens = patches + extra
    heads = 2 if any("WithTeacher" in a for a in config.get("architectures") or []) else 1
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 1000))
    macs = patches * config.get("num_channels", 3) * patch * patch * d
    macs += layers * (tokens * d * (4 * d + 2 * inter) + 2 * tokens * tokens * d)
    macs += heads * d * labels
    return 2 * macs / 1e9


def _matmul_onnx(n: int, kind: str) -> bytes:
    """A one-node MatMul model, [n, n] input x [n, n] constant weight (a Linear, as the model's are).

    kind "float": MatMul; "u8s8": MatMulInteger on u8 activations and s8 weights (ONNX Runtime's fast int8
    path); "qdq": symmetric s8 Q/DQ around a float MatMul, per-channel weights, as model.int8.onnx has.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if kind == "u8s8":
        weight = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "w")
        nodes = [helper.make_node("MatMulInteger", ["x", "w"], ["y"])]
        x_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [weight]
    elif kind == "qdq":
        inits = [numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "w_q"),
                 numpy_helper.from_array(np.full(n, 0.01, np.float32), "w_scale"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "w_zero"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
                 helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
                 helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
                 helper.make_node("MatMul", ["x_dq", "w"], ["y"])]
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", x_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _input(n: int, kind: str) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "u8s8":
        return rng.integers(0, 256, (n, n), dtype=np.uint8)
    return rng.standard_normal((n, n), dtype=np.float32)


def _ort_runner(n: int, kind: str, threads: int) -> Callable[[], object]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(_matmul_onnx(n, kind), sess_options=opts, providers=["CPUExecutionProvider"])
    x = _input(n, kind)
    return lambda: session.run(None, {"x": x})


def _ov_runner(n: int, kind: str, threads: int, hint: str) -> Callable[[], object]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(_matmul_onnx(n, kind), b"")
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                                                 "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint})
    request, x = compiled.create_infer_request(), _input(n, kind)
    return lambda: request.infer([x], share_inputs=True)


def _torch_runner(n: int, dtype: str) -> Callable[[], object]:
    import torch

    a, b = (torch.from_numpy(_input(n, "float")).to(getattr(torch, dtype)) for _ in range(2))
    return lambda: torch.matmul(a, b)


def matmul_ceilings(threads: int | None = None, size: int = 2048, seconds: float = 0.3) -> dict[str, Any]:
    """The peak [size]^3 MatMul throughput of each engine on this CPU at `threads`, timed by the timing core.

    fp32 for torch, ONNX Runtime and OpenVINO (f32 hint); bf16 for torch and OpenVINO where the CPU has bf16;
    int8 where it has VNNI/AMX: ONNX Runtime's u8 x s8 MatMulInteger and OpenVINO on a symmetric Q/DQ MatMul.
    Each entry: engine, dtype, kernel, gflops (GOP/s for int8), ms (median), size, other_load_cores. An engine
    that is missing or fails becomes a note, not an error: the benchmark goes on. `seconds` is the least time
    timed per entry (and at least 5 runs), so the whole measurement stays a few seconds.
    """
    threads = threads or usable_cores()
    plans: list[tuple[str, str, str, Callable[[], Callable[[], object]]]] = [
        ("torch", "fp32", "torch.matmul", lambda: _torch_runner(size, "float32")),
        ("onnxruntime", "fp32", "MatMul", lambda: _ort_runner(size, "float", threads)),
        ("openvino", "fp32", "MatMul, f32 hint", lambda: _ov_runner(size, "float", threads, "f32")),
    ]
    if has_bf16():
        plans += [("torch", "bf16", "torch.matmul", lambda: _torch_runner(size, "bfloat16")),
                  ("openvino", "bf16", "MatMul, bf16 hint", lambda: _ov_runner(size, "float", threads, "bf16"))]
    notes = [] if has_bf16() else ["bf16: no ceiling, this CPU has no bf16 instructions (avx512_bf16 / AMX-BF16)"]
    if has_int8_dot_product():
        plans += [("onnxruntime", "int8", "MatMulInteger u8 x s8", lambda: _ort_runner(size, "u8s8", threads)),
                  ("openvino", "int8", "s8 Q/DQ MatMul", lambda: _ov_runner(size, "qdq", threads, "f32"))]
        notes.append(TORCH_INT8_NOTE)
    else:
        notes.append("int8: no ceiling, this CPU has no int8 dot-product instructions (VNNI / AMX)")
    entries: list[dict[str, Any]] = []
    with _torch_threads(threads):
        for engine, dtype, kernel, build in plans:
            try:
                run = build()
                timing = measure(lambda: host_ms(run), 1, warmup=1, min_iters=5, min_time_s=seconds, retries=1)
            except ImportError:
                notes.append(f"{engine}: not installed, no {dtype} ceiling")
                continue
            except Exception as err:  # one engine's failure must not end the benchmark
                notes.append(f"{engine} {dtype}: MatMul failed ({type(err).__name__}: {first_line(err)})")
                continue
            entries.append({"engine": engine, "dtype": dtype, "kernel": kernel, "size": size, "ms": timing.median_ms,
                            "gflops": round(2 * size**3 / timing.median_ms / 1e6, 1),
                            "other_load_cores": timing.other_load_cores})
    return {"threads": threads, "size": size, "entries": entries, "notes": notes}


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch.set_num_threads(threads) inside the block, the previous setting after (torch's is process-wide)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def best_ceiling(ceilings: dict[str, Any], dtype: str, engine: str | None = None) -> dict[str, Any] | None:
    """The fastest ceiling entry of a number type (of one engine when given), or None."""
    found = [c for c in ceilings.get("entries", []) if c["dtype"] == dtype and engine in (None, c["engine"])]
    return max(found, key=lambda c: c["gflops"], default=None)


def engine_of(row: dict[str, Any]) -> str | None:
    name = str(row.get("backend") or row["label"])
    return next((engine for prefix, engine in ENGINES.items() if name.startswith(prefix)), None)


def cpu_report_rows(results_rows: list[dict[str, Any]], ceilings: dict[str, Any],
                    gflop_per_image: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Achieved GFLOP/s and share of ceiling for every timed CPU cell, and a note on the fastest fp32 row.

    `results_rows` are the harness's rows (label, precision, device, backend, timings with batch_size and
    median_ms); rows that did not run on the CPU are skipped. A cell's ceiling is the best entry of its
    number type (DTYPE_CLASS); share_of_ceiling is None where this CPU has no ceiling of that type.
    """
    cells: list[dict[str, Any]] = []
    for row in results_rows:
        if row.get("status", "ok") != "ok" or row.get("device") != "cpu":
            continue
        dtype = DTYPE_CLASS.get(row["precision"], "fp32")
        best = best_ceiling(ceilings, dtype)
        for t in row["timings"]:
            gflops = gflop_per_image * t["batch_size"] / (t["median_ms"] / 1000.0)
            cells.append({"label": row["label"], "engine": engine_of(row), "precision": row["precision"],
                          "dtype": dtype, "batch_size": t["batch_size"], "median_ms": t["median_ms"],
                          "gflops": round(gflops, 1),
                          "ceiling": f"{best['engine']} {dtype}" if best else None,
                          "share_of_ceiling": round(gflops / best["gflops"], 3) if best else None})
    return cells, _fp32_notes(cells, ceilings)


def _fp32_notes(cells: list[dict[str, Any]], ceilings: dict[str, Any]) -> list[str]:
    """What holds the fastest fp32 cell back when it is under AT_CEILING of the best fp32 MatMul."""
    fp32 = [c for c in cells if c["precision"] == "fp32" and c["share_of_ceiling"] is not None]
    if not fp32:
        return []
    top = max(fp32, key=lambda c: c["gflops"])
    best = best_ceiling(ceilings, "fp32")
    assert best is not None  # a share was computed against it
    where = f"the fastest fp32 row, {top['label']} at batch {top['batch_size']} ({top['gflops']:.0f} GFLOP/s)"
    if top["share_of_ceiling"] >= AT_CEILING:
        return [f"{where} reaches {top['share_of_ceiling']:.0%} of the best fp32 MatMul ({best['engine']}, "
                f"{best['gflops']:.0f} GFLOP/s): fp32 is near this CPU's limit; the lever is int8 or bf16."]
    own = best_ceiling(ceilings, "fp32", top["engine"]) if top["engine"] else None
    if own is not None and own["engine"] != best["engine"] and top["gflops"] >= AT_CEILING * own["gflops"]:
        return [f"{where} is engine-limited: it reaches {top['gflops'] / own['gflops']:.0%} of {own['engine']}'s "
                f"own fp32 MatMul ({own['gflops']:.0f} GFLOP/s), which is {own['gflops'] / best['gflops']:.0%} of "
                f"{best['engine']}'s ({best['gflops']:.0f}): the kernel holding it back is {own['engine']}'s fp32 "
                f"GEMM; a backend on {best['engine']}'s MatMul could be up to {best['gflops'] / own['gflops']:.1f}x "
                "faster."]
    own_share = f" and {top['gflops'] / own['gflops']:.0%} of {own['engine']}'s own" if own else ""
    return [f"{where} reaches {top['share_of_ceiling']:.0%} of the best fp32 MatMul ({best['engine']}, "
            f"{best['gflops']:.0f} GFLOP/s){own_share}: the time goes outside the GEMMs (attention, LayerNorm, "
            "GELU, framework overhead, small batches), not into a slow MatMul kernel."]


def add_cpu_figures(results: dict[str, Any]) -> None:
    """Put each CPU cell's GFLOP/s and share of ceiling (`cpu_efficiency`) and the fp32 note into the results."""
    ceilings, config = results.get("cpu_ceilings"), results["model"].get("config")
    if not ceilings or not config:
        return
    gflop = model_gflop(config, image_size=results["model"].get("image_size"))
    cells, notes = cpu_report_rows(results["backends"], ceilings, gflop)
    results["gflop_per_image"] = gflop
    efficiency: dict[str, dict[str, Any]] = {}
    for c in cells:
        if c["share_of_ceiling"] is not None:
            efficiency.setdefault(c["label"], {})[str(c["batch_size"])] = {
                "gflops": c["gflops"], "share_of_ceiling": c["share_of_ceiling"], "ceiling": c["ceiling"]}
    results["cpu_efficiency"] = efficiency
    ceilings["notes"] = [*ceilings.get("notes", []), *notes]


def auto_picks(artifact_dir: Path, results: dict[str, Any], threads: int | None) -> list[dict[str, Any]]:
    """What `--backend auto --precision fp32` picks at each batch size, against the table's fastest fp32 CPU rows.

    `slower_by` compares the pick with the fastest row auto could have picked (registry backends);
    `fastest_row` names the fastest fp32 CPU row of all (benchmark-only anchors included).
    """
    from runtime.backends.auto import choose
    from runtime.backends import BACKENDS

    rows = [r for r in results["backends"] if r["status"] == "ok" and r.get("device") == "cpu" and r["precision"] == "fp32"]
    picks = []
    for batch in results["settings"]["batch_sizes"]:
        choice = choose(Path(artifact_dir), precision="fp32", batch_size=batch, threads=threads)
        ms = {r["label"]: t["median_ms"] for r in rows for t in r["timings"] if t["batch_size"] == batch}
        pick: dict[str, Any] = {"batch_size": batch, "picked": f"{choice.backend} {choice.precision}", "reason": choice.reason}
        pickable = {label: v for label, v in ms.items() if label in BACKENDS}
        if choice.backend in ms and pickable:
            best = min(pickable, key=lambda k: pickable[k])
            pick |= {"picked_ms": ms[choice.backend], "fastest_pickable": best, "fastest_pickable_ms": pickable[best],
                     "slower_by": round(ms[choice.backend] / pickable[best] - 1, 4)}
            overall = min(ms, key=lambda k: ms[k])
            pick |= {"fastest_row": overall, "fastest_row_ms": ms[overall]}
            pick["verdict"] = (f"{choice.backend} {ms[choice.backend]:.1f} ms vs fastest {best} {pickable[best]:.1f} ms: "
                               f"{pick['slower_by']:+.1%}" + (f"; fastest row overall {overall} {ms[overall]:.1f} ms"
                                                              if overall != best else ""))
        else:
            pick["verdict"] = f"{choice.backend} is not a row of this table ({choice.reason})"
        picks.append(pick)
    return picks
