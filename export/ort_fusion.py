"""Our opset-23 `model.onnx` -> ONNX Runtime's own fused-op graph (what its CUDA provider runs fastest).

ORT's CUDA kernels for its contrib ops (com.microsoft `Attention` with packed QKV weights,
`SkipLayerNormalization`, `BiasGelu`) run DeiT 2.4-3x faster than the standard-op graph. ORT's
`transformers.optimizer` cannot produce that graph from our export: its symbolic shape inference
fails on the opset-23 `Attention` op, and on a legacy export its attention fusion does not match
transformers' eager attention. Every pattern it would have to discover is known here (the
exporter wrote it), so this module rewrites the graph directly: offline, deterministic, and
failing loudly instead of returning an unfused model.

- Each standard `Attention` (with the MatMul+Add -> Reshape -> Transpose feeding q, k, v and the
  Transpose -> Reshape after it) becomes one com.microsoft `Attention`: packed weights
  [hidden, 3*hidden], bias [3*hidden], `num_heads`, and the standard op's `scale`. A layer that
  cannot be packed (weights not initializers, q/k/v from different inputs, a mask that masks
  something) raises `OrtFusionError`: our exporter never writes one, so a
  `MultiHeadAttention` fallback would be untested code.
- Residual Add + LayerNormalization -> `SkipLayerNormalization`, folding the bias Add of the
  MatMul branch into it (the residual sum stays available as its 4th output).
- MatMul bias Add + Gelu -> `BiasGelu` (exact erf Gelu; `FastGelu` for the tanh approximation):
  what ORT's optimizer emits, for CPU and GPU alike (`enable_gelu_approximation` is off by default).
Nodes the rewrite leaves unused, and their initializers, are removed.

ORT's optimizer (model_type="vit", opt_level=0; `use_gpu` only matters for opt_level >= 1) does
find the last two fusions once attention is rewritten, with an identical result, but it skips
SkipLayerNormalization silently whenever its symbolic shape inference fails; done here, the two
are a few lines with nothing to fail silently.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.errors import ModelError, first_line

MS_DOMAIN = "com.microsoft"
GELU_FUSED = {"none": "BiasGelu", "tanh": "FastGelu"}
# Ops that pass a mask's values through unchanged, between the Attention node and the constant mask.
MASK_PASS_THROUGH = frozenset({"Expand", "Reshape", "Unsqueeze"})
# ORT's CUDA SkipLayerNormalization sums x/n and x*x/n in the tensor type and rounds epsilon (1e-12
# for DeiT) to it: in fp16 that loses precision and overflows once the RMS passes 256, so it runs in
# fp32. (Its standard LayerNormalization computes fp16 inputs' statistics in fp32 already.)
FP32_OPS = ("SkipLayerNormalization",)


class OrtFusionError(ModelError, ValueError):
    """The graph is not the opset-23 export this rewrite expects; nothing was fused."""


def fuse_for_ort(model: onnx.ModelProto, num_heads: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The fp32 fused-op copy of `model` and the count of each com.microsoft op in it.

    Graph inputs, outputs (names and dynamic batch axis) and `metadata_props` are kept, so the
    result is a drop-in artifact file. `num_heads` is checked against the graph's own head split.
    """
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    graph = fused.graph
    if not _standard(graph, "Attention"):
        raise OrtFusionError("no ONNX Attention node: ORT fusion needs the opset-23 export (--attention fused)")
    _fuse_attention(graph, num_heads)
    _fuse_skip_layer_norm(graph)
    _fuse_bias_gelu(graph)
    _remove_unused(graph)
    del graph.value_info[:]  # shapes of rewritten tensors changed; ORT infers them
    if not any(o.domain == MS_DOMAIN for o in fused.opset_import):
        fused.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused, dict(sorted(Counter(n.op_type for n in graph.node if n.domain == MS_DOMAIN).items()))


