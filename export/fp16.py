"""fp32 ONNX -> mixed-precision fp16 ONNX: fp16 weights and compute, float32 inputs and outputs.

TensorRT 11 takes precision from the graph (strongly typed networks), so this file *is* the fp16
engine's precision spec. LayerNormalization runs in fp32 (a Cast on each side): its variance
overflows fp16 on real activations. Softmax lives inside the fused `Attention` op, whose
implementations accumulate in fp32; in a decomposed graph Softmax is kept in fp32 too.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP32_OPS = frozenset({"LayerNormalization", "Softmax"})


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    fp16 = onnx.ModelProto()
    fp16.CopyFrom(model)
    graph = fp16.graph
    del graph.value_info[:]
    inits = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT}

    # Initializers read by fp16 nodes become fp16; an fp32 op's parameters stay fp32 (with an fp16
    # twin when the exporter shared one tensor between both kinds of consumer).
    fp32_params = {x for n in graph.node if n.op_type in FP32_OPS for x in n.input[1:]}
    fp16_params = {x for n in graph.node if n.op_type not in FP32_OPS for x in n.input}
    for name in inits.keys() & fp16_params:
        array = numpy_helper.to_array(inits[name]).astype(np.float16)
        if name in fp32_params:
            graph.initializer.append(numpy_helper.from_array(array, f"{name}__fp16"))
        else:
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
    twins = {name: f"{name}__fp16" for name in inits.keys() & fp16_params & fp32_params}

    nodes: list[onnx.NodeProto] = []
    rename: dict[str, str] = {}
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            rename[inp.name] = f"{inp.name}__fp16"
            nodes.append(_cast(inp.name, rename[inp.name], TensorProto.FLOAT16))
    outputs = {o.name for o in graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    rename.update({y: f"{y}__fp16" for y in outputs})  # nodes that read a graph output read its fp16 twin

    for node in graph.node:
        fp32_node = node.op_type in FP32_OPS
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
            elif not fp32_node and x in twins:
                node.input[i] = twins[x]
        _constants_to_fp16(node)
        if fp32_node:
            # fp16 activation in, fp16 activation out; fp32 inside.
            x = node.input[0]
            node.input[0] = f"{x}__fp32_{node.name}"
            nodes.append(_cast(x, node.input[0], TensorProto.FLOAT))
        produced = list(node.output)
        for i, y in enumerate(produced):
            if fp32_node and i == 0:
                node.output[0] = f"{y}__fp32"
            elif y in outputs:
                node.output[i] = f"{y}__fp16"
        nodes.append(node)
        if fp32_node:
            target = f"{produced[0]}__fp16" if produced[0] in outputs else produced[0]
            nodes.append(_cast(node.output[0], target, TensorProto.FLOAT16))
        for y in produced:
            if y in outputs:
                nodes.append(_cast(f"{y}__fp16", y, TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    return fp16


def _cast(src: str, dst: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], to=to, name=f"cast_{dst}")


def _constants_to_fp16(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        constant = node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value"
        if constant and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
