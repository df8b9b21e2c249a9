"""Efficient additive attention (SwiftFormer) in Triton: forward and backward, both variants.

The layout mirrors ``csrc/cpu/additive_attention.cpp``. A program owns (batch ``b``, a chunk of
``CHUNK_N`` tokens, a tile of ``BLOCK_D`` features) and walks its chunk in tiles of ``BLOCK_N``
rows. A row's norm (and its other dot products over D) is summed over every D tile first, then
the program's own tile is written, so any D works; on a GPU ``BLOCK_D`` covers D up to 512 and
those loops run once. Reductions over N leave one partial per (b, chunk) in a workspace that a
small kernel sums in chunk order, so results do not depend on scheduling (no atomics).

    forward:  q pass -> qn, partial sum_n a qn, sum_n a^2 | reduce -> G, ||a|| | k pass -> out
    backward: (grad_out, k) pass -> dk, partial dG | reduce -> dG, dG . G
              (grad_qn, q) pass -> dq, partial dw_g | reduce -> dw_g

The maths is docs/design.md §2; ``mvit2_kernels/reference.py`` is the oracle. Inputs are read with
their batch and token strides and unit stride along D; fp16/bf16 are upcast as they are loaded
and everything is accumulated in the dtype of the saved statistics (float32, or float64).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from ..checks import acc_dtype, check_additive_inputs
from ..reference import ADDITIVE_EPS
from ._common import _INTERPRET, _autotune, _tracing, _triton_op, _unit_last_stride

__all__ = ["additive_attention_backward", "additive_attention_forward"]

# Under the interpreter: small fixed tiles, so that tests with D ~ 20 and N ~ 40 already cover
# several D tiles, several row tiles per chunk and several chunks.
_INTERPRET_BLOCKS = {"BLOCK_N": 8, "BLOCK_D": 16, "CHUNK_N": 16}
_WARPS = [({}, w) for w in (2, 4, 8)]


@triton.jit
def _clamp_eps(x, EPS: tl.constexpr):
    # max(x, eps) that keeps NaN, as torch's clamp_min (tl.maximum may drop it).
    return tl.where(x < EPS, EPS, x)


@triton.jit
def _tile(ptr, rows, r_mask, row_stride, d, d_mask, ACC: tl.constexpr):
    """[BLOCK_N, BLOCK_D] tile of a [*, N, D] tensor (unit stride along D), upcast to ACC."""
    mask = r_mask[:, None] & d_mask[None, :]
    return tl.load(ptr + rows[:, None] * row_stride + d[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _program_tile(D, BLOCK_D: tl.constexpr):
    """This program's (b, chunk, feature offsets d, d < D); 64-bit, as tensors may exceed 2**31
    elements."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, chunk, d, d < D