def to_ort_fp16(model: onnx.ModelProto, fp32_ops: tuple[str, ...] = FP32_OPS) -> onnx.ModelProto:
    """fp16 weights and compute for ORT CUDA, float32 inputs and outputs (what the runtime feeds and reads).

    `fp32_ops=()` converts SkipLayerNormalization too (about 50 fewer Casts on DeiT-B), for ORT's
    `enable_skip_layer_norm_strict_mode`, which accumulates inside the op in fp32.

    ORT's own mixed-precision conversion, the one its optimizer applies: it types every tensor with
    ORT's symbolic shape inference (the only one that knows com.microsoft ops), keeps FP32_OPS in
    fp32 with Casts around them and folds fp32 -> fp16 -> fp32 Cast pairs, so the residual stream
    from one SkipLayerNormalization to the next stays fp32. That conversion only logs a warning when
    the inference fails and then writes a graph ORT cannot load, so the inference is checked first.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInferenceHelper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        typed = SymbolicShapeInferenceHelper(copy).infer({})
    except Exception as err:  # its per-op handlers assert on graphs they do not understand
        raise OrtFusionError(f"ONNX Runtime's symbolic shape inference fails on the fused graph: {first_line(err)}") from err
    if not typed:
        raise OrtFusionError("ONNX Runtime's symbolic shape inference cannot type every tensor of the fused graph")
    fp16 = OnnxModel(copy)
    fp16.convert_float_to_float16(keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *fp32_ops])
    del fp16.model.graph.value_info[:]  # types only the conversion needed; ORT infers them again
    return fp16.model


class _Graph:
    """Producer, consumer and initializer lookups over a graph, built afresh for each rewrite pass.

    A rewrite replaces a node in place (keeping the topological order) and leaves the nodes it made
    redundant for `_remove_unused`.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.inits = {i.name: i for i in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.producer = {y: n for n in graph.node for y in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for x in node.input:
                self.consumers[x].append(node)

    def parent(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_child(self, name: str, op_type: str) -> onnx.NodeProto | None:
        children = self.consumers.get(name, [])
        return children[0] if len(children) == 1 and children[0].op_type == op_type else None

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def linear(self, name: str) -> tuple[onnx.NodeProto, str] | None:
        """(MatMul node, bias) when `name` = MatMul(...) + bias, the bias a 1-D initializer."""
        add = self.parent(name, "Add")
        if add is None:
            return None
        for i in (0, 1):
            matmul, bias = self.parent(add.input[i], "MatMul"), self.array(add.input[1 - i])
            if matmul is not None and bias is not None and bias.ndim == 1:
                return matmul, add.input[1 - i]
        return None


def _standard(graph: onnx.GraphProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == op_type and n.domain in ("", "ai.onnx")]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    value = next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
    return value.decode() if isinstance(value, bytes) else value


def _fuse_attention(graph: onnx.GraphProto, num_heads: int) -> None:
    g = _Graph(graph)
    for attn in _standard(graph, "Attention"):
        where = f"Attention node {attn.name!r}"
        if any(attn.input[4:]) or any(attn.output[1:]):
            raise OrtFusionError(f"{where} has a KV cache or extra outputs; only plain self-attention is fused")
        if _attr(attn, "is_causal", 0) or _attr(attn, "softcap", 0.0) or _attr(attn, "qk_matmul_output_mode", 0):
            raise OrtFusionError(f"{where} is causal, soft-capped or outputs QK: com.microsoft Attention cannot be")
        if len(attn.input) > 3 and attn.input[3]:
            _check_no_mask(g, attn.input[3], where)
        projections = [_projection(g, q, num_heads, where) for q in attn.input[:3]]
        x, weight, _, head_dim = projections[0]
        hidden = num_heads * head_dim
        if any(p[0] != x for p in projections):
            raise OrtFusionError(f"{where}: q, k and v are projected from different tensors; cannot pack them")
        if any(p[1].shape != (weight.shape[0], hidden) or p[3] != head_dim for p in projections):
            raise OrtFusionError(f"{where}: q/k/v weights are not all [hidden, {num_heads} heads x {head_dim}]")
        transpose = g.only_child(attn.output[0], "Transpose")
        reshape = transpose and g.only_child(transpose.output[0], "Reshape")
        shape = reshape and g.array(reshape.input[1])
        if (
            transpose is None or reshape is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]
            or shape is None or shape.size != 3 or shape[2] != hidden
        ):
            raise OrtFusionError(f"{where}: its output is not Transpose(0, 2, 1, 3) -> Reshape to (batch, seq, hidden)")
        weight, bias = f"{attn.name}.qkv_weight", f"{attn.name}.qkv_bias"
        graph.initializer.extend([
            numpy_helper.from_array(np.concatenate([p[1] for p in projections], axis=1), weight),
            numpy_helper.from_array(np.concatenate([p[2] for p in projections]), bias),
        ])
        reshape.CopyFrom(helper.make_node(
            "Attention", [x, weight, bias], [reshape.output[0]], name=f"{attn.name}_ms", domain=MS_DOMAIN,
            num_heads=num_heads, scale=float(_attr(attn, "scale", 1.0 / math.sqrt(head_dim))),
        ))


def _projection(g: _Graph, name: str, num_heads: int, where: str) -> tuple[str, np.ndarray, np.ndarray, int]:
    """(x, weight, bias, head_dim) for `name` = Transpose(0, 2, 1, 3)(Reshape(x @ weight + bias, (b, s, heads, dim)))."""
    transpose = g.parent(name, "Transpose")
    reshape = transpose and g.parent(transpose.input[0], "Reshape")
    shape = reshape and g.array(reshape.input[1])
    linear = reshape and g.linear(reshape.input[0])
    if transpose is None or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3] or shape is None or shape.size != 4:
        raise OrtFusionError(f"{where}: q/k/v input {name!r} is not Transpose(0, 2, 1, 3) of a constant 4-D Reshape")
    if shape[2] != num_heads:
        raise OrtFusionError(f"{where}: q/k/v are split into {shape[2]} heads, not {num_heads}")
    weight = linear and g.array(linear[0].input[1])
    if linear is None or weight is None or weight.ndim != 2:
        raise OrtFusionError(f"{where}: q/k/v input {name!r} is not a MatMul + bias projection with initializer weights")
    return linear[0].input[0], weight, numpy_helper.to_array(g.inits[linear[1]]), int(shape[3])


def _check_no_mask(g: _Graph, name: str, where: str) -> None:
    """The exporter passes sdpa's all-True mask (a constant, expanded): dropping it changes nothing."""
    while name not in g.inits and (node := g.producer.get(name)) is not None and node.op_type in MASK_PASS_THROUGH:
        name = node.input[0]
    mask = g.array(name)
    if mask is None or not (mask.all() if mask.dtype == np.bool_ else not mask.any()):
        raise OrtFusionError(f"{where} has an attention mask that is not provably a no-op; only unmasked attention is fused")


def _fuse_skip_layer_norm(graph: onnx.GraphProto) -> None:
    g = _Graph(graph)
    fused: set[str] = set()
    for norm in _standard(graph, "LayerNormalization"):
        add = g.parent(norm.input[0], "Add")
        # Only residual Adds: the position-embedding Add (an initializer operand) stays an Add.
        if add is None or add.output[0] in fused or _attr(norm, "axis", -1) != -1 or set(add.input) & g.inits.keys():
            continue
        fused.add(add.output[0])
        gamma_beta = [norm.input[1], norm.input[2] if len(norm.input) > 2 else ""]
        inputs = [add.input[0], add.input[1], *gamma_beta]
        for i in (0, 1):
            if linear := g.linear(add.input[i]):  # fold the branch's bias Add into the fused op
                inputs = [linear[0].output[0], add.input[1 - i], *gamma_beta, linear[1]]
                break
        # The residual sum (4th output) only where something else reads it: the next residual Add.
        read_elsewhere = len(g.consumers[add.output[0]]) > 1 or add.output[0] in g.outputs
        outputs = [norm.output[0], "", "", add.output[0]] if read_elsewhere else [norm.output[0]]
        add.CopyFrom(helper.make_node(
            "SkipLayerNormalization", inputs, outputs, name=f"{norm.name}_skip", domain=MS_DOMAIN,
            epsilon=float(_attr(norm, "epsilon", 1e-5)),
        ))
        norm.output[0] += "__unfused"  # nothing reads it now: `_remove_unused` drops the node


def _fuse_bias_gelu(graph: onnx.GraphProto) -> None:
    g = _Graph(graph)
    for gelu in _standard(graph, "Gelu"):
        linear = g.linear(gelu.input[0])
        fused_op = GELU_FUSED.get(_attr(gelu, "approximate", "none"))
        if linear is not None and fused_op is not None:
            gelu.CopyFrom(helper.make_node(
                fused_op, [linear[0].output[0], linear[1]], list(gelu.output), name=f"{gelu.name}_bias", domain=MS_DOMAIN,
            ))


def _remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes no graph output depends on, then initializers no node reads."""
    needed = {o.name for o in graph.output}
    live: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
