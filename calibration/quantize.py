"""Explicit int8 quantization of an exported DeiT: calibration statistics, Q/DQ placement, CPU variant.

Placement rules (TensorRT's "explicit quantization" guide and NVIDIA ModelOpt's default int8 recipe
for transformers, `modelopt/onnx/quantization/int8.py`; see the README's calibration section): symmetric int8 (zero
point 0), weights per output channel, activations per tensor, and a Q/DQ pair only where TensorRT
fuses it into an int8 kernel:

- the data input and the weight of every Linear (`MatMul` with a 2-D constant weight, `Gemm`) and of
  the patch-embedding `Conv`;
- both inputs of the attention `MatMul`s of a decomposed graph (MatMuls with no constant input):
  Q x K^T and softmax(...) x V, so the softmax output is quantized where it feeds the second MatMul;
- around the fused ONNX `Attention` op (opset 23): nothing by default, since TensorRT's fused
  attention consumes float q/k/v from int8 Linears, and `attention_qdq=True` puts Q/DQ on q, k
  and v for comparison (both measured, see README);
- never on LayerNormalization, GELU, the Softmax input or residual Adds (they stay float).

One Q/DQ pair per activation tensor is shared by all its quantized consumers (the three q/k/v
projections read the same LayerNorm output), and biases stay float (TensorRT folds them).

Calibration runs the fp32 model once over the calibration images in ONNX Runtime and keeps, per
quantized tensor, a histogram of |x|; max, percentile and entropy (TensorRT's KL-divergence
method) are all computed from it, so comparing methods needs no second pass, and memory stays at
one batch of activations (ONNX Runtime's own histogram calibrators keep every batch's outputs).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.console import progress_bar

METHODS = ("max", "entropy", "percentile")
INT8_MAX = 127
HIST_BINS = 2048


@dataclass
class QdqPlan:
    """Which tensors get a Q/DQ pair, and which node inputs read the dequantized value."""

    activations: list[str] = field(default_factory=list)
    weights: dict[str, int] = field(default_factory=dict)  # initializer -> per-channel axis
    consumers: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # tensor -> (node index, input index)

    def add(self, tensor: str, node: int, slot: int, axis: int | None = None) -> None:
        if axis is None and tensor not in self.consumers:
            self.activations.append(tensor)
        elif axis is not None:
            self.weights[tensor] = axis
        self.consumers.setdefault(tensor, []).append((node, slot))

    def counts(self) -> dict[str, int]:
        return {"activation_qdq": len(self.activations), "weight_dq": len(self.weights)}


def clean_for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the dynamo exporter's `value_info`.

    Those entries carry shapes from tracing that ONNX shape inference (which ORT's quantizer runs)
    contradicts ("Inferred shape and existing shape differ"); they are hints, so dropping them loses
    nothing and lets inference recompute consistent ones.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return out


def plan_qdq(model: onnx.ModelProto, attention_qdq: bool = False) -> QdqPlan:
    """Apply the placement rules in the module docstring to `model`'s nodes."""
    inits = {i.name: i for i in model.graph.initializer}
    plan = QdqPlan()
    for idx, node in enumerate(model.graph.node):
        ins = list(node.input)
        if node.op_type == "Conv" and len(ins) > 1 and ins[1] in inits:
            plan.add(ins[0], idx, 0)
            plan.add(ins[1], idx, 1, axis=0)
        elif node.op_type == "Gemm" and ins[1] in inits and ins[0] not in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            plan.add(ins[0], idx, 0)
            plan.add(ins[1], idx, 1, axis=0 if trans_b else 1)
        elif node.op_type == "MatMul" and ins[0] not in inits:
            if ins[1] in inits and len(inits[ins[1]].dims) == 2:  # a Linear
                plan.add(ins[0], idx, 0)
                plan.add(ins[1], idx, 1, axis=1)
            elif ins[1] not in inits:  # attention: Q x K^T, probabilities x V
                plan.add(ins[0], idx, 0)
                plan.add(ins[1], idx, 1)
        elif node.op_type == "Attention" and attention_qdq:
            for slot in range(3):
                plan.add(ins[slot], idx, slot)
    return plan


