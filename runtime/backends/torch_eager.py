"""PyTorch (transformers) with its eager attention: the reference every exported model is compared to."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.backends.base import Backend


class TorchEagerBackend(Backend):
    name = "torch-eager"
    attn_implementation = "eager"

    def __init__(self, *args: Any, threads: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads = threads
        self.model: Any = None

    def activate(self) -> None:
        import torch

        from runtime.checkpoints import load_checkpoint

        if self.threads:
            torch.set_num_threads(self.threads)
        loaded = load_checkpoint(self.meta.checkpoint, self.meta.weights, self.meta.task, self.attn_implementation)
        self.model = loaded.model
        self.output_names = loaded.output_names

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = model_outputs(self.model, torch.from_numpy(pixel_values), self.output_names)
        return {k: v.numpy() for k, v in zip(self.output_names, out)}

    def deactivate(self) -> None:
        self.model = None


def model_outputs(model: Any, pixel_values: Any, output_names: list[str]) -> tuple[Any, ...]:
    """The tensors an export names, from a transformers DeiT/ViT model (the ONNX graph's outputs)."""
    if output_names == ["embedding"]:
        return (model(pixel_values=pixel_values).last_hidden_state[:, 0],)
    out = model(pixel_values=pixel_values)
    return tuple(getattr(out, name) for name in output_names)
