"""The fused ops as differentiable functions: input checks, backend choice, autograd, fake kernels.

Every backend implements the same two ops (schemas in ``csrc/ops.cpp``):

    separable_attention_forward(q, k, v) -> (y, ctx)
    separable_attention_backward(grad_y, q, k, v, ctx) -> (dq, dk, dv)

The C++ kernels are ``torch.ops.mvit2.*`` (CPU and CUDA dispatch keys); Triton's are
``torch.ops.mvit2.*_triton`` (``mvit2_kernels/triton``). Both carry fake kernels, so
``torch.compile(fullgraph=True)`` and ``torch.export`` trace them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .reference import separable_attention_reference

__all__ = ["separable_attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def separable_attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto") -> Tensor:
    """MobileViTv2 separable self-attention, fused: ``relu(v) * sum_n softmax_N(q) * k``.

    Args:
        q: ``Tensor[B, 1, P, N]`` context scores (the first channel of ``qkv_proj``'s output).
        k: ``Tensor[B, C, P, N]`` keys.
        v: ``Tensor[B, C, P, N]`` values. Views of one ``qkv`` tensor are read in place.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``
            (see :func:`mvit2_kernels.available_backends`).

    Returns:
        ``Tensor[B, C, P, N]`` in the input dtype (fp16/bf16 are accumulated in float32).

    Differentiable once with respect to q, k and v; double backward raises.
    """
    _check_inputs(q, k, v)
    backend = backends.resolve_backend(backend, q.device)
    if backend == "reference":
        return separable_attention_reference(q, k, v)
    return SeparableAttentionFunction.apply(q, k, v, backend)


class SeparableAttentionFunction(torch.autograd.Function):
    """Autograd over one backend's forward/backward ops. Saves q, k, v (no copies) and ctx."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        y, attn_ctx = _forward_op(backend)(q, k, v)
        ctx.save_for_backward(q, k, v, attn_ctx)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        q, k, v, attn_ctx = ctx.saved_tensors
        grads = _backward_op(ctx.backend)(grad_y, q, k, v, attn_ctx)
        if torch.is_grad_enabled():  # create_graph=True: make a second backward fail loudly
            grads = _NoDoubleBackward.apply("separable_attention", grad_y, q, k, v, *grads)
        return *grads, None


class _NoDoubleBackward(torch.autograd.Function):
    """Passes gradients through, tied to the inputs they depend on, so that differentiating them
    raises instead of silently treating them as constants."""

    @staticmethod
    def forward(ctx, op: str, *tensors: Tensor):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[4:])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.op} is differentiable once: double backward (differentiating "
            "its gradients, e.g. after create_graph=True) is not supported"
        )


def _forward_op(backend: str):
    if backend == "triton":
        from .triton.separable_attention import separable_attention_forward

        return separable_attention_forward
    return torch.ops.mvit2.separable_attention_forward


def _backward_op(backend: str):
    if backend == "triton":
        from .triton.separable_attention import separable_attention_backward

        return separable_attention_backward
    return torch.ops.mvit2.separable_attention_backward


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """DESIGN §5: errors name the argument and the expected shape."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "[B, 1, P, N]" if name == "q" else "[B, C, P, N]"
            raise ValueError(f"{name} must be a 4-D tensor {want}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("q", q), ("v", v)):
        if t.dtype != k.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but k has {k.dtype}: use one dtype")
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}: use one device")
    B, _C, P, N = k.shape
    if tuple(q.shape) != (B, 1, P, N):
        raise ValueError(
            f"q must have shape [B, 1, P, N] = {[B, 1, P, N]} to match "
            f"k [B, C, P, N] = {list(k.shape)}, got {list(q.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(
            f"v must have shape [B, C, P, N] = {list(k.shape)} like k, got {list(v.shape)}"
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if backends.compiled_cpu():

    @torch.library.register_fake("mvit2::separable_attention_forward")
    def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, C, P, _ = k.shape
        return k.new_empty(k.shape), k.new_empty((B, C, P, 1), dtype=_acc_dtype(k.dtype))

    @torch.library.register_fake("mvit2::separable_attention_backward")
    def _(grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