class AbsHistogram:
    """Streaming histogram of |x| with a fixed bin width, grown (and coarsened) as larger values arrive."""

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)
        self.width = 0.0
        self.amax = 0.0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(x.astype(np.float32, copy=False)).ravel()
        m = float(a.max()) if a.size else 0.0
        if not self.counts.size:
            self.width = max(m, 1e-12) / HIST_BINS
            self.counts = np.zeros(HIST_BINS, dtype=np.int64)
        while m / self.width > 8 * HIST_BINS:  # keep the bin count bounded: merge neighbours
            c = np.pad(self.counts, (0, len(self.counts) % 2))
            self.counts, self.width = c.reshape(-1, 2).sum(1), self.width * 2
        need = int(np.ceil(m / self.width))
        if need > len(self.counts):
            self.counts = np.pad(self.counts, (0, need - len(self.counts)))
        idx = np.minimum((a / self.width).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.amax = max(self.amax, m)

    def percentile_amax(self, percentile: float) -> float:
        cdf = np.cumsum(self.counts) / max(int(self.counts.sum()), 1)
        i = int(np.searchsorted(cdf, percentile / 100.0))
        return min((i + 1) * self.width, self.amax)

    def entropy_amax(self, quant_bins: int = INT8_MAX + 1, max_candidates: int = 256) -> float:
        """TensorRT's calibration: the clipping threshold whose 128-level quantization of the
        histogram has the smallest KL divergence from the (clipped) original."""
        counts = np.trim_zeros(self.counts, "b").astype(np.float64)
        n = len(counts)
        if n <= quant_bins:
            return self.amax
        stride = max(1, (n - quant_bins) // max_candidates)
        best, best_i = np.inf, n
        for i in range(quant_bins, n + 1, stride):
            p = counts[:i].copy()
            p[-1] += counts[i:].sum()
            group = (np.arange(i) * quant_bins) // i
            nonzero = counts[:i] > 0
            gsum = np.bincount(group, weights=counts[:i], minlength=quant_bins)
            gnz = np.bincount(group, weights=nonzero, minlength=quant_bins)
            q = np.where(nonzero, gsum[group] / np.maximum(gnz[group], 1), 0.0)
            mask = p > 0
            if np.any(mask & (q == 0)):
                continue
            p_n, q_n = p / p.sum(), q / q.sum()
            kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / q_n[mask])))
            if kl < best:
                best, best_i = kl, i
        return min(best_i * self.width, self.amax)

    def amax_for(self, method: str, percentile: float = 99.99) -> float:
        if method == "max":
            return self.amax
        if method == "percentile":
            return self.percentile_amax(percentile)
        if method == "entropy":
            return self.entropy_amax()
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def collect_stats(
    model: onnx.ModelProto, tensors: list[str], batches: Iterable[np.ndarray], total: int | None = None, progress: bool = True
) -> dict[str, AbsHistogram]:
    """Run the fp32 model on the calibration batches and histogram every tensor in `tensors`."""
    import onnxruntime as ort

    probe = clean_for_ort(model)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = [i.name for i in probe.graph.input]
    for name in tensors:
        if name not in existing and name not in graph_inputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [t for t in tensors if t not in graph_inputs]
    hists = {t: AbsHistogram() for t in tensors}
    with progress_bar(total=total, desc="calibrate", unit="batch", enabled=progress) as bar:
        for x in batches:
            for t in tensors:
                if t in graph_inputs:
                    hists[t].add(x)
            for name, value in zip(wanted, session.run(wanted, {graph_inputs[0]: x})):
                hists[name].add(np.asarray(value))
            bar.update(1)
    return hists


def insert_qdq(model: onnx.ModelProto, plan: QdqPlan, amax: dict[str, float]) -> onnx.ModelProto:
    """A copy of `model` with the planned Q/DQ pairs; weights are stored as int8 behind a DequantizeLinear."""
    out = clean_for_ort(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    rename: dict[tuple[int, int], str] = {}
    head: list[onnx.NodeProto] = []
    before: dict[int, list[onnx.NodeProto]] = {}
    zero = f"qdq_zero_point_{_tag(graph)}"
    graph.initializer.append(numpy_helper.from_array(np.zeros((), np.int8), zero))
    for t in plan.activations:
        scale = f"{t}_scale"
        graph.initializer.append(numpy_helper.from_array(np.array(max(amax[t], 1e-8) / INT8_MAX, np.float32), scale))
        q, dq = f"{t}_quantized", f"{t}_dequantized"
        nodes = [
            helper.make_node("QuantizeLinear", [t, scale, zero], [q], name=f"{t}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=f"{t}_DequantizeLinear"),
        ]
        first = min(i for i, _ in plan.consumers[t])
        before.setdefault(first, []).extend(nodes)
        rename.update({c: dq for c in plan.consumers[t]})
    for w, axis in plan.weights.items():
        values = numpy_helper.to_array(inits[w]).astype(np.float32)
        reduce_axes = tuple(a for a in range(values.ndim) if a != axis)
        scale = np.abs(values).max(axis=reduce_axes) / INT8_MAX
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        shape = [1] * values.ndim
        shape[axis] = -1
        q = np.clip(np.round(values / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{w}_int8"),
            numpy_helper.from_array(scale, f"{w}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{w}_zero_point"),
        ])
        head.append(helper.make_node("DequantizeLinear", [f"{w}_int8", f"{w}_scale", f"{w}_zero_point"], [f"{w}_dequantized"],
                                     name=f"{w}_DequantizeLinear", axis=axis))
        rename.update({c: f"{w}_dequantized" for c in plan.consumers[w]})
    old = list(graph.node)
    for (i, slot), name in rename.items():
        old[i].input[slot] = name
    new = head + [n for i, node in enumerate(old) for n in (*before.get(i, []), node)]
    del graph.node[:]
    graph.node.extend(new)
    still_used = {name for node in new for name in node.input}
    kept = [i for i in graph.initializer if i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def _tag(graph: onnx.GraphProto) -> str:
    """A suffix no tensor in `graph` uses yet (the exporter's names are short, this is cheap)."""
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    n = 0
    while f"qdq_zero_point_{n}" in names:
        n += 1
    return str(n)


def amax_table(hists: dict[str, AbsHistogram], method: str, percentile: float = 99.99) -> dict[str, float]:
    return {t: h.amax_for(method, percentile) for t, h in hists.items()}


def quantize_dynamic_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's dynamic int8 (int8 per-channel weights, activations quantized per batch at run time).

    No calibration and not a TensorRT input, but on ORT CPU its MatMulInteger kernels beat a static
    Q/DQ graph (measured: benchmarks/int8_latency.py), so it ships as the CPU variant under the same
    accuracy gate. Only MatMul/Gemm: the patch Conv is one layer and ConvInteger is slow on CPU.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="deit-int8-cpu-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(clean_for_ort(model), str(src))
        logging.disable(logging.WARNING)  # "consider pre-processing": shape inference is done, value_info is clean
        try:
            quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(str(dst))
