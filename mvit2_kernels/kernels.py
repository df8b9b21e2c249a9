"""The one table from (op, backend) to the kernel that runs it.

    kernel("separable_attention_forward", "cpu")     -> torch.ops.mvit2.separable_attention_forward
    kernel("separable_attention_forward", "triton")  -> the Triton op of the same name

``"cpu"`` and ``"cuda"`` are the same C++ op (schemas in ``csrc/ops.cpp``): the dispatcher sends
it to the kernel of the tensors' device. The Triton ops are imported on first use, since that
imports triton. The ``separable_layer_project_*`` ops exist on CPU only. Every ``*_forward`` op is
differentiable (``mvit2_kernels.autograd``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import backends
from .autograd import register_autograd

__all__ = ["OPS", "kernel"]

OPS = (
    "separable_attention_forward",
    "separable_attention_forward_out",
    "separable_attention_backward",
    "separable_attention_qkv_forward",
    "separable_attention_qkv_backward",
    "additive_attention_forward",
    "additive_attention_backward",
    "separable_layer_context_forward",
    "separable_layer_context_backward",
    "separable_layer_epilogue_forward",
    "separable_layer_epilogue_backward",
    "separable_layer_project_forward",
    "separable_layer_project_backward",
    "separable_layer_project_weight_backward",
    "separable_layer_project_input_backward",
)
CPP: dict[str, Callable] = {}
if backends.compiled():
    CPP = {op: getattr(torch.ops.mvit2, op) for op in OPS}
    register_autograd()  # torch.ops.mvit2.*_forward become differentiable


def kernel(op: str, backend: str) -> Callable:
    """The kernel of ``op`` (a name of ``OPS``) on a concrete backend (``"cpu"``, ``"cuda"`` or
    ``"triton"``; see :func:`mvit2_kernels.backends.resolve_backend`)."""
    if backend == "triton":
        from .triton import KERNELS

        return KERNELS[op]
    return CPP[op]
