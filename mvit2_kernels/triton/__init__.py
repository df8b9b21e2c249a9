"""Triton kernels, one module per op, and ``KERNELS``: op name -> its Triton op.

Importing this package imports triton and registers the ``torch.ops.mvit2.*_triton`` ops;
``mvit2_kernels.kernels`` does so on the first call with ``backend="triton"``, so machines
without triton still import ``mvit2_kernels``.
"""

from ..autograd import register_autograd
from .additive_attention import additive_attention_backward, additive_attention_forward
from .separable_attention import (
    separable_attention_backward,
    separable_attention_forward,
    separable_attention_forward_out,
    separable_attention_qkv_backward,
    separable_attention_qkv_forward,
)
from .separable_layer import (
    separable_layer_context_backward,
    separable_layer_context_forward,
    separable_layer_epilogue_backward,
    separable_layer_epilogue_forward,
)

KERNELS = {
    "separable_attention_forward": separable_attention_forward,
    "separable_attention_forward_out": separable_attention_forward_out,
    "separable_attention_backward": separable_attention_backward,
    "separable_attention_qkv_forward": separable_attention_qkv_forward,
    "separable_attention_qkv_backward": separable_attention_qkv_backward,
    "additive_attention_forward": additive_attention_forward,
    "additive_attention_backward": additive_attention_backward,
    "separable_layer_context_forward": separable_layer_context_forward,
    "separable_layer_context_backward": separable_layer_context_backward,
    "separable_layer_epilogue_forward": separable_layer_epilogue_forward,
    "separable_layer_epilogue_backward": separable_layer_epilogue_backward,
}

register_autograd("_triton")  # torch.ops.mvit2.*_forward_triton become differentiable
