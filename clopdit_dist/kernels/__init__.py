"""Triton kernels for the DiT core, each beside its PyTorch reference.

``attention`` (FlashAttention-2 style, forward and backward), ``layernorm_modulate`` and
``gated_residual`` (adaLN-Zero) all take ``backend="auto" | "triton" | "torch"``: ``auto``
runs Triton on CUDA and the reference elsewhere.

``kernels.attention`` is the function; the module of the same name (kernels, tiling,
reference) is ``importlib.import_module("clopdit_dist.kernels.attention")``, and
``from clopdit_dist.kernels.attention import ...`` works as usual.
"""

from .attention import attention, attention_reference
from .modulate import (gated_residual, gated_residual_reference, layernorm_modulate,
                       layernorm_modulate_reference)

__all__ = ["attention", "attention_reference", "layernorm_modulate", "layernorm_modulate_reference",
           "gated_residual", "gated_residual_reference"]
