"""The whole-layer fusion's kernels in Triton: the context pass and the epilogue, both directions.

The fused layer (``mvit2_kernels/layer.py``, ``docs/layer_fusion.md``) never builds the keys: per
row ``(b, p)`` one pass over ``x`` gives the scores ``w_q · x[n]``, their softmax ``s`` and
``x̄ = sum_n s[n] x[n]``; the GEMMs around these kernels are the library's. The contracts are
``separable_layer_{context,epilogue}_{forward,backward}_reference`` in ``reference.py``.

    context forward,  program per row:   scores -> s (raw) | max, sum | s /= sum | x̄
    context backward, program per row:   dx̄ · x̄ | ds, dq -> workspace | dx, dw_q partial
                                          then dw_q = the rows' partials summed (torch, no atomics)
    epilogue forward,  program per (row tile, N tile) of v viewed as [B·C·P, N]: y = relu(v) ctx
    epilogue backward, program per row tile:  dv = g ctx [v > 0], dctx = sum_n g relu(v)

A row of ``x`` is a ``[D, N]`` matrix walked in ``[BLOCK_D, BLOCK_N]`` tiles, so any D and N fit.
The context kernels keep per-row vectors longer than a tile (the scores, dq) in global memory:
in ``s`` itself (an output, rewritten in place) and in a ``[B·P, N]`` workspace. Their threads
write and then read those rows in another layout, and a small tile's elements are held by
several warps at once, hence ``tl.debug_barrier`` (a CTA barrier, which orders global memory
within the program) between the passes and between reading and overwriting a raw score.

Inputs are contiguous (checked, like ``csrc/separable_layer_checks.h``). fp16/bf16 are upcast
as they are loaded; the accumulation dtype is taken from the float32/float64 tensor each kernel
receives (s, ctx).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..checks import acc_dtype, check_float_like
from ._common import (
    _INTERPRET,
    _autotune,
    _device_guard,
    _relu,
    _softmax_stats,
    _tracing,
    _triton_op,
)

__all__ = [
    "separable_layer_context_backward",
    "separable_layer_context_forward",
    "separable_layer_epilogue_backward",
    "separable_layer_epilogue_forward",
]

# Under the interpreter: small fixed tiles, so that tests with D ~ 20 and N ~ 40 already cover
# several D and N tiles with a ragged last one.
_INTERPRET_CONTEXT = {"BLOCK_D": 8, "BLOCK_N": 16}
_INTERPRET_EPILOGUE = {"BLOCK_R": 4, "BLOCK_N": 16}
# Tiles of 2K-8K elements; BLOCK_N from 32 (MobileViTv2's last stages have N = 16..64).
_CONTEXT_CONFIGS = [
    ({"BLOCK_D": d, "BLOCK_N": n}, w)
    for d, n, w in ((16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8),
                    (16, 256, 8), (128, 32, 4))
]
_EPILOGUE_CONFIGS = [
    ({"BLOCK_R": r, "BLOCK_N": n}, w)
    for r, n, w in ((64, 16, 4), (32, 32, 4), (16, 64, 4), (8, 128, 4), (4, 256, 4),
                    (32, 64, 8), (16, 128, 8), (8, 256, 8))
]


@triton.jit
def _x_tile(x_row, d, d_mask, n, n_mask, x_s1, ACC: tl.constexpr):
    """[BLOCK_D, BLOCK_N] tile of one row's [D, N] matrix (unit stride along N), upcast to ACC;
    0 outside the matrix, so padded lanes add nothing to sums over d or n."""
    mask = d_mask[:, None] & n_mask[None, :]
    return tl.load(x_row + d[:, None] * x_s1 + n[None, :], mask=mask, other=0.0).to(ACC)


@_autotune(_CONTEXT_CONFIGS, key=["D", "N"])
@triton.jit
def _separable_layer_context_forward_kernel(
    x_ptr, w_ptr, s_ptr, xbar_ptr,
    D, P, N,
    x_s0, x_s1, x_s2,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program per row (b, p): s = softmax_N(w_q · x[:, n]) and x̄ = sum_n s[n] x[:, n]."""
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors may exceed 2**31 elements
    b, p = row // P, row % P
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    x_row = x_ptr + b * x_s0 + p * x_s2
    s_row = s_ptr + row * N  # s: contiguous [B, P, N]
    xbar_row = xbar_ptr + b * D * P + p  # x̄: contiguous [B, D, P], d at stride P

    # Scores, raw, into s: the softmax needs the whole row, which may not fit in registers.
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < N
        acc = tl.zeros([BLOCK_D, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(ACC)
            acc += w[:, None] * _x_tile(x_row, d, d < D, n, n_mask, x_s1, ACC)
        tl.store(s_row + n, tl.sum(acc, axis=0), mask=n_mask)
    tl.debug_barrier()
    m, inv_sum = _softmax_stats(s_row, N, BLOCK_N, ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        raw = tl.load(s_row + n, mask=n < N, other=float("-inf"))
        # Threads (warps) holding copies of a small tile's elements must all have read the raw
        # score before one of them overwrites it.
        tl.debug_barrier()
        tl.store(s_row + n, tl.exp(raw - m) * inv_sum, mask=n < N)
    tl.debug_barrier()

    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        acc = tl.zeros([BLOCK_D, BLOCK_N], ACC)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            s = tl.load(s_row + n, mask=n < N, other=0.0)
            acc += _x_tile(x_row, d, d < D, n, n < N, x_s1, ACC) * s[None, :]
        tl.store(xbar_row + d * P, tl.sum(acc, axis=1), mask=d < D)


@_autotune(_CONTEXT_CONFIGS, key=["D", "N"])
@triton.jit
def _separable_layer_context_backward_kernel(
    gx_ptr, x_ptr, w_ptr, s_ptr, xbar_ptr, dx_ptr, dq_ptr, dwp_ptr,
    D, P, N,
    x_s0, x_s1, x_s2,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program per row (b, p): ds[n] = dx̄ · x[:, n]; dq = s (ds - dx̄ · x̄);
    dx = dx̄ ⊗ s + w_q ⊗ dq; and the row's partial dw_q = sum_n dq[n] x[:, n]."""
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    b, p = row // P, row % P
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    x_off = b * x_s0 + p * x_s2  # dx: contiguous like x
    s_row, dq_row = s_ptr + row * N, dq_ptr + row * N  # s, dq workspace: [B * P, N]
    col = b * D * P + p  # dx̄, x̄: contiguous [B, D, P], d at stride P

    # Σ_n s[n] ds[n] = dx̄ · x̄: the softmax backward's dot product without another pass over x.
    dot = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        gx = tl.load(gx_ptr + col + d * P, mask=d < D, other=0.0)
        dot += gx * tl.load(xbar_ptr + col + d * P, mask=d < D, other=0.0)
    dot_gx_xbar = tl.sum(dot, axis=0)

    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < N
        acc = tl.zeros([BLOCK_D, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            gx = tl.load(gx_ptr + col + d * P, mask=d < D, other=0.0)
            acc += gx[:, None] * _x_tile(x_ptr + x_off, d, d < D, n, n_mask, x_s1, ACC)
        s = tl.load(s_row + n, mask=n_mask, other=0.0)
        tl.store(dq_row + n, s * (tl.sum(acc, axis=0) - dot_gx_xbar), mask=n_mask)
    tl.debug_barrier()

    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        gx = tl.load(gx_ptr + col + d * P, mask=d_mask, other=0.0)
        w = tl.load(w_ptr + d, mask=d_mask, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_D, BLOCK_N], ACC)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            n_mask = n < N
            s = tl.load(s_row + n, mask=n_mask, other=0.0)
            dq = tl.load(dq_row + n, mask=n_mask, other=0.0)
            dx = gx[:, None] * s[None, :] + w[:, None] * dq[None, :]
            tile = x_off + d[:, None] * x_s1 + n[None, :]
            tl.store(dx_ptr + tile, dx.to(dx_ptr.dtype.element_ty),
                     mask=d_mask[:, None] & n_mask[None, :])
            acc += dq[None, :] * _x_tile(x_ptr + x_off, d, d_mask, n, n_mask, x_s1, ACC)
        tl.store(dwp_ptr + row * D + d, tl.sum(acc, axis=1), mask=d_mask)  # [B * P, D]


@_autotune(_EPILOGUE_CONFIGS, key=["N"])
@triton.jit
def _separable_layer_epilogue_forward_kernel(
    v_ptr, ctx_ptr, y_ptr,
    R, N,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row tile, N tile) of v as [R = B·C·P, N]: y = relu(v) ctx, ctx[r] per row
    (ctx [B, C, P] is that row index's vector)."""
    ACC: tl.constexpr = ctx_ptr.dtype.element_ty
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < R)[:, None] & (n < N)[None, :]
    ctx = tl.load(ctx_ptr + r, mask=r < R, other=0.0)
    tile = r[:, None] * N + n[None, :]
    v = tl.load(v_ptr + tile, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptr + tile, (_relu(v) * ctx[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@_autotune(_EPILOGUE_CONFIGS, key=["N"])
@triton.jit
def _separable_layer_epilogue_backward_kernel(
    g_ptr, v_ptr, ctx_ptr, dv_ptr, dctx_ptr,
    R, N,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program per row tile of [R = B·C·P, N]: dv = g ctx where v > 0, dctx = sum_n g relu(v)."""
    ACC: tl.constexpr = ctx_ptr.dtype.element_ty
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    ctx = tl.load(ctx_ptr + r, mask=r_mask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_N], ACC)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = r_mask[:, None] & (n < N)[None, :]
        tile = r[:, None] * N + n[None, :]
        g = tl.load(g_ptr + tile, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + tile, mask=mask, other=0.0).to(ACC)
        # Autograd's relu backward, a select: 0 where v <= 0 even if g * ctx is inf or NaN, and
        # the gradient where v is NaN.
        dv = tl.where(v <= 0, 0.0, g * ctx[:, None])
        tl.store(dv_ptr + tile, dv.to(dv_ptr.dtype.element_ty), mask=mask)
        acc += g * _relu(v)
    tl.store(dctx_ptr + r, tl.sum(acc, axis=1), mask=r_mask)


@_triton_op("mvit2::separable_layer_context_forward_triton")
def separable_layer_context_forward(x: Tensor, w_q: Tensor) -> tuple[Tensor, Tensor]:
    """Context forward op: ``(s, xbar)``, the contract of
    ``separable_layer_context_forward_reference``.

    Args:
        x: ``Tensor[B, D, P, N]`` contiguous, any float dtype.
        w_q: ``Tensor[D]`` contiguous, in x's dtype (q's row of ``qkv_proj.weight``).

    Returns:
        ``s = softmax_N(w_q · x): Tensor[B, P, N]`` and ``xbar = sum_n s[n] x[:, n]:
        Tensor[B, D, P]``, contiguous, in float32 (float64 for float64 x).
    """
    _check_context_forward_inputs(x, w_q)
    B, D, P, N = x.shape
    acc = acc_dtype(x.dtype)
    s = torch.empty((B, P, N), dtype=acc, device=x.device)
    xbar = torch.empty((B, D, P), dtype=acc, device=x.device)
    if s.numel() == 0:  # no scores: x̄ is an empty sum (D = 0 launches: s is then 1/N)
        return s, xbar.zero_()
    if _tracing(s):
        return s, xbar
    with _device_guard(x):
        wrap_triton(_separable_layer_context_forward_kernel)[(B * P,)](
            x, w_q, s, xbar, D, P, N, x.stride(0), x.stride(1), x.stride(2),
            **(_INTERPRET_CONTEXT if _INTERPRET else {}),
        )
    return s, xbar


@_triton_op("mvit2::separable_layer_context_backward_triton")
def separable_layer_context_backward(
    grad_xbar: Tensor, x: Tensor, w_q: Tensor, s: Tensor, xbar: Tensor
) -> tuple[Tensor, Tensor]:
    """Context backward op: ``(dx, dw_q)``, the contract of
    ``separable_layer_context_backward_reference``.

    Args:
        grad_xbar: ``Tensor[B, D, P]``, the gradient of x̄, in the accumulation dtype.
        x, w_q: the forward's inputs.
        s, xbar: ``Tensor[B, P, N]`` and ``Tensor[B, D, P]`` from the forward.

    Returns:
        ``dx = dx̄ ⊗ s + w_q ⊗ dq: Tensor[B, D, P, N]`` in x's dtype and
        ``dw_q = sum_{b,p,n} dq[n] x[:, n]: Tensor[D]`` in the accumulation dtype, contiguous.
    """
    _check_context_backward_inputs(grad_xbar, x, w_q, s, xbar)
    B, D, P, N = x.shape
    dx = torch.empty((B, D, P, N), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:  # no (b, p, n) term: dw_q is an empty sum
        return dx, torch.zeros((D,), dtype=s.dtype, device=x.device)
    if _tracing(dx):
        return dx, torch.empty((D,), dtype=s.dtype, device=x.device)
    rows = B * P
    dq = torch.empty((rows, N), dtype=s.dtype, device=x.device)
    dw_rows = torch.empty((rows, D), dtype=s.dtype, device=x.device)
    with _device_guard(x):
        wrap_triton(_separable_layer_context_backward_kernel)[(rows,)](
            grad_xbar, x, w_q, s, xbar, dx, dq, dw_rows, D, P, N,
            x.stride(0), x.stride(1), x.stride(2),
            **(_INTERPRET_CONTEXT if _INTERPRET else {}),
        )
    # The rows' partials reduced by torch: a fixed-order tree (no atomics), so deterministic.
    return dx, dw_rows.sum(dim=0)


@_triton_op("mvit2::separable_layer_epilogue_forward_triton")
def separable_layer_epilogue_forward(v: Tensor, ctx: Tensor) -> Tensor:
    """Epilogue forward op: ``y = relu(v) * ctx``, the contract of
    ``separable_layer_epilogue_forward_reference``.

    Args:
        v: ``Tensor[B, C, P, N]`` contiguous, any float dtype.
        ctx: ``Tensor[B, C, P]`` contiguous, float32 (float64 for float64 v).

    Returns:
        ``y: Tensor[B, C, P, N]`` contiguous in v's dtype.
    """
    _check_epilogue_inputs(v, ctx)
    B, C, P, N = v.shape
    y = torch.empty((B, C, P, N), dtype=v.dtype, device=v.device)
    if y.numel() == 0 or _tracing(y):
        return y
    rows = B * C * P
    fixed = _INTERPRET_EPILOGUE if _INTERPRET else {}
    with _device_guard(v):
        wrap_triton(_separable_layer_epilogue_forward_kernel)[
            lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(N, meta["BLOCK_N"]))
        ](v, ctx, y, rows, N, **fixed)
    return y


@_triton_op("mvit2::separable_layer_epilogue_backward_triton")
def separable_layer_epilogue_backward(
    grad_y: Tensor, v: Tensor, ctx: Tensor
) -> tuple[Tensor, Tensor]:
    """Epilogue backward op: ``(dv, dctx)``, the contract of
    ``separable_layer_epilogue_backward_reference``.

    Args:
        grad_y: ``Tensor[B, C, P, N]`` contiguous, in v's dtype.
        v, ctx: the forward's inputs.

    Returns:
        ``dv = grad_y * ctx`` where ``v > 0``: ``Tensor[B, C, P, N]`` in v's dtype, and
        ``dctx = sum_n grad_y * relu(v): Tensor[B, C, P]`` in ctx's dtype, contiguous.
    """
    _check_epilogue_backward_inputs(grad_y, v, ctx)
    B, C, P, N = v.shape
    dv = torch.empty((B, C, P, N), dtype=v.dtype, device=v.device)
    dctx = torch.empty((B, C, P), dtype=ctx.dtype, device=v.device)
    if dv.numel() == 0:  # N = 0: dctx is an empty sum
        return dv, dctx.zero_()
    if _tracing(dv):
        return dv, dctx
    rows = B * C * P
    fixed = _INTERPRET_EPILOGUE if _INTERPRET else {}
    with _device_guard(v):
        wrap_triton(_separable_layer_epilogue_backward_kernel)[
            lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)
        ](grad_y, v, ctx, dv, dctx, rows, N, **fixed)
    return dv, dctx


# --- Argument checks: csrc/separable_layer_checks.h, with the same errors ----------------------


def _check_context_forward_inputs(x: Tensor, w_q: Tensor) -> None:
    """x: [B, D, P, N] contiguous; w_q: [D] contiguous in x's dtype."""
    check_float_like({"x": x, "w_q": w_q}, like="x")
    _check_contiguous_4d("x", x)
    _check_shape("w_q", w_q, (x.shape[1],))


def _check_context_backward_inputs(grad_xbar, x, w_q, s, xbar) -> None:
    """grad_xbar, xbar: [B, D, P] and s: [B, P, N], contiguous, in the accumulation dtype."""
    _check_context_forward_inputs(x, w_q)
    B, D, P, N = x.shape
    for name, t, shape in (("grad_xbar", grad_xbar, (B, D, P)), ("s", s, (B, P, N)),
                           ("xbar", xbar, (B, D, P))):
        _check_acc(name, t, "x", x)
        _check_shape(name, t, shape)


def _check_epilogue_inputs(v: Tensor, ctx: Tensor) -> None:
    """v: [B, C, P, N] contiguous; ctx: [B, C, P] contiguous in the accumulation dtype."""
    check_float_like({"v": v}, like="v")
    _check_contiguous_4d("v", v)
    _check_acc("ctx", ctx, "v", v)
    _check_shape("ctx", ctx, tuple(v.shape[:3]))


def _check_epilogue_backward_inputs(grad_y: Tensor, v: Tensor, ctx: Tensor) -> None:
    """The epilogue's inputs, and grad_y like v."""
    _check_epilogue_inputs(v, ctx)
    check_float_like({"v": v, "grad_y": grad_y}, like="v")
    _check_shape("grad_y", grad_y, tuple(v.shape))


def _check_contiguous_4d(name: str, t: Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor, got shape {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_acc(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """t is in the accumulation dtype of ref (float64 for float64, else float32), on its device."""
    acc = acc_dtype(ref.dtype)
    if t.dtype != acc:
        raise TypeError(f"{name} must have dtype {acc} (the accumulation dtype of {ref_name}), "
                        f"got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    """t has the shape and is contiguous (the kernels index it so)."""
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
