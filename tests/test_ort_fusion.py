"""export.ort_fusion: ONNX Runtime's fused-op graph made from real exports of tiny DeiTs, run in ORT CPU."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY, save_tiny_checkpoint
from onnx import TensorProto, helper

from export.ort_fusion import MS_DOMAIN, OrtFusionError, fuse_for_ort, to_ort_fp16
from export.pipeline import ExportOptions, export_checkpoint
from runtime.checkpoints import load_checkpoint, model_outputs

LAYERS, HEADS, HIDDEN = TINY["num_hidden_layers"], TINY["num_attention_heads"], TINY["hidden_size"]


class Exported:
    def __init__(self, model: onnx.ModelProto, torch_model: torch.nn.Module, output_names: list[str]) -> None:
        self.model, self.torch_model, self.output_names = model, torch_model, output_names


@pytest.fixture(scope="module", params=["distilled", "vit"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """model.onnx of a tiny DeiT with every parameter random, and the PyTorch model it was exported from.

    Hugging Face's init leaves every bias 0 and every LayerNorm weight 1 (and the exporter then
    shares one initializer between them): a bias folded into the wrong op, or q/k/v packed in the
    wrong order, would not change a single output.
    """
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}", request.param)
    torch_model: Any = load_checkpoint(str(path)).model  # a transformers model: it has save_pretrained
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    torch_model.save_pretrained(path)
    out = tmp_path_factory.mktemp("artifacts")
    export_checkpoint(ExportOptions(str(path), out_root=out, fp16=False, progress=False))
    names = ["logits", "cls_logits", "distillation_logits"] if request.param == "distilled" else ["logits"]
    return Exported(onnx.load(str(out / path.name / "model.onnx")), torch_model, names)


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {name: np.asarray(y) for name, y in zip(names, sess.run(names, {"pixel_values": x}))}


def _images(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def test_every_layer_is_fused_and_the_interface_kept(exported: Exported) -> None:
    original = exported.model.SerializeToString()
    fused, counts = fuse_for_ort(exported.model, HEADS)
    assert exported.model.SerializeToString() == original, "the input model must not be modified"

    # Per layer: one Attention, one BiasGelu, and two residual Add + LayerNorm pairs (after attention, and
    # after the MLP into the next layer's or the final LayerNorm). Only the embeddings' LayerNorm is left.
    assert counts == {"Attention": LAYERS, "BiasGelu": LAYERS, "SkipLayerNormalization": 2 * LAYERS}
    ops = Counter((n.domain, n.op_type) for n in fused.graph.node)
    assert ops[("", "Attention")] == ops[("", "Gelu")] == ops[("", "Softmax")] == 0
    assert ops[("", "LayerNormalization")] == 1
    assert ops[("", "MatMul")] == 3 * LAYERS  # output projection, fc1 and fc2; q, k and v are in Attention
    inits = {i.name: i for i in fused.graph.initializer}
    for node in (n for n in fused.graph.node if (n.domain, n.op_type) == (MS_DOMAIN, "Attention")):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == HEADS
        assert math.isclose(attrs["scale"], 1 / math.sqrt(HIDDEN // HEADS), rel_tol=1e-6)
        assert list(inits[node.input[1]].dims) == [HIDDEN, 3 * HIDDEN] and list(inits[node.input[2]].dims) == [3 * HIDDEN]
    for node in (n for n in fused.graph.node if n.op_type == "SkipLayerNormalization"):
        assert len(node.input) == 5, "the bias Add of the residual branch is folded in"

    assert [i.name for i in fused.graph.input] == ["pixel_values"]
    assert fused.graph.input[0].type == exported.model.graph.input[0].type  # dynamic batch included
    assert [o.name for o in fused.graph.output] == exported.output_names
    assert list(fused.metadata_props) == list(exported.model.metadata_props)
    onnx.checker.check_model(fused)


@pytest.mark.parametrize("batch", [1, 3, 9])
def test_fused_graph_matches_pytorch(exported: Exported, batch: int) -> None:
    fused, _ = fuse_for_ort(exported.model, HEADS)
    x = _images(batch)
    got = _run(fused, x)
    with torch.inference_mode():
        want = model_outputs(exported.torch_model, torch.from_numpy(x), exported.output_names)
    assert list(got) == exported.output_names
    for name, reference in zip(exported.output_names, want):
        np.testing.assert_allclose(got[name], reference.numpy(), atol=1e-4, rtol=0, err_msg=name)


def test_fp16_variant_keeps_fp32_io_and_layer_norms(exported: Exported) -> None:
    """ORT CPU has no fp16 kernels for most of these ops and runs them in fp32 behind Casts it inserts
    itself: this checks the conversion (types, Cast placement, weight rounding), not CUDA's fp16 kernels."""
    fused, counts = fuse_for_ort(exported.model, HEADS)
    fp16 = to_ort_fp16(fused)
    graph = fp16.graph
    assert [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]] == [
        (name, TensorProto.FLOAT) for name in ["pixel_values", *exported.output_names]
    ]
    assert list(fp16.metadata_props) == list(fused.metadata_props)
    assert Counter(n.op_type for n in graph.node if n.domain == MS_DOMAIN) == counts
    inits = {i.name: i.data_type for i in graph.initializer}
    producer = {y: n for n in graph.node for y in n.output}
    weights = [n.input[1] for n in graph.node if n.op_type in ("MatMul", "Attention")]
    assert weights and all(inits[w] == TensorProto.FLOAT16 for w in weights)

    def fp32(name: str) -> bool:
        node = producer.get(name)
        if node is None:
            return inits[name] == TensorProto.FLOAT
        return node.op_type == "SkipLayerNormalization" or (
            node.op_type == "Cast" and helper.get_attribute_value(node.attribute[0]) == TensorProto.FLOAT
        )

    norms = [n for n in graph.node if n.op_type == "SkipLayerNormalization"]
    assert all(fp32(x) for n in norms for x in n.input if x)
    residual = [n for n in norms if any(producer.get(n.input[1]) is m for m in norms)]
    assert len(residual) == 2 * LAYERS - 1, "the residual stream passes from one fp32 SkipLayerNorm to the next"

    x = _images(3)
    want, got = _run(fused, x), _run(fp16, x)
    for name in exported.output_names:
        cosine = (want[name] * got[name]).sum(1) / np.linalg.norm(want[name], axis=1) / np.linalg.norm(got[name], axis=1)
        assert cosine.min() > 0.9999, name
        np.testing.assert_allclose(got[name], want[name], atol=2e-3 * np.abs(want[name]).max(), rtol=0, err_msg=name)


