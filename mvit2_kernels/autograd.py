"""Autograd registered on the ops themselves, so that ``torch.ops.mvit2.*`` are differentiable.

Each forward op's backward is its ``*_backward`` op (``torch.library.register_autograd``, as
pytorch/extension-cpp does). The second outputs (``ctx``, ``s``, ``g``, ``a_norm``, the kept
``v`` and ``y``) are statistics saved for the backward: like flash-attention's logsumexp they
are not differentiable, and autograd treats them as constants. The ops are differentiable once:
differentiating their gradients raises.

This module imports nothing from the package: ``mvit2_kernels.kernels`` registers the C++ ops
(CPU and CUDA share one autograd kernel) and ``mvit2_kernels.triton`` its own ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["differentiable_once", "register_autograd"]


class _NoDoubleBackward(torch.autograd.Function):
    """Passes gradients through as views, tied to the ``n`` inputs they depend on, so that
    differentiating them raises instead of silently treating them as constants."""

    @staticmethod
    def forward(ctx, op: str, n: int, *tensors: Tensor):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[n:])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.op} is differentiable once: double backward (differentiating "
            "its gradients, e.g. after create_graph=True) is not supported"
        )


def differentiable_once(op: str, inputs: tuple, grads: tuple) -> tuple:
    """``grads`` (tensors), made to raise if differentiated (after ``create_graph=True``);
    ``inputs`` are the tensors they depend on. Called at the end of a backward."""
    if not torch.is_grad_enabled():
        return grads
    inputs = tuple(t for t in inputs if t is not None)
    return _NoDoubleBackward.apply(op, len(inputs), *inputs, *grads)


def _as(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """A gradient in its input's dtype (the kernels return weight gradients in float32)."""
    return None if grad is None or like is None else grad.to(like.dtype)


# --- one (setup_context, backward) pair per op; ``bwd`` is the op's backward op ---------------


def _separable_attention(bwd: Callable):
    def setup(ctx, inputs, output):
        q, k, v = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(q, k, v, output[1])

    def backward(ctx, grad_y, _grad_ctx):
        q, k, v, attn_ctx = ctx.saved_tensors
        grads = bwd(grad_y, q, k, v, attn_ctx)
        return differentiable_once("separable_attention", (grad_y, q, k, v), grads)

    return setup, backward


def _separable_attention_qkv(bwd: Callable):
    def setup(ctx, inputs, output):
        (qkv,) = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(qkv, output[1])

    def backward(ctx, grad_y, _grad_ctx):
        qkv, attn_ctx = ctx.saved_tensors
        dqkv = bwd(grad_y, qkv, attn_ctx)
        return differentiable_once("separable_attention_qkv", (grad_y, qkv), (dqkv,))

    return setup, backward


def _additive_attention(bwd: Callable):
    def setup(ctx, inputs, output):
        q, k, w_g, ctx.variant = inputs
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.save_for_backward(q, k, w_g, output[2], output[3])

    def backward(ctx, grad_out, grad_qn, _grad_g, _grad_a_norm):
        q, k, w_g, g, a_norm = ctx.saved_tensors
        grads = bwd(grad_out, grad_qn, q, k, w_g, g, a_norm, ctx.variant)
        grads = differentiable_once("additive_attention", (grad_out, grad_qn, q, k, w_g), grads)
        return *grads, None

    return setup, backward


def _layer_context(bwd: Callable):
    def setup(ctx, inputs, output):
        x, w_q = inputs
        ctx.mark_non_differentiable(output[0])  # s, the softmax weights
        ctx.save_for_backward(x, w_q, *output)

    def backward(ctx, _grad_s, grad_xbar):
        x, w_q, s, xbar = ctx.saved_tensors
        dx, dw_q = bwd(grad_xbar.contiguous(), x, w_q, s, xbar)
        grads = (dx, _as(dw_q, w_q))
        return differentiable_once("separable_layer_context", (grad_xbar, x, w_q), grads)

    return setup, backward


def _layer_epilogue(bwd: Callable):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_y):
        v, attn_ctx = ctx.saved_tensors
        grads = bwd(grad_y.contiguous(), v, attn_ctx)
        return differentiable_once("separable_layer_epilogue", (grad_y, v, attn_ctx), grads)

    return setup, backward


def _layer_project(bwd: Callable):
    ops = torch.ops.mvit2

    def setup(ctx, inputs, output):
        x, w_v, b_v, attn_ctx, w_out, b_out, keep = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.keep, ctx.has_bias = keep, (b_v is not None, b_out is not None)
        ctx.save_for_backward(x, w_v, b_v, attn_ctx, w_out, b_out, *output[1:])

    def backward(ctx, grad_out, _grad_v, _grad_y):
        x, w_v, b_v, attn_ctx, w_out, b_out, v, y = ctx.saved_tensors
        if not ctx.keep:  # v and y were not written: recompute them
            with torch.no_grad():
                _, v, y = ops.separable_layer_project_forward(
                    x, w_v, b_v, attn_ctx, w_out, b_out, True)
        grad_out = grad_out.contiguous()
        dv, dctx = bwd(grad_out, v, attn_ctx, w_out)
        dx = torch.zeros_like(x)
        ops.separable_layer_project_input_backward(dx, dv, w_v)
        dw_v = ops.separable_layer_project_weight_backward(dv, x)
        dw_out = ops.separable_layer_project_weight_backward(grad_out, y)
        # db_v sums the kernel's dv, so it is tied to the inputs like the others; db_out is
        # autograd's own sum of grad_out, which differentiates correctly.
        db_v = dv.sum(dim=(0, 2, 3), dtype=w_v.dtype)
        db_out = grad_out.sum(dim=(0, 2, 3), dtype=dw_out.dtype) if ctx.has_bias[1] else None
        dx, dw_v, db_v, dctx, dw_out = differentiable_once(
            "separable_layer_project", (grad_out, x, w_v, w_out),
            (dx, _as(dw_v, w_v), db_v, dctx, _as(dw_out, w_out)))
        db_v = db_v if ctx.has_bias[0] else None
        return dx, dw_v, _as(db_v, b_v), dctx, dw_out, _as(db_out, b_out), None

    return setup, backward


_FORMULAS = {
    "separable_attention": _separable_attention,
    "separable_attention_qkv": _separable_attention_qkv,
    "additive_attention": _additive_attention,
    "separable_layer_context": _layer_context,
    "separable_layer_epilogue": _layer_epilogue,
    "separable_layer_project": _layer_project,
}


def register_autograd(suffix: str = "") -> None:
    """Registers autograd on every ``mvit2::<op>_forward<suffix>`` op that exists, with
    ``mvit2::<op>_backward<suffix>`` as its backward (``suffix="_triton"`` for the Triton ops)."""
    for op, formulas in _FORMULAS.items():
        name = f"{op}_forward{suffix}"
        if not hasattr(torch.ops.mvit2, name):  # the CPU-only project op has no Triton twin
            continue
        setup, backward = formulas(getattr(torch.ops.mvit2, f"{op}_backward{suffix}"))
        torch.library.register_autograd(f"mvit2::{name}", backward, setup_context=setup)
