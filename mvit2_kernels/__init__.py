"""Fused kernels for the linear attentions of MobileViTv2 (separable self-attention).

``separable_attention(q, k, v, backend="auto")`` is the fused op; ``available_backends()`` lists
what runs on this machine; ``reference`` holds the plain-PyTorch maths every kernel is held to.
"""

from .backends import available_backends
from .ops import separable_attention
from .reference import separable_attention_reference

__all__ = ["available_backends", "separable_attention", "separable_attention_reference"]
__version__ = "0.1.0"