def _mask_masks(model: onnx.ModelProto) -> None:
    mask = next(n for n in model.graph.node if n.op_type == "Attention").input[3]
    producer = {y: n for n in model.graph.node for y in n.output}
    init = next(i for i in model.graph.initializer if i.name == producer[mask].input[0])
    init.CopyFrom(helper.make_tensor(init.name, TensorProto.BOOL, init.dims, [False] + [True] * (math.prod(init.dims) - 1)))


def _weight_is_an_input(model: onnx.ModelProto) -> None:
    producer = {y: n for n in model.graph.node for y in n.output}
    q = next(n for n in model.graph.node if n.op_type == "Attention").input[0]
    reshape = producer[producer[q].input[0]]
    add = producer[reshape.input[0]]
    matmul = next(producer[x] for x in add.input if x in producer and producer[x].op_type == "MatMul")
    init = next(i for i in model.graph.initializer if i.name == matmul.input[1])
    model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    model.graph.initializer.remove(init)


@pytest.mark.parametrize(
    ("break_it", "heads", "message"),
    [
        (lambda m: None, HEADS + 1, "heads"),
        (_mask_masks, HEADS, "mask"),
        (_weight_is_an_input, HEADS, "initializer"),
    ],
    ids=["wrong-num-heads", "masking-mask", "weight-not-initializer"],
)
def test_unfusable_graphs_are_refused(
    exported: Exported, break_it: Callable[[onnx.ModelProto], None], heads: int, message: str
) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(exported.model)
    break_it(model)
    with pytest.raises(OrtFusionError, match=message) as err:
        fuse_for_ort(model, heads)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_decomposed_export_is_refused(tmp_path: Path) -> None:
    path = save_tiny_checkpoint(tmp_path / "tiny")
    export_checkpoint(ExportOptions(str(path), out_root=tmp_path / "out", attention="decomposed", fp16=False, progress=False))
    with pytest.raises(OrtFusionError, match="no ONNX Attention node"):
        fuse_for_ort(onnx.load(str(tmp_path / "out" / "tiny" / "model.onnx")), HEADS)
