"""The fused ops' public functions: input checks, autocast, backend choice; and fake kernels.

Every backend implements the same ops (schemas in ``csrc/ops.cpp``):

    separable_attention_forward(q, k, v) -> (y, ctx)
    separable_attention_forward_out(q, k, v, y!) -> ctx        (y written in place)
    separable_attention_backward(grad_y, q, k, v, ctx) -> (dq, dk, dv)
    separable_attention_qkv_forward(qkv) -> (y, ctx)
    separable_attention_qkv_backward(grad_y, qkv, ctx) -> dqkv

The C++ kernels are ``torch.ops.mvit2.*`` (CPU and CUDA dispatch keys); Triton's are
``torch.ops.mvit2.*_triton`` (``mvit2_kernels/triton``). Both carry fake kernels, so
``torch.compile(fullgraph=True)`` and ``torch.export`` trace them, and autograd
(``mvit2_kernels.autograd``), so every ``*_forward`` op is differentiable by itself (not
``separable_attention_forward_out``, which writes a given y).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .checks import (
    acc_dtype,
    autocast_inputs,
    autocast_off,
    check_additive_inputs,
    check_separable_inputs,
    check_separable_out,
    check_separable_qkv_input,
)
from .kernels import kernel
from .reference import additive_attention_reference, separable_attention_reference

__all__ = ["additive_attention", "separable_attention", "separable_attention_qkv"]


def separable_attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto",
                        out: Tensor | None = None) -> Tensor:
    """MobileViTv2 separable self-attention, fused: ``relu(v) * sum_n softmax_N(q) * k``.

    Args:
        q: ``Tensor[B, 1, P, N]`` context scores (the first channel of ``qkv_proj``'s output).
        k: ``Tensor[B, C, P, N]`` keys.
        v: ``Tensor[B, C, P, N]`` values. Views of one ``qkv`` tensor are read in place.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``
            (see :func:`mvit2_kernels.available_backends`).
        out: for inference, a preallocated ``Tensor[B, C, P, N]`` to write the result into
            (contiguous, in the inputs' dtype and device, sharing no memory with them). On a
            CPU, reusing one saves the page faults a fresh large output costs on every call
            (docs/performance.md). Not differentiable: raises if gradients are being recorded
            for q, k, v or out. As with PyTorch's own ``out=`` calls, autocast leaves such a
            call alone: it runs in the inputs' dtype.

    Returns:
        ``Tensor[B, C, P, N]`` in the input dtype (fp16/bf16 are accumulated in float32); ``out``
        itself if given.

    Differentiable once with respect to q, k and v (without ``out``); double backward raises.
    """
    if out is None:  # out= calls are not autocast, as torch's own are not
        q, k, v = autocast_inputs(q, k, v)
    check_separable_inputs(q, k, v)
    if out is not None:
        check_separable_out(out, q, k, v)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, out)):
            raise RuntimeError(
                "separable_attention(out=...) does not record gradients, but one of q, k, v, "
                "out requires grad: call it under torch.no_grad() or torch.inference_mode(), "
                "or without out")
    backend = backends.resolve_backend(backend, q.device)
    with autocast_off(q.device):
        if backend == "reference":
            y = separable_attention_reference(q, k, v)
            return y if out is None else out.copy_(y)
        if out is None:
            return kernel("separable_attention_forward", backend)(q, k, v)[0]
        kernel("separable_attention_forward_out", backend)(q, k, v, out)
        return out


if backends.compiled():  # the schemas exist: give them fake kernels

    @torch.library.register_fake("mvit2::separable_attention_forward")
    def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, C, P, _ = k.shape
        return k.new_empty(k.shape), k.new_empty((B, C, P, 1), dtype=acc_dtype(k.dtype))

    @torch.library.register_fake("mvit2::separable_attention_forward_out")
    def _(q: Tensor, k: Tensor, v: Tensor, y: Tensor) -> Tensor:
        B, C, P, _ = k.shape
        return k.new_empty((B, C, P, 1), dtype=acc_dtype(k.dtype))

    @torch.library.register_fake("mvit2::separable_attention_backward")
    def _(grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def separable_attention_qkv(qkv: Tensor, *, backend: str = "auto") -> Tensor:
    """:func:`separable_attention` on ``q, k, v = qkv.split([1, C, C], dim=1)``, with one
    gradient for qkv.

    The forward reads the three channel views in place, as :func:`separable_attention` does;
    the backward writes dq, dk and dv straight into one contiguous ``dqkv``, where autograd
    through the split would concatenate them into a new tensor (one more pass over the data).

    Args:
        qkv: ``Tensor[B, 1 + 2C, P, N]``, the output of ``qkv_proj`` (an odd channel count >= 3).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``Tensor[B, C, P, N]`` in the input dtype (fp16/bf16 are accumulated in float32).

    Differentiable once with respect to qkv; double backward raises.
    """
    (qkv,) = autocast_inputs(qkv)
    C = check_separable_qkv_input(qkv)
    backend = backends.resolve_backend(backend, qkv.device)
    with autocast_off(qkv.device):
        if backend == "reference":
            return separable_attention_reference(*qkv.split([1, C, C], dim=1))
        return kernel("separable_attention_qkv_forward", backend)(qkv)[0]


if backends.compiled():

    @torch.library.register_fake("mvit2::separable_attention_qkv_forward")
    def _(qkv: Tensor) -> tuple[Tensor, Tensor]:
        B, C3, P, N = qkv.shape
        C = (C3 - 1) // 2
        return (qkv.new_empty((B, C, P, N)),
                qkv.new_empty((B, C, P, 1), dtype=acc_dtype(qkv.dtype)))

    @torch.library.register_fake("mvit2::separable_attention_qkv_backward")
    def _(grad_y: Tensor, qkv: Tensor, ctx: Tensor) -> Tensor:
        return qkv.new_empty(qkv.shape)  # contiguous, whatever qkv's strides


# --- Efficient additive attention (SwiftFormer), docs/design.md §2 --------------------------------
#
#     additive_attention_forward(q, k, w_g, variant) -> (out, qn, g, a_norm)
#     additive_attention_backward(grad_out, grad_qn, q, k, w_g, g, a_norm, variant)
#         -> (dq, dk, dw_g)
#
# g = G [B, D] and a_norm = ||a|| over N [B] are float32 (float64 for float64 inputs).


def additive_attention(
    q: Tensor, k: Tensor, w_g: Tensor, *, variant: str = "normalize", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """SwiftFormer's efficient additive attention, fused, up to its ``proj`` Linear.

    ``qn, kn = normalize(q), normalize(k)`` over D; token weights ``a = (qn @ w_g) * D**-0.5``,
    turned into ``alpha`` over the N tokens; global query ``G = sum_n alpha[n] qn[n]``. The layer
    then computes ``final(proj(G * kn) + qn)``.

    Args:
        q: ``Tensor[B, N, D]``, the output of ``to_query``.
        k: ``Tensor[B, N, D]``, the output of ``to_key``. Rows are read in place with their
            strides; only a strided D axis is copied.
        w_g: ``Tensor[D, 1]``, the learned weight vector, in the dtype of q and k.
        variant: ``"normalize"``: ``alpha = a / ||a||`` over N (the fixed SwiftFormer code, timm);
            ``"softmax"``: softmax over the size-1 last axis (the original release,
            transformers), so every ``alpha`` is 1 and ``G = sum_n qn[n]``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``(G * kn, qn)``, both ``Tensor[B, N, D]`` in the input dtype (fp16/bf16 accumulated in
        float32). Differentiable once with respect to q, k and w_g.
    """
    q, k, w_g = autocast_inputs(q, k, w_g)
    check_additive_inputs(q, k, w_g, variant)
    backend = backends.resolve_backend(backend, q.device)
    with autocast_off(q.device):
        if backend == "reference":
            return additive_attention_reference(q, k, w_g, variant)
        return kernel("additive_attention_forward", backend)(q, k, w_g, variant)[:2]


if backends.compiled():  # the schemas exist: give them fake kernels

    @torch.library.register_fake("mvit2::additive_attention_forward")
    def _(q: Tensor, k: Tensor, w_g: Tensor, variant: str):
        B, _N, D = k.shape
        acc = acc_dtype(k.dtype)
        return (
            k.new_empty(k.shape),
            q.new_empty(q.shape),
            k.new_empty((B, D), dtype=acc),
            k.new_empty((B,), dtype=acc),
        )

    @torch.library.register_fake("mvit2::additive_attention_backward")
    def _(grad_out, grad_qn, q, k, w_g, g, a_norm, variant: str):
        return q.new_empty(q.shape), k.new_empty(k.shape), w_g.new_empty(w_g.shape)