@triton.jit
def _q_row_stats(q_b, rows, r_mask, q_s1, w_ptr, w_s0, dg_b, D, WITH_DG: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Per row of a q tile, over every D tile: ||q||^2, q . w_g and (WITH_DG) q . dG."""
    ss = tl.zeros([BLOCK_N], ACC)
    xw = tl.zeros([BLOCK_N], ACC)
    xdg = tl.zeros([BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = _tile(q_b, rows, r_mask, q_s1, dd, dd < D, ACC)
        w = tl.load(w_ptr + dd * w_s0, mask=dd < D, other=0.0).to(ACC)
        ss += tl.sum(x * x, axis=1)
        xw += tl.sum(x * w[None, :], axis=1)
        if WITH_DG:
            xdg += tl.sum(x * tl.load(dg_b + dd, mask=dd < D, other=0.0)[None, :], axis=1)
    return ss, xw, xdg


@_autotune(_WARPS, key=["N", "D"])
@triton.jit
def _additive_attention_forward_kernel(
    q_ptr, w_ptr, qn_ptr, gp_ptr, ssp_ptr,
    N, D, CHUNKS, CHUNK_N,
    q_s0, q_s1, w_s0,
    SOFTMAX: tl.constexpr, EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """q pass, program (b, chunk, D tile): qn, and the chunk's partial sum_n weight[n] qn[n]
    (G before the normalisation over N, which is linear) and sum_n a[n]^2."""
    ACC: tl.constexpr = gp_ptr.dtype.element_ty
    b, chunk, d, d_mask = _program_tile(D, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    # The published token_dim ** -0.5, in ACC (D may arrive as a constexpr 1, so no D.to()).
    scale = 1.0 / tl.sqrt(tl.zeros([1], ACC) + D)
    q_b = q_ptr + b * q_s0
    g_acc = tl.zeros([BLOCK_D], ACC)
    ss_a = tl.zeros([BLOCK_N], ACC)
    for n0 in range(chunk * CHUNK_N, tl.minimum(N, chunk * CHUNK_N + CHUNK_N), BLOCK_N):
        rows = n0 + offs_n
        r_mask = rows < N
        ss, xw, _ = _q_row_stats(q_b, rows, r_mask, q_s1, w_ptr, w_s0, w_ptr, D, False,
                                 BLOCK_N, BLOCK_D, ACC)
        inv = 1.0 / _clamp_eps(tl.sqrt(ss), EPS)
        a = xw * inv * scale
        # Rows past N load as 0, but their a is 0 * w_g: NaN where w_g is inf. Masked, so that
        # ||a|| is inf (not NaN) then, like the reference's.
        ss_a += tl.where(r_mask, a * a, 0.0)
        if SOFTMAX:  # softmax over a size-1 axis: exp(a - a) = 1, or NaN where a is not finite
            weight = tl.exp(a - a)
        else:
            weight = a
        qn = _tile(q_b, rows, r_mask, q_s1, d, d_mask, ACC) * inv[:, None]
        out_mask = r_mask[:, None] & d_mask[None, :]
        tl.store(qn_ptr + (b * N + rows[:, None]) * D + d[None, :],  # qn: contiguous [B, N, D]
                 qn.to(qn_ptr.dtype.element_ty), mask=out_mask)
        g_acc += tl.sum(tl.where(r_mask, weight, 0.0)[:, None] * qn, axis=0)
    task = b * CHUNKS + chunk
    tl.store(gp_ptr + task * D + d, g_acc, mask=d_mask)  # workspace [B, CHUNKS, D]
    if tl.program_id(2) == 0:
        tl.store(ssp_ptr + task, tl.sum(ss_a, axis=0))


@triton.jit
def _additive_attention_forward_reduce_kernel(
    gp_ptr, ssp_ptr, g_ptr, a_norm_ptr,
    D, CHUNKS,
    SOFTMAX: tl.constexpr, EPS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program b: ||a|| and G = (sum of the chunks' partials, in chunk order) / max(||a||, eps)."""
    ACC: tl.constexpr = gp_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    ss = tl.zeros([1], ACC)
    for c in range(0, CHUNKS):
        ss += tl.load(ssp_ptr + b * CHUNKS + c + tl.arange(0, 1))
    ra = tl.sqrt(ss)
    tl.store(a_norm_ptr + b + tl.arange(0, 1), ra)
    if SOFTMAX:
        f = tl.full([1], 1.0, ACC)
    else:
        f = 1.0 / _clamp_eps(ra, EPS)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], ACC)
        for c in range(0, CHUNKS):
            acc += tl.load(gp_ptr + (b * CHUNKS + c) * D + d, mask=d < D, other=0.0)
        tl.store(g_ptr + b * D + d, acc * f, mask=d < D)  # g: contiguous [B, D]


