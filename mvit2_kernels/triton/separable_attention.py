"""Separable self-attention (MobileViTv2) in Triton: the forward and two-pass backward kernels.

The layout mirrors ``csrc/cpu/separable_attention.cpp``: one program per (row ``b, p``, tile of
``BLOCK_C`` channels). Each program recomputes the row's softmax over N from q (1/C of the data)
in two passes (max, then sum), looping over ``BLOCK_N`` tiles so any N fits. The maths is
docs/design.md §1; ``mvit2_kernels/reference.py`` is the oracle.

Inputs are indexed with the strides of dims 0..2 and unit stride along N, so the q/k/v views of
one qkv tensor are read in place; the backward's outputs too, so that the ``qkv`` ops write dq,
dk, dv into one ``dqkv`` shaped like qkv. fp16/bf16 are upcast to float32 as they are loaded;
float32 and float64 are computed in their own dtype. The accumulation dtype is taken from
``ctx`` (float32, or float64 for float64 inputs), which every kernel receives.

The host functions are ``torch.library.triton_op``\\ s launching through ``wrap_triton``, so
``torch.compile`` sees the kernels rather than an opaque call.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..checks import (
    acc_dtype,
    check_separable_inputs,
    check_separable_out,
    check_separable_qkv_input,
)
from ._common import (
    _INTERPRET,
    _autotune,
    _device_guard,
    _relu,
    _softmax_stats,
    _tracing,
    _triton_op,
    _unit_last_stride,
)

__all__ = [
    "separable_attention_backward",
    "separable_attention_forward",
    "separable_attention_forward_out",
    "separable_attention_qkv_backward",
    "separable_attention_qkv_forward",
]

# Under the interpreter every autotuning config would be run (slowly, in numpy), so one fixed
# config is used there; BLOCK_N is small so that tests cover several N tiles cheaply.
_FIXED = {"BLOCK_C": 16, "BLOCK_N": 64, "num_warps": 4}


@_autotune(
    [({"BLOCK_C": c, "BLOCK_N": n}, w) for c, n, w in
     ((8, 256, 4), (16, 128, 4), (16, 256, 8), (32, 128, 4), (32, 256, 8), (64, 64, 4),
      (64, 128, 8))],
    key=["C", "N"],  # the autotuner adds the tensors' dtypes to the key
)
@triton.jit
def _separable_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr, ctx_ptr,
    C, P, N,
    q_s0, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (row, tile): ctx[c] = sum_n s[n] k[c, n]; y[c, n] = relu(v[c, n]) ctx[c]."""
    ACC: tl.constexpr = ctx_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors may exceed 2**31 elements
    b, p = row // P, row % P
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    offs = tl.arange(0, BLOCK_N)
    q_row = q_ptr + b * q_s0 + p * q_s2
    m, inv_sum = _softmax_stats(q_row, N, BLOCK_N, ACC)

    k_rows = k_ptr + b * k_s0 + p * k_s2 + c[:, None] * k_s1
    acc = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    for n0 in range(0, N, BLOCK_N):
        n_mask = n0 + offs < N
        x = tl.load(q_row + n0 + offs, mask=n_mask, other=float("-inf")).to(ACC)
        s = tl.where(n_mask, tl.exp(x - m) * inv_sum, 0.0)
        kk = tl.load(k_rows + n0 + offs[None, :], mask=c_mask[:, None] & n_mask[None, :],
                     other=0.0).to(ACC)
        acc += kk * s[None, :]
    ctx = tl.sum(acc, axis=1)
    tl.store(ctx_ptr + (b * C + c) * P + p, ctx, mask=c_mask)  # ctx: contiguous [B, C, P, 1]

    v_rows = v_ptr + b * v_s0 + p * v_s2 + c[:, None] * v_s1
    y_rows = y_ptr + ((b * C + c[:, None]) * P + p) * N  # y: contiguous [B, C, P, N]
    for n0 in range(0, N, BLOCK_N):
        mask = c_mask[:, None] & (n0 + offs < N)[None, :]
        vv = tl.load(v_rows + n0 + offs[None, :], mask=mask, other=0.0).to(ACC)
        y = _relu(vv) * ctx[:, None]
        tl.store(y_rows + n0 + offs[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@_autotune(
    [({"BLOCK_N": n}, w) for n, w in ((64, 4), (128, 4), (128, 8), (256, 8))],
    key=["C", "N", "BLOCK_C"],  # BLOCK_C is chosen by the host: it sizes the ds workspace
)
@triton.jit
def _separable_attention_backward_kernel(
    g_ptr, q_ptr, k_ptr, v_ptr, ctx_ptr, dk_ptr, dv_ptr, ds_ptr, dot_ptr,
    C, P, N, TILES,
    g_s0, g_s1, g_s2, q_s0, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, ctx_s0, ctx_s1, ctx_s2,
    dk_off, dk_s0, dk_s1, dk_s2, dv_off, dv_s0, dv_s1, dv_s2,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 1, program (row, tile): dv, dctx = sum_n g relu(v), dk = dctx s, and this tile's
    partial ds[n] = sum_c dctx[c] k[c, n] and sum_c dctx[c] ctx[c] into the workspaces.

    dk and dv start ``dk_off``/``dv_off`` elements into their tensors; ``dv_ptr`` None puts dv in
    dk's tensor (one dqkv: a kernel must not receive one mutated tensor twice, or as views)."""
    ACC: tl.constexpr = ctx_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    b, p = row // P, row % P
    c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    offs = tl.arange(0, BLOCK_N)
    q_row = q_ptr + b * q_s0 + p * q_s2
    m, inv_sum = _softmax_stats(q_row, N, BLOCK_N, ACC)
    ctx = tl.load(ctx_ptr + b * ctx_s0 + c * ctx_s1 + p * ctx_s2, mask=c_mask, other=0.0)

    g_rows = g_ptr + b * g_s0 + p * g_s2 + c[:, None] * g_s1
    v_rows = v_ptr + b * v_s0 + p * v_s2 + c[:, None] * v_s1
    dk_rows = dk_ptr + dk_off + b * dk_s0 + p * dk_s2 + c[:, None] * dk_s1
    if dv_ptr is None:
        dv_rows = dk_ptr + dv_off + b * dv_s0 + p * dv_s2 + c[:, None] * dv_s1
    else:
        dv_rows = dv_ptr + dv_off + b * dv_s0 + p * dv_s2 + c[:, None] * dv_s1
    acc = tl.zeros([BLOCK_C, BLOCK_N], ACC)
    for n0 in range(0, N, BLOCK_N):
        mask = c_mask[:, None] & (n0 + offs < N)[None, :]
        gg = tl.load(g_rows + n0 + offs[None, :], mask=mask, other=0.0).to(ACC)
        vv = tl.load(v_rows + n0 + offs[None, :], mask=mask, other=0.0).to(ACC)
        # Autograd's relu backward, a select: 0 where v <= 0 even if g * ctx is inf or NaN, and
        # the gradient where v is NaN.
        dv = tl.where(vv <= 0, 0.0, gg * ctx[:, None])
        tl.store(dv_rows + n0 + offs[None, :], dv.to(dk_ptr.dtype.element_ty), mask=mask)
        acc += gg * _relu(vv)
    dctx = tl.sum(acc, axis=1)
    tl.store(dot_ptr + row * TILES + tile, tl.sum(dctx * ctx, axis=0))

    k_rows = k_ptr + b * k_s0 + p * k_s2 + c[:, None] * k_s1
    ds_row = ds_ptr + (row * TILES + tile) * N  # ds workspace: [B * P, TILES, N]
    for n0 in range(0, N, BLOCK_N):
        n_mask = n0 + offs < N
        mask = c_mask[:, None] & n_mask[None, :]
        x = tl.load(q_row + n0 + offs, mask=n_mask, other=float("-inf")).to(ACC)
        s = tl.where(n_mask, tl.exp(x - m) * inv_sum, 0.0)
        dk = dctx[:, None] * s[None, :]
        tl.store(dk_rows + n0 + offs[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask)
        kk = tl.load(k_rows + n0 + offs[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(ds_row + n0 + offs, tl.sum(dctx[:, None] * kk, axis=0), mask=n_mask)


@_autotune([({"BLOCK_N": n}, w) for n, w in ((64, 2), (128, 4), (256, 4), (512, 8))], key=["N"])
@triton.jit
def _separable_attention_backward_dq_kernel(
    q_ptr, dq_ptr, ds_ptr, dot_ptr,
    P, N, TILES,
    q_s0, q_s2, dq_s0, dq_s2,
    BLOCK_N: tl.constexpr,
):
    """Pass 2, program per row: dq = s (ds - sum_c dctx ctx), the tiles' partials summed in
    tile order, so the result does not depend on scheduling (no atomics)."""
    ACC: tl.constexpr = ds_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    b, p = row // P, row % P
    offs = tl.arange(0, BLOCK_N)
    q_row = q_ptr + b * q_s0 + p * q_s2
    dq_row = dq_ptr + b * dq_s0 + p * dq_s2
    m, inv_sum = _softmax_stats(q_row, N, BLOCK_N, ACC)
    dot = tl.zeros([1], ACC)
    for t in range(0, TILES):
        dot += tl.load(dot_ptr + row * TILES + t + tl.arange(0, 1))
    for n0 in range(0, N, BLOCK_N):
        n_mask = n0 + offs < N
        x = tl.load(q_row + n0 + offs, mask=n_mask, other=float("-inf")).to(ACC)
        s = tl.exp(x - m) * inv_sum
        ds = tl.zeros([BLOCK_N], ACC)
        for t in range(0, TILES):
            ds += tl.load(ds_ptr + (row * TILES + t) * N + n0 + offs, mask=n_mask, other=0.0)
        dq = s * (ds - dot)
        tl.store(dq_row + n0 + offs, dq.to(dq_ptr.dtype.element_ty), mask=n_mask)


def _backward_block_c(rows: int, C: int) -> int:
    """Channels per pass-1 program, fixed on the host because it sizes the ds workspace:
    as wide as 64, narrower while that leaves too few programs to fill a GPU."""
    if _INTERPRET:
        return _FIXED["BLOCK_C"]
    block = 64
    while block > 8 and rows * triton.cdiv(C, block) < 1024:
        block //= 2
    return min(block, max(8, triton.next_power_of_2(C)))


def _forward(q: Tensor, k: Tensor, v: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(y, ctx)`` of checked inputs, into ``y`` if given (contiguous, checked): the forward
    ops' body."""
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    B, C, P, N = k.shape
    if y is None:
        y = torch.empty((B, C, P, N), dtype=k.dtype, device=k.device)
    ctx = torch.empty((B, C, P, 1), dtype=acc_dtype(k.dtype), device=k.device)
    if y.numel() == 0:  # N = 0 leaves ctx = an empty sum = 0; nothing to launch
        return y, ctx.zero_()
    if _tracing(y):
        return y, ctx
    rows = B * P
    fixed = _FIXED if _INTERPRET else {}
    with _device_guard(k):
        wrap_triton(_separable_attention_forward_kernel)[
            lambda meta: (rows, triton.cdiv(C, meta["BLOCK_C"]))
        ](
            q, k, v, y, ctx, C, P, N,
            q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            **fixed,
        )
    return y, ctx


@_triton_op("mvit2::separable_attention_forward_triton")
def separable_attention_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Forward op: ``(y, ctx)``, the contract of ``separable_attention_forward_reference``.

    Args:
        q: ``Tensor[B, 1, P, N]``; k, v: ``Tensor[B, C, P, N]``; one float dtype, one device.

    Returns:
        ``y: Tensor[B, C, P, N]`` contiguous in the input dtype and
        ``ctx: Tensor[B, C, P, 1]`` contiguous in float32 (float64 for float64 inputs).
    """
    check_separable_inputs(q, k, v)
    return _forward(q, k, v)


@_triton_op("mvit2::separable_attention_forward_out_triton", mutates_args=("y",))
def separable_attention_forward_out(q: Tensor, k: Tensor, v: Tensor, y: Tensor) -> Tensor:
    """:func:`separable_attention_forward` into a preallocated ``y`` (contiguous
    ``[B, C, P, N]`` in k's dtype and device, sharing no memory with q, k, v); returns ctx."""
    check_separable_inputs(q, k, v)
    check_separable_out(y, q, k, v, "y")
    return _forward(q, k, v, y)[1]


def _backward(
    g: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor,
    dq: Tensor, dk: tuple[Tensor, int], dv: tuple[Tensor | None, int],
) -> None:
    """The backward of checked inputs into dq and dk, dv, each ``(tensor, element offset)``
    (dv's tensor None: dk's). Every output is indexed with its tensor's strides of dims 0..2
    and unit stride along N."""
    g, q, k, v = (_unit_last_stride(t) for t in (g, q, k, v))
    B, C, P, N = k.shape
    if dq.numel() == 0 or _tracing(dq):  # dq empty: dk and dv are empty too
        return
    rows = B * P
    block_c = _backward_block_c(rows, C)
    tiles = triton.cdiv(C, block_c)
    # Per (row, tile) partials, summed by pass 2 in tile order. With C = 0 there are no tiles
    # and pass 2 alone writes dq = s * (0 - 0), as the reference does.
    ds = torch.empty((rows, tiles, N), dtype=ctx.dtype, device=k.device)
    dot = torch.empty((rows, tiles), dtype=ctx.dtype, device=k.device)
    fixed = {"BLOCK_N": _FIXED["BLOCK_N"], "num_warps": _FIXED["num_warps"]} if _INTERPRET else {}
    (dk, dk_off), (dv, dv_off) = dk, dv
    dv_strides = (dv if dv is not None else dk).stride()[:3]
    with _device_guard(k):
        if tiles > 0:
            wrap_triton(_separable_attention_backward_kernel)[(rows, tiles)](
                g, q, k, v, ctx, dk, dv, ds, dot, C, P, N, tiles,
                g.stride(0), g.stride(1), g.stride(2), q.stride(0), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                ctx.stride(0), ctx.stride(1), ctx.stride(2),
                dk_off, *dk.stride()[:3], dv_off, *dv_strides,
                BLOCK_C=block_c, **fixed,
            )
        wrap_triton(_separable_attention_backward_dq_kernel)[(rows,)](
            q, dq, ds, dot, P, N, tiles, q.stride(0), q.stride(2), dq.stride(0), dq.stride(2),
            **fixed,
        )


@_triton_op("mvit2::separable_attention_backward_triton")
def separable_attention_backward(
    grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward op: ``(dq, dk, dv)``, the contract of ``separable_attention_backward_reference``.

    Args:
        grad_y: ``Tensor[B, C, P, N]`` in the dtype of q, k, v.
        q, k, v: the forward's inputs.
        ctx: ``Tensor[B, C, P, 1]`` from the forward (float32, float64 for float64 inputs).

    Returns:
        ``dq: Tensor[B, 1, P, N]``, ``dk, dv: Tensor[B, C, P, N]``, contiguous, input dtype.
    """
    check_separable_inputs(q, k, v)
    _check_backward_extras(grad_y, k, ctx)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    _backward(grad_y, q, k, v, ctx, dq, (dk, 0), (dv, 0))
    return dq, dk, dv


@_triton_op("mvit2::separable_attention_qkv_forward_triton")
def separable_attention_qkv_forward(qkv: Tensor) -> tuple[Tensor, Tensor]:
    """Forward op on the channel views ``q, k, v = qkv.split([1, C, C], dim=1)``, read in place.

    Args:
        qkv: ``Tensor[B, 1 + 2C, P, N]``, the 1x1 convolution's output.

    Returns:
        ``(y, ctx)`` as :func:`separable_attention_forward`.
    """
    C = check_separable_qkv_input(qkv)
    return _forward(*qkv.split([1, C, C], dim=1))


@_triton_op("mvit2::separable_attention_qkv_backward_triton")
def separable_attention_qkv_backward(grad_y: Tensor, qkv: Tensor, ctx: Tensor) -> Tensor:
    """Backward op of :func:`separable_attention_qkv_forward`: one contiguous ``dqkv`` shaped
    like qkv, its channels ``[dq, dk, dv]`` written in place (no concatenation).

    Args:
        grad_y: ``Tensor[B, C, P, N]`` in qkv's dtype.
        qkv: the forward's input, ``Tensor[B, 1 + 2C, P, N]``.
        ctx: ``Tensor[B, C, P, 1]`` from the forward (float32, float64 for float64 inputs).
    """
    C = check_separable_qkv_input(qkv)
    q, k, v = qkv.split([1, C, C], dim=1)
    _check_backward_extras(grad_y, k, ctx)
    # The kernels get dqkv itself (never its views: torch.compile clones a mutated kernel
    # argument, and a view's clone would not be written back), dk and dv at channel offsets.
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    channel = dqkv.stride(1)
    _backward(grad_y, q, k, v, ctx, dqkv, (dqkv, channel), (None, (1 + C) * channel))
    return dqkv


def _check_backward_extras(grad_y: Tensor, k: Tensor, ctx: Tensor) -> None:
    """What the backward takes beyond (q, k, v): grad_y like k, ctx [B, C, P, 1] in acc dtype."""
    B, C, P, _ = k.shape
    for name, t, dtype, shape in (
        ("grad_y", grad_y, k.dtype, list(k.shape)),
        ("ctx", ctx, acc_dtype(k.dtype), [B, C, P, 1]),
    ):
        if t.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
        if t.device != k.device:
            raise ValueError(f"{name} must be on {k.device} like k, got {t.device}")
        if list(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {list(t.shape)}")
