"""PyTorch (transformers) with `scaled_dot_product_attention`: the fast PyTorch baseline."""

from runtime.backends.torch_eager import TorchEagerBackend


class TorchSdpaBackend(TorchEagerBackend):
    name = "torch-sdpa"
    attn_implementation = "sdpa"
