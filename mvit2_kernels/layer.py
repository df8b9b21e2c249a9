"""The whole MobileViTv2 attention layer, fused: the keys are never materialised.

Since the softmax weights ``s`` sum to 1 and ``k = W_k x + b_k``, the context vector is
``ctx = W_k x̄ + b_k`` with ``x̄ = sum_n s[n] x[:, n]`` (docs/design.md §1, "The layer-level
identity"; ``docs/layer_fusion.md`` derives the backward). The layer becomes:

    s, x̄ = context(x, w_q)              one pass over x (kernel)
    ctx   = W_k x̄ + b_k                  a GEMM of B·P columns
    y     = relu(W_v x + b_v) * ctx       GEMM + epilogue (kernel)
    out   = W_o y + b_o                   GEMM

The [B, C, P, N] keys and a third of the qkv projection disappear. On CPU the two projections
and the epilogue run as one tiled kernel with our own GEMM (``separable_layer_project_*``; the
library's fp32 GEMM reaches half of oneDNN's speed on NCHW data); on CUDA and in Triton the
GEMMs are the library's (cuBLAS) around the context and epilogue kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .autograd import differentiable_once
from .checks import acc_dtype, autocast_inputs, autocast_off, check_layer_inputs
from .kernels import kernel
from .reference import separable_layer_reference

__all__ = ["separable_attention_layer"]


def separable_attention_layer(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    *,
    backend: str = "auto",
) -> Tensor:
    """MobileViTv2's attention layer ``out_proj(separable_attention(*qkv_proj(x).split(...)))``,
    computed without the keys.

    Args:
        x: ``Tensor[B, D, P, N]`` unfolded patches.
        qkv_weight: ``Tensor[1 + 2C, D, 1, 1]`` (``qkv_proj.weight``; ``[1 + 2C, D]`` too).
        qkv_bias: ``Tensor[1 + 2C]`` or None.
        out_weight: ``Tensor[D_out, C, 1, 1]`` (``out_proj.weight``; ``[D_out, C]`` too).
        out_bias: ``Tensor[D_out]`` or None.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"`` (the
            standard layer, by autograd).

    Returns:
        ``Tensor[B, D_out, P, N]`` in x's dtype; equal to the standard layer in real arithmetic
        and within rounding in floating point (the keys' rounding is gone: fp16/bf16 layers are
        slightly *more* accurate). Differentiable once in x and every parameter; the gradient
        of q's bias is exactly 0 (softmax ignores a shift of every score).
    """
    x, qkv_weight, qkv_bias, out_weight, out_bias = autocast_inputs(
        x, qkv_weight, qkv_bias, out_weight, out_bias)
    w_qkv, w_out = check_layer_inputs(x, qkv_weight, qkv_bias, out_weight, out_bias)
    backend = backends.resolve_backend(backend, x.device)
    with autocast_off(x.device):
        if backend == "reference":
            return separable_layer_reference(x, qkv_weight, qkv_bias, out_weight, out_bias)
        x = x.contiguous()
        tensors = (x, w_qkv, qkv_bias, w_out, out_bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return SeparableLayerFunction.apply(*tensors, backend)
        return _layer_forward(*tensors, backend, keep=False)[0]


class SeparableLayerFunction(torch.autograd.Function):
    """Autograd over the fused layer. Saves x and the weights (no copies), s and x̄ (B·P·(N + D)
    values), ctx, and v and y (what the standard layer's convolutions save, less the keys)."""

    @staticmethod
    def forward(ctx, x, w_qkv, b_qkv, w_out, b_out, backend: str):
        out, saved = _layer_forward(x, w_qkv, b_qkv, w_out, b_out, backend, keep=True)
        ctx.save_for_backward(x, w_qkv, b_qkv, w_out, *saved)
        ctx.backend, ctx.has_bias = backend, (b_qkv is not None, b_out is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w_qkv, b_qkv, w_out, s, xbar, attn_ctx, v, y = ctx.saved_tensors
        with autocast_off(x.device):  # backward() may be called inside the autocast region
            grads = _layer_backward(grad_out.contiguous(), x, w_qkv, b_qkv, w_out, s, xbar,
                                    attn_ctx, v, y, ctx.backend)
        d_x, d_wqkv, d_bqkv, d_wout, d_bout = grads
        # Every gradient the kernels computed is tied to the inputs (d_bout = Σ grad_out is
        # autograd's own, and differentiates correctly).
        d_x, d_wqkv, d_bqkv, d_wout = differentiable_once(
            "separable_attention_layer", (grad_out, x, w_qkv, w_out),
            (d_x, d_wqkv, d_bqkv, d_wout))
        d_bqkv = d_bqkv if ctx.has_bias[0] else None
        d_bout = d_bout if ctx.has_bias[1] else None
        return d_x, d_wqkv, d_bqkv, d_wout, d_bout, None


def _layer_forward(x, w_qkv, b_qkv, w_out, b_out, backend: str, *, keep: bool):
    """``out``, and what the backward needs when ``keep``: ``(s, x̄, ctx, v, y)``."""
    C = (w_qkv.shape[0] - 1) // 2
    w_q, w_k, w_v = w_qkv.split([1, C, C])
    b_k, b_v = (None, None) if b_qkv is None else b_qkv[1:].split([C, C])
    acc = acc_dtype(x.dtype)

    s, xbar = kernel("separable_layer_context_forward", backend)(x, w_q[0].contiguous())
    # ctx = W_k x̄ + b_k for every (b, p), in the accumulation dtype.
    attn_ctx = _per_row(w_k.to(acc), xbar)
    if b_qkv is not None:
        # q's bias shifts every score of a row alike, which the softmax ignores; but a NaN or
        # infinite one makes the standard layer's scores NaN, and 0 * b_q carries that here.
        attn_ctx += b_k.to(acc)[:, None] + 0 * b_qkv[0].to(acc)
    if _project_fused(backend, x):
        out, v, y = kernel("separable_layer_project_forward", backend)(
            x, w_v, b_v, attn_ctx, w_out, b_out, keep)
    else:
        v = _project(w_v, b_v, x)
        y = kernel("separable_layer_epilogue_forward", backend)(v, attn_ctx)
        out = _project(w_out, b_out, y)
    return out, (s, xbar, attn_ctx, v, y)


def _layer_backward(grad_out, x, w_qkv, b_qkv, w_out, s, xbar, attn_ctx, v, y, backend: str):
    """``(dx, d qkv_weight, d qkv_bias, d out_weight, d out_bias)``; docs/layer_fusion.md."""
    B, D, P, N = x.shape
    C = (w_qkv.shape[0] - 1) // 2
    w_q, w_k, w_v = w_qkv.split([1, C, C])
    acc = acc_dtype(x.dtype)

    fused = _project_fused(backend, x)
    if fused:
        d_wout = kernel("separable_layer_project_weight_backward", backend)(grad_out, y)
        dv, dctx = kernel("separable_layer_project_backward", backend)(grad_out, v, attn_ctx, w_out)
    else:
        d_wout = _weight_grad(grad_out, y).to(acc)
        dy = _project(w_out.t().contiguous(), None, grad_out)
        dv, dctx = kernel("separable_layer_epilogue_backward", backend)(dy, v, attn_ctx)
    d_bout = grad_out.sum(dim=(0, 2, 3), dtype=acc)
    if b_qkv is not None:  # a non-finite b_q: NaN scores in the standard layer (see the forward)
        dctx += 0 * b_qkv[0].to(acc)  # in place: dctx is the kernel's own output
    dv3 = dv.view(B, C, P * N)
    if fused:
        d_wv = kernel("separable_layer_project_weight_backward", backend)(dv, x)
    else:
        d_wv = _weight_grad(dv, x).to(acc)
    # ctx = W_k x̄ + b_k: dW_k = Σ_{b,p} dctx ⊗ x̄, dx̄ = W_k^T dctx.
    # One GEMM over the B·P columns (a batched one of depth P would write B partial products).
    d_wk = torch.mm(_columns(dctx), _columns(xbar).t())
    dxbar = _per_row(w_k.t().to(acc), dctx)
    if b_qkv is not None:
        # The scores' gradient ds[n] = dctx . k[n] = dx̄ . x[n] + dctx . b_k: the softmax backward
        # cancels the constant dctx . b_k, unless it is NaN (a NaN key bias); 0 * it keeps that.
        # (0 * b_k inside the sum: a finite shift that overflows must not turn into 0 * inf.)
        dxbar += torch.einsum("bcp,c->bp", dctx, 0 * b_qkv[1:C + 1].to(acc))[:, None, :]
    dx, d_wq = kernel("separable_layer_context_backward", backend)(dxbar, x, w_q[0], s, xbar)
    if fused:  # + W_v^T dv, in place
        kernel("separable_layer_project_input_backward", backend)(dx, dv, w_v)
    else:
        # A contiguous W_v^T: the library's bf16 GEMM on the transposed view is 3x slower.
        dx.view(B, D, P * N).baddbmm_(w_v.t().contiguous().expand(B, D, C), dv3)

    d_wqkv = torch.cat([d_wq[None], d_wk, d_wv])
    # q's bias shifts every score of a row alike, which the softmax ignores: its gradient Σ dq
    # is 0, written Σ_d 0 * dw_q[d] (dw_q = Σ dq x) to be NaN where autograd's Σ dq is. k's is
    # Σ_n dctx s[n] = dctx · Σ_n s[n] (1, or NaN where the scores are).
    d_bq = (0 * d_wq).sum()[None]
    d_bk = torch.einsum("bcp,bp->c", dctx, s.sum(dim=-1))
    d_bqkv = torch.cat([d_bq, d_bk, dv3.sum(dim=(0, 2), dtype=acc)])
    dt = w_qkv.dtype
    return dx, d_wqkv.to(dt), d_bqkv.to(dt), d_wout.to(dt), d_bout.to(dt)


def _weight_grad(grad: Tensor, input: Tensor) -> Tensor:
    """``Σ_{b,p,n} grad[b, :, p, n] ⊗ input[b, :, p, n]``, ``[O, I]``: one GEMM over every column
    (the library accumulates in float32 and rounds once; a batched GEMM and a sum would round B
    partial products to bf16 and write them out)."""
    B, rows, P, N = grad.shape
    as_rows = (grad.reshape(B, rows, P * N), input.reshape(B, input.shape[1], P * N))
    return torch.mm(_columns(as_rows[0]), _columns(as_rows[1]).t())


def _columns(t: Tensor) -> Tensor:
    """``t: [B, K, P]`` as the matrix ``[K, B·P]`` (a copy)."""
    B, K, P = t.shape
    return t.transpose(0, 1).reshape(K, B * P)


def _per_row(w: Tensor, t: Tensor) -> Tensor:
    """``w @ t[b, :, p]`` for every (b, p): ``w: [O, K]``, ``t: [B, K, P]`` -> contiguous
    ``[B, O, P]``, as one GEMM over the B·P columns (matmul would expand w to a batch)."""
    B, _, P = t.shape
    return (w @ _columns(t)).view(w.shape[0], B, P).transpose(0, 1).contiguous()


def _project(w: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    """A 1×1 convolution of contiguous ``x: [B, I, P, N]`` by ``w: [O, I]`` as a batched GEMM."""
    B, D_in, P, N = x.shape
    x3 = x.view(B, D_in, P * N)
    w3 = w.expand(B, *w.shape)
    out = torch.bmm(w3, x3) if b is None else torch.baddbmm(b[:, None], w3, x3)
    return out.view(B, w.shape[0], P, N)


def _project_fused(backend: str, x: Tensor) -> bool:
    """Whether the projections run as our tiled CPU kernel (fp32/fp64: for fp16/bf16 the
    library's GEMMs use the CPU's native half-precision instructions)."""
    return backend == "cpu" and x.dtype in (torch.float32, torch.float64)


if backends.compiled():  # the schemas exist: give them fake kernels

    @torch.library.register_fake("mvit2::separable_layer_context_forward")
    def _(x: Tensor, w_q: Tensor):
        B, D, P, N = x.shape
        acc = acc_dtype(x.dtype)
        return x.new_empty((B, P, N), dtype=acc), x.new_empty((B, D, P), dtype=acc)

    @torch.library.register_fake("mvit2::separable_layer_context_backward")
    def _(grad_xbar, x, w_q, s, xbar):
        return x.new_empty(x.shape), x.new_empty(w_q.shape, dtype=acc_dtype(x.dtype))

    @torch.library.register_fake("mvit2::separable_layer_epilogue_forward")
    def _(v: Tensor, ctx: Tensor):
        return v.new_empty(v.shape)

    @torch.library.register_fake("mvit2::separable_layer_epilogue_backward")
    def _(grad_y, v, ctx):
        return v.new_empty(v.shape), ctx.new_empty(ctx.shape)

    @torch.library.register_fake("mvit2::separable_layer_project_forward")
    def _(x, w_v, b_v, ctx, w_out, b_out, keep: bool):
        B, _, P, N = x.shape
        kept = (B, w_v.shape[0], P, N) if keep else (0,)
        return x.new_empty((B, w_out.shape[0], P, N)), x.new_empty(kept), x.new_empty(kept)

    @torch.library.register_fake("mvit2::separable_layer_project_backward")
    def _(grad_out, v, ctx, w_out):
        return v.new_empty(v.shape), ctx.new_empty(ctx.shape)

    @torch.library.register_fake("mvit2::separable_layer_project_weight_backward")
    def _(grad, input):
        return grad.new_empty((grad.shape[1], input.shape[1]), dtype=acc_dtype(grad.dtype))

    @torch.library.register_fake("mvit2::separable_layer_project_input_backward")
    def _(dx, dv, w):
        return None
