"""Fused kernels for the linear attentions of MobileViTv2 and SwiftFormer.

- ``separable_attention(q, k, v, backend="auto")``: MobileViTv2's separable self-attention, fused;
- ``additive_attention(q, k, w_g, variant=..., backend="auto")``: SwiftFormer's efficient
  additive attention, fused;
- ``SeparableAttention``: the drop-in module (``qkv_proj``/``out_proj``, checkpoints load);
- ``fuse_(model)``: swap the attention of a transformers/timm model for the fused one in place;
- ``models``: reference MobileViTv2 (classification, DeepLabV3) and SwiftFormer, weight conversion;
- ``available_backends()``: what runs on this machine; ``reference``: the plain-PyTorch maths.
"""

from . import models
from .backends import available_backends
from .models import fuse_
from .nn import SeparableAttention
from .ops import additive_attention, separable_attention
from .reference import separable_attention_reference

__all__ = [
    "SeparableAttention",
    "additive_attention",
    "available_backends",
    "fuse_",
    "models",
    "separable_attention",
    "separable_attention_reference",
]
__version__ = "0.1.0"