@_autotune(_WARPS, key=["N", "D"])
@triton.jit
def _additive_attention_forward_out_kernel(
    k_ptr, g_ptr, out_ptr,
    N, D, CHUNK_N,
    k_s0, k_s1,
    EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """k pass, program (b, chunk, D tile): out = G * k / max(||k||, eps)."""
    ACC: tl.constexpr = g_ptr.dtype.element_ty
    b, chunk, d, d_mask = _program_tile(D, BLOCK_D)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    k_b = k_ptr + b * k_s0
    g = tl.load(g_ptr + b * D + d, mask=d_mask, other=0.0)
    for n0 in range(chunk * CHUNK_N, tl.minimum(N, chunk * CHUNK_N + CHUNK_N), BLOCK_N):
        rows = n0 + offs_n
        r_mask = rows < N
        ss = tl.zeros([BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            x = _tile(k_b, rows, r_mask, k_s1, d0 + offs_d, d0 + offs_d < D, ACC)
            ss += tl.sum(x * x, axis=1)
        inv = 1.0 / _clamp_eps(tl.sqrt(ss), EPS)
        out = _tile(k_b, rows, r_mask, k_s1, d, d_mask, ACC) * inv[:, None] * g[None, :]
        tl.store(out_ptr + (b * N + rows[:, None]) * D + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])


@triton.jit
def _normalize_backward(dxn, x, norm, inv, t, EPS: tl.constexpr):
    """Backward of x / max(||x||, eps) given dxn and t = x . dxn per row: dxn / eps where
    ||x|| < eps, else (dxn - xn (xn . dxn)) / ||x||: at equality (autograd's clamp_min passes
    there) and for a NaN norm, which that formula spreads over the row as autograd does
    (``norm >= eps`` is false for NaN)."""
    full = dxn * inv[:, None] - x * (inv * inv * inv * t)[:, None]
    return tl.where((norm < EPS)[:, None], dxn / EPS, full)


@_autotune(_WARPS, key=["N", "D"])
@triton.jit
def _additive_attention_backward_kernel(
    go_ptr, k_ptr, g_ptr, dk_ptr, dgp_ptr,
    N, D, CHUNKS, CHUNK_N,
    go_s0, go_s1, k_s0, k_s1,
    EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(grad_out, k) pass, program (b, chunk, D tile): dkn = grad_out * G -> dk, and the
    chunk's partial dG = sum_n grad_out[n] * kn[n]."""
    ACC: tl.constexpr = g_ptr.dtype.element_ty
    b, chunk, d, d_mask = _program_tile(D, BLOCK_D)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    go_b, k_b, g_b = go_ptr + b * go_s0, k_ptr + b * k_s0, g_ptr + b * D
    g = tl.load(g_b + d, mask=d_mask, other=0.0)
    dg_acc = tl.zeros([BLOCK_D], ACC)
    for n0 in range(chunk * CHUNK_N, tl.minimum(N, chunk * CHUNK_N + CHUNK_N), BLOCK_N):
        rows = n0 + offs_n
        r_mask = rows < N
        ss = tl.zeros([BLOCK_N], ACC)
        t = tl.zeros([BLOCK_N], ACC)  # k . dkn
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            x = _tile(k_b, rows, r_mask, k_s1, dd, dd < D, ACC)
            go = _tile(go_b, rows, r_mask, go_s1, dd, dd < D, ACC)
            gg = tl.load(g_b + dd, mask=dd < D, other=0.0)
            ss += tl.sum(x * x, axis=1)
            t += tl.sum(x * go * gg[None, :], axis=1)
        norm = tl.sqrt(ss)
        inv = 1.0 / _clamp_eps(norm, EPS)
        x = _tile(k_b, rows, r_mask, k_s1, d, d_mask, ACC)
        go = _tile(go_b, rows, r_mask, go_s1, d, d_mask, ACC)
        dk = _normalize_backward(go * g[None, :], x, norm, inv, t, EPS)
        tl.store(dk_ptr + (b * N + rows[:, None]) * D + d[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
        dg_acc += tl.sum(go * x * inv[:, None], axis=0)  # rows past N load as 0
    tl.store(dgp_ptr + (b * CHUNKS + chunk) * D + d, dg_acc, mask=d_mask)


@triton.jit
def _additive_attention_backward_reduce_kernel(
    dgp_ptr, g_ptr, dg_ptr, dgg_ptr,
    D, CHUNKS,
    BLOCK_D: tl.constexpr,
):
    """Program b: dG = the chunks' partials summed in chunk order; dG . G (= sum alpha dalpha)."""
    ACC: tl.constexpr = g_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    dot = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], ACC)
        for c in range(0, CHUNKS):
            acc += tl.load(dgp_ptr + (b * CHUNKS + c) * D + d, mask=d < D, other=0.0)
        tl.store(dg_ptr + b * D + d, acc, mask=d < D)
        dot += acc * tl.load(g_ptr + b * D + d, mask=d < D, other=0.0)
    tl.store(dgg_ptr + b + tl.arange(0, 1), tl.sum(dot, axis=0) + tl.zeros([1], ACC))


@_autotune(_WARPS, key=["N", "D"])
@triton.jit
def _additive_attention_backward_dq_kernel(
    gq_ptr, q_ptr, w_ptr, dg_ptr, dgg_ptr, a_norm_ptr, dq_ptr, dwp_ptr,
    N, D, CHUNKS, CHUNK_N,
    gq_s0, gq_s1, q_s0, q_s1, w_s0,
    SOFTMAX: tl.constexpr, EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(grad_qn, q) pass, program (b, chunk, D tile):
    dqn = grad_qn + alpha dG + da scale w_g -> dq; the chunk's partial dw_g = sum_n da scale qn."""
    ACC: tl.constexpr = dg_ptr.dtype.element_ty
    b, chunk, d, d_mask = _program_tile(D, BLOCK_D)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    scale = 1.0 / tl.sqrt(tl.zeros([1], ACC) + D)
    gq_b, q_b, dg_b = gq_ptr + b * gq_s0, q_ptr + b * q_s0, dg_ptr + b * D
    ra = tl.load(a_norm_ptr + b)
    dgg = tl.load(dgg_ptr + b)
    dw_acc = tl.zeros([BLOCK_D], ACC)
    for n0 in range(chunk * CHUNK_N, tl.minimum(N, chunk * CHUNK_N + CHUNK_N), BLOCK_N):
        rows = n0 + offs_n
        r_mask = rows < N
        ss, xw, xdg = _q_row_stats(q_b, rows, r_mask, q_s1, w_ptr, w_s0, dg_b, D, True,
                                   BLOCK_N, BLOCK_D, ACC)
        norm = tl.sqrt(ss)
        inv = 1.0 / _clamp_eps(norm, EPS)
        a = xw * inv * scale
        dalpha = xdg * inv
        if SOFTMAX:  # softmax's backward on a size-1 axis: 0 for every finite weight
            alpha = tl.exp(a - a)
            da = alpha * (dalpha - alpha * dalpha)
        else:
            ra_c = _clamp_eps(ra, EPS)
            alpha = a / ra_c
            # Clamped only where ||a|| < eps: a NaN ||a|| takes the full branch, NaN.
            da = tl.where(ra < EPS, dalpha / EPS, (dalpha - alpha * dgg) / ra_c)
        das = tl.where(r_mask, da * scale, 0.0)
        t = tl.zeros([BLOCK_N], ACC)  # q . dqn, over every D tile
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            x = _tile(q_b, rows, r_mask, q_s1, dd, dd < D, ACC)
            w = tl.load(w_ptr + dd * w_s0, mask=dd < D, other=0.0).to(ACC)
            dgv = tl.load(dg_b + dd, mask=dd < D, other=0.0)
            dqn = (_tile(gq_b, rows, r_mask, gq_s1, dd, dd < D, ACC) + alpha[:, None] * dgv[None, :]
                   + das[:, None] * w[None, :])
            t += tl.sum(x * dqn, axis=1)
        x = _tile(q_b, rows, r_mask, q_s1, d, d_mask, ACC)
        w = tl.load(w_ptr + d * w_s0, mask=d_mask, other=0.0).to(ACC)
        dgv = tl.load(dg_b + d, mask=d_mask, other=0.0)
        dqn = (_tile(gq_b, rows, r_mask, gq_s1, d, d_mask, ACC) + alpha[:, None] * dgv[None, :]
               + das[:, None] * w[None, :])
        dq = _normalize_backward(dqn, x, norm, inv, t, EPS)
        tl.store(dq_ptr + (b * N + rows[:, None]) * D + d[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=r_mask[:, None] & d_mask[None, :])
        dw_acc += tl.sum((das * inv)[:, None] * x, axis=0)
    tl.store(dwp_ptr + (b * CHUNKS + chunk) * D + d, dw_acc, mask=d_mask)


@triton.jit
def _additive_attention_backward_dw_kernel(dwp_ptr, dw_ptr, D, TASKS, BLOCK_D: tl.constexpr):
    """Program per D tile: dw_g = every (b, chunk) partial, summed in task order."""
    ACC: tl.constexpr = dwp_ptr.dtype.element_ty
    d = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], ACC)
    for task in range(0, TASKS):
        acc += tl.load(dwp_ptr + task * D + d, mask=d < D, other=0.0)
    tl.store(dw_ptr + d, acc.to(dw_ptr.dtype.element_ty), mask=d < D)  # dw: contiguous [D, 1]


def _blocks(B: int, N: int, D: int) -> dict[str, int]:
    """Tile sizes, fixed on the host: BLOCK_D covers D up to 512 in one tile, BLOCK_N keeps a
    tile near 4K elements, and CHUNK_N (a multiple of 64, so of BLOCK_N) leaves about 1024
    (b, chunk) programs. The chunk count sizes the workspaces, so it is no autotuning choice."""
    if _INTERPRET:
        return dict(_INTERPRET_BLOCKS)
    block_d = min(triton.next_power_of_2(D), 512)
    per_batch = max(1, triton.cdiv(1024, B))
    chunk_n = 64 * max(1, triton.cdiv(triton.cdiv(N, per_batch), 64))
    return {"BLOCK_N": max(8, 4096 // block_d), "BLOCK_D": block_d, "CHUNK_N": chunk_n}


def _grid(B: int, N: int, D: int, blocks: dict[str, int]) -> tuple[int, int, int]:
    return B, triton.cdiv(N, blocks["CHUNK_N"]), triton.cdiv(D, blocks["BLOCK_D"])


@_triton_op("mvit2::additive_attention_forward_triton")
def additive_attention_forward(
    q: Tensor, k: Tensor, w_g: Tensor, variant: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward op: ``(out, qn, g, a_norm)``, the contract of
    ``additive_attention_forward_reference``.

    Args:
        q, k: ``Tensor[B, N, D]``; w_g: ``Tensor[D, 1]``; one float dtype, one device.
        variant: ``"normalize"`` or ``"softmax"``.

    Returns:
        ``out = G * kn`` and ``qn``: ``Tensor[B, N, D]`` contiguous in the input dtype;
        ``g: Tensor[B, D]`` and ``a_norm: Tensor[B]`` in float32 (float64 for float64 inputs).
    """
    check_additive_inputs(q, k, w_g, variant)
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    B, N, D = k.shape
    acc = acc_dtype(k.dtype)
    out = torch.empty((B, N, D), dtype=k.dtype, device=k.device)
    qn = torch.empty((B, N, D), dtype=k.dtype, device=k.device)
    g = torch.empty((B, D), dtype=acc, device=k.device)
    a_norm = torch.empty((B,), dtype=acc, device=k.device)
    if B == 0 or _tracing(out):
        return out, qn, g, a_norm
    if N == 0 or D == 0:  # empty sums: G = 0 and ||a|| = 0
        return out, qn, g.zero_(), a_norm.zero_()
    blocks = _blocks(B, N, D)
    grid = _grid(B, N, D, blocks)
    softmax = variant == "softmax"
    gp = torch.empty((B, grid[1], D), dtype=acc, device=k.device)
    ssp = torch.empty((B, grid[1]), dtype=acc, device=k.device)
    wrap_triton(_additive_attention_forward_kernel)[grid](
        q, w_g, qn, gp, ssp, N, D, grid[1], blocks["CHUNK_N"],
        q.stride(0), q.stride(1), w_g.stride(0),
        SOFTMAX=softmax, EPS=ADDITIVE_EPS, BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"],
    )
    wrap_triton(_additive_attention_forward_reduce_kernel)[(B,)](
        gp, ssp, g, a_norm, D, grid[1],
        SOFTMAX=softmax, EPS=ADDITIVE_EPS, BLOCK_D=blocks["BLOCK_D"],
    )
    wrap_triton(_additive_attention_forward_out_kernel)[grid](
        k, g, out, N, D, blocks["CHUNK_N"], k.stride(0), k.stride(1),
        EPS=ADDITIVE_EPS, BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"],
    )
    return out, qn, g, a_norm


@_triton_op("mvit2::additive_attention_backward_triton")
def additive_attention_backward(
    grad_out: Tensor, grad_qn: Tensor, q: Tensor, k: Tensor, w_g: Tensor, g: Tensor,
    a_norm: Tensor, variant: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward op: ``(dq, dk, dw_g)``, the contract of ``additive_attention_backward_reference``.

    Args:
        grad_out, grad_qn: ``Tensor[B, N, D]`` in the dtype of q and k.
        q, k, w_g, variant: the forward's inputs.
        g, a_norm: ``Tensor[B, D]`` and ``Tensor[B]`` from the forward.

    Returns:
        ``dq, dk: Tensor[B, N, D]`` and ``dw_g: Tensor[D, 1]``, contiguous, in the input dtype.
    """
    check_additive_inputs(q, k, w_g, variant)
    _check_backward_extras(grad_out, grad_qn, k, g, a_norm)
    go, gq, q, k = (_unit_last_stride(t) for t in (grad_out, grad_qn, q, k))
    g, a_norm = g.contiguous(), a_norm.contiguous()
    B, N, D = k.shape
    dq = torch.empty((B, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, N, D), dtype=k.dtype, device=k.device)
    dw = torch.empty((D, 1), dtype=w_g.dtype, device=w_g.device)
    if D == 0 or _tracing(dq):
        return dq, dk, dw
    if B == 0 or N == 0:  # no tokens: dw_g is an empty sum
        return dq, dk, dw.zero_()
    blocks = _blocks(B, N, D)
    grid = _grid(B, N, D, blocks)
    part = torch.empty((B, grid[1], D), dtype=g.dtype, device=k.device)
    dg = torch.empty((B, D), dtype=g.dtype, device=k.device)
    dgg = torch.empty((B,), dtype=g.dtype, device=k.device)
    tiles = {"BLOCK_N": blocks["BLOCK_N"], "BLOCK_D": blocks["BLOCK_D"]}
    wrap_triton(_additive_attention_backward_kernel)[grid](
        go, k, g, dk, part, N, D, grid[1], blocks["CHUNK_N"],
        go.stride(0), go.stride(1), k.stride(0), k.stride(1), EPS=ADDITIVE_EPS, **tiles,
    )
    wrap_triton(_additive_attention_backward_reduce_kernel)[(B,)](
        part, g, dg, dgg, D, grid[1], BLOCK_D=blocks["BLOCK_D"],
    )
    dwp = torch.empty((B, grid[1], D), dtype=g.dtype, device=k.device)
    wrap_triton(_additive_attention_backward_dq_kernel)[grid](
        gq, q, w_g, dg, dgg, a_norm, dq, dwp, N, D, grid[1], blocks["CHUNK_N"],
        gq.stride(0), gq.stride(1), q.stride(0), q.stride(1), w_g.stride(0),
        SOFTMAX=variant == "softmax", EPS=ADDITIVE_EPS, **tiles,
    )
    wrap_triton(_additive_attention_backward_dw_kernel)[(grid[2],)](
        dwp, dw, D, B * grid[1], BLOCK_D=blocks["BLOCK_D"],
    )
    return dq, dk, dw


def _check_backward_extras(grad_out: Tensor, grad_qn: Tensor, k: Tensor, g: Tensor,
                           a_norm: Tensor) -> None:
    """What the backward takes beyond the forward's inputs: gradients like k, and the saved
    statistics g [B, D] and a_norm [B] in the accumulation dtype."""
    for name, t in (("grad_out", grad_out), ("grad_qn", grad_qn)):
        if t.dtype != k.dtype or t.device != k.device or t.shape != k.shape:
            raise ValueError(f"{name} must be {k.dtype} on {k.device} with shape [B, N, D] = "
                             f"{list(k.shape)}, got {t.dtype} on {t.device}, {list(t.shape)}")
    B, _N, D = k.shape
    acc = acc_dtype(k.dtype)
    for name, t, shape in (("g", g, (B, D)), ("a_norm", a_norm, (B,))):
        if t.dtype != acc or t.device != k.device or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {acc} on {k.device} with shape {list(shape)}, "
                             f"got {t.dtype} on {t.device}, {list(t.shape)}")
