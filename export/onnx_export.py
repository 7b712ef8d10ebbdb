"""PyTorch DeiT -> ONNX with one fused `Attention` op per encoder layer (or a decomposed graph)."""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from contextlib import redirect_stdout

import onnx
import torch

from runtime.checkpoints import LoadedCheckpoint, model_outputs
from runtime.errors import DeitError

# opset 23 introduced the standard Attention op; opset 18 is what TensorRT < 10.14 and ORT's quantizer accept.
OPSET = {"fused": 23, "decomposed": 18}


class ExportError(DeitError):
    """The exporter could not produce the graph this project needs; nothing was written."""


class NamedOutputs(torch.nn.Module):
    """Return a tuple of the named tensors, so the ONNX graph's outputs get stable names."""

    def __init__(self, model: torch.nn.Module, output_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = output_names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return model_outputs(self.model, pixel_values, self.output_names)


def export_onnx(ckpt: LoadedCheckpoint, attention: str = "fused") -> onnx.ModelProto:
    """Export with torch's dynamo exporter; the batch axis is dynamic.

    `fused` (opset 23) lowers each `scaled_dot_product_attention` call to one ONNX `Attention` node;
    `decomposed` (opset 18) gives MatMul/Softmax/MatMul with Q and K scaled before the first MatMul,
    the pattern TensorRT still fuses when it lacks the `Attention` op.
    """
    if attention not in OPSET:
        raise ExportError(f"--attention must be one of {', '.join(OPSET)}, not {attention!r}")
    if ckpt.model.config._attn_implementation != "sdpa":
        raise ExportError("export needs the model loaded with attn_implementation='sdpa'")
    meta = ckpt.meta
    h, w = meta.preprocessing.input_size
    example = torch.randn(2, 3, h, w)
    wrapper = NamedOutputs(ckpt.model, meta.output_names).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=OPSET[attention],
                input_names=["pixel_values"],
                output_names=meta.output_names,
                dynamic_shapes={"pixel_values": {0: batch}},
                optimize=True,
                verbose=False,
            )
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    # The exporter's value_info goes stale after its own optimisation passes and breaks ORT's
    # quantizer ("Inferred shape and existing shape differ"); shapes are re-inferred where needed.
    del model.graph.value_info[:]
    check_attention(model, meta.num_layers, attention)
    return model


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def check_attention(model: onnx.ModelProto, num_layers: int, attention: str) -> None:
    """Fail unless the graph has exactly one attention block per encoder layer, in the asked form."""
    ops = op_counts(model)
    if attention == "fused" and ops["Attention"] != num_layers:
        raise ExportError(f"expected {num_layers} ONNX Attention nodes (one per layer), found {ops['Attention']}")
    if attention == "decomposed" and (ops["Attention"] or ops["Softmax"] != num_layers):
        raise ExportError(
            f"expected {num_layers} Softmax and no Attention nodes, found {ops['Softmax']} and {ops['Attention']}"
        )


def tool_versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


