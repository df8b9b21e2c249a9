"""Fused kernels for the linear attentions of MobileViTv2 and SwiftFormer.

- ``separable_attention(q, k, v, backend="auto")``: MobileViTv2's separable self-attention, fused;
- ``separable_attention_qkv(qkv, backend="auto")``: the same on the packed ``qkv_proj`` output,
  its gradient written into one tensor;
- ``separable_attention_layer(x, qkv_weight, qkv_bias, out_weight, out_bias)``: the whole
  layer, fused, without the keys (what ``SeparableAttention`` runs by default);
- ``additive_attention(q, k, w_g, variant=..., backend="auto")``: SwiftFormer's efficient
  additive attention, fused;
- ``SeparableAttention``, ``EfficientAdditiveAttention``: drop-in modules with the public
  parameter names, so checkpoints load;
- ``fuse_(model)``: swap the attention of a transformers/timm model for the fused one in place;
- ``models``: reference MobileViTv2 (classification, DeepLabV3) and SwiftFormer, weight conversion;
- ``available_backends()``: what runs on this machine; ``reference``: the plain-PyTorch maths.
"""

from . import compile_workarounds, models
from .backends import available_backends
from .layer import separable_attention_layer
from .models import fuse_
from .nn import EfficientAdditiveAttention, SeparableAttention
from .ops import additive_attention, separable_attention, separable_attention_qkv
from .reference import additive_attention_reference, separable_attention_reference

__all__ = [
    "EfficientAdditiveAttention",
    "SeparableAttention",
    "additive_attention",
    "additive_attention_reference",
    "available_backends",
    "fuse_",
    "models",
    "separable_attention",
    "separable_attention_layer",
    "separable_attention_qkv",
    "separable_attention_reference",
]
__version__ = "0.1.0"

# An inductor bug that fused models meet under torch.compile on CPU (docs/compile.md).
compile_workarounds.install()
