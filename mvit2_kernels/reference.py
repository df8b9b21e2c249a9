"""The maths of the fused ops in plain PyTorch: the specification every kernel is tested against.

Nothing here is fused or fast; it is written to be read next to ``docs/design.md`` §1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import acc_dtype

__all__ = [
    "additive_attention_backward_reference",
    "additive_attention_forward_reference",
    "additive_attention_reference",
    "separable_attention_backward_reference",
    "separable_attention_forward_reference",
    "separable_attention_reference",
    "separable_layer_context_backward_reference",
    "separable_layer_context_forward_reference",
    "separable_layer_epilogue_backward_reference",
    "separable_layer_epilogue_forward_reference",
    "separable_layer_reference",
]


def separable_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """MobileViTv2 separable self-attention, differentiable by autograd.

    Args:
        q: ``Tensor[B, 1, P, N]`` context scores.
        k: ``Tensor[B, C, P, N]`` keys.
        v: ``Tensor[B, C, P, N]`` values.

    Returns:
        ``Tensor[B, C, P, N]``: ``relu(v) * sum_n(softmax_N(q) * k)``.
    """
    s = torch.softmax(q, dim=-1)
    ctx = (k * s).sum(dim=-1, keepdim=True)
    return torch.relu(v) * ctx


def separable_attention_forward_reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The forward op's contract: ``(y, ctx)`` with ``ctx`` kept in the accumulation dtype.

    fp16/bf16 are computed in float32 (as the kernels accumulate); ``y`` is returned in the
    input dtype and ``ctx: Tensor[B, C, P, 1]`` in float32 (float64 for float64 inputs).
    """
    acc = acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s = torch.softmax(qf, dim=-1)
    ctx = (kf * s).sum(dim=-1, keepdim=True)
    return (torch.relu(vf) * ctx).to(q.dtype), ctx


def separable_attention_backward_reference(
    grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's contract: ``(dq, dk, dv)`` from docs/design.md §1, in the input dtype."""
    acc = acc_dtype(q.dtype)
    g, qf, kf, vf = grad_y.to(acc), q.to(acc), k.to(acc), v.to(acc)
    s = torch.softmax(qf, dim=-1)
    dv = torch.where(vf <= 0, 0.0, g * ctx)  # relu's backward: NaN v passes the gradient
    dctx = (g * torch.relu(vf)).sum(dim=-1, keepdim=True)
    dk = dctx * s
    ds = (dctx * kf).sum(dim=1, keepdim=True)
    dq = s * (ds - (dctx * ctx).sum(dim=1, keepdim=True))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- The whole layer and the pieces of its fused form (docs/design.md §1, layer-level identity) --
#
# With s = softmax_N(q) summing to 1 and k = W_k x + b_k, ctx = W_k x̄ + b_k where x̄ = Σ_n s[n] x[n]:
# the keys never exist. docs/layer_fusion.md derives the backward. The fused layer is two
# library GEMMs (v and out_proj) and a tiny one (ctx), around the two kernels contracted below.


def separable_layer_reference(
    x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, out_weight: Tensor,
    out_bias: Tensor | None,
) -> Tensor:
    """The standard MobileViTv2 attention layer, differentiable by autograd: the oracle.

    Args:
        x: ``Tensor[B, D, P, N]``.
        qkv_weight: ``Tensor[1 + 2C, D, 1, 1]`` (``qkv_proj.weight``); qkv_bias: ``[1 + 2C]``.
        out_weight: ``Tensor[D_out, C, 1, 1]`` (``out_proj.weight``); out_bias: ``[D_out]``.

    Returns:
        ``Tensor[B, D_out, P, N]``: ``out_proj(relu(v) * sum_n softmax_N(q) * k)``.
    """
    C = (qkv_weight.shape[0] - 1) // 2
    q, k, v = _conv1x1(x, qkv_weight, qkv_bias).split([1, C, C], dim=1)
    return _conv1x1(separable_attention_reference(q, k, v), out_weight, out_bias)


def _conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d`` with a 1×1 kernel, written out so that empty P or N work too."""
    out = torch.einsum("oi,bipn->bopn", weight.flatten(1), x)
    return out if bias is None else out + bias[:, None, None]


def separable_layer_context_forward_reference(x: Tensor, w_q: Tensor) -> tuple[Tensor, Tensor]:
    """The context kernel's contract: one pass over x for the scores, their softmax and x̄.

    Args:
        x: ``Tensor[B, D, P, N]``.
        w_q: ``Tensor[D]``, the q row of ``qkv_proj.weight``. q's bias is not an input: softmax
            over N does not change when every score moves by the same amount.

    Returns:
        ``(s, xbar)``: ``s = softmax_N(w_q · x): Tensor[B, P, N]`` and
        ``xbar = sum_n s[n] x[:, n]: Tensor[B, D, P]``, both in float32 (float64 for float64).
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    s = torch.softmax(torch.einsum("d,bdpn->bpn", w_q.to(acc), xf), dim=-1)
    return s, torch.einsum("bpn,bdpn->bdp", s, xf).contiguous()


def separable_layer_context_backward_reference(
    grad_xbar: Tensor, x: Tensor, w_q: Tensor, s: Tensor, xbar: Tensor
) -> tuple[Tensor, Tensor]:
    """The context kernel's backward: ``(dx, dw_q)`` through x̄ and the scores.

    ``ds[n] = dx̄ · x[:, n]``; ``dq = s * (ds - dx̄ · x̄)`` (the softmax backward, with
    ``sum_n s[n] ds[n] = dx̄ · x̄``); ``dx = dx̄ ⊗ s + w_q ⊗ dq`` in x's dtype (the caller adds
    ``W_v^T dv``); ``dw_q = sum_{b,p,n} dq[n] x[:, n]`` in float32 (float64 for float64).
    grad_xbar is ``Tensor[B, D, P]`` in that accumulation dtype, like s and xbar.
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    ds = torch.einsum("bdp,bdpn->bpn", grad_xbar, xf)
    dq = s * (ds - (grad_xbar * xbar).sum(dim=1)[..., None])
    dx = grad_xbar[..., None] * s[:, None] + w_q.to(acc)[:, None, None] * dq[:, None]
    return dx.to(x.dtype), torch.einsum("bpn,bdpn->d", dq, xf)


def separable_layer_epilogue_forward_reference(v: Tensor, ctx: Tensor) -> Tensor:
    """The epilogue kernel's contract: ``y = relu(v) * ctx`` in v's dtype.

    v: ``Tensor[B, C, P, N]``; ctx: ``Tensor[B, C, P]`` in float32 (float64 for float64).
    """
    return (torch.relu(v.to(ctx.dtype)) * ctx[..., None]).to(v.dtype)


def separable_layer_epilogue_backward_reference(
    grad_y: Tensor, v: Tensor, ctx: Tensor
) -> tuple[Tensor, Tensor]:
    """The epilogue's backward: ``dv = g * ctx`` where ``v > 0`` (relu's backward: NaN v passes
    the gradient), in v's dtype, and ``dctx = sum_n g * relu(v): Tensor[B, C, P]`` in ctx's dtype.
    """
    g, vf = grad_y.to(ctx.dtype), v.to(ctx.dtype)
    dv = torch.where(vf <= 0, 0.0, g * ctx[..., None])
    return dv.to(v.dtype), (g * torch.relu(vf)).sum(dim=-1)


# --- Efficient additive attention (SwiftFormer), docs/design.md §2 --------------------------------

# F.normalize's default, used for q, k and the token weights by every published SwiftFormer.
ADDITIVE_EPS = 1e-12
ADDITIVE_VARIANTS = ("normalize", "softmax")


def _additive_scale(D: int) -> float:
    """The published ``scale_factor = token_dim ** -0.5`` (token_dim = D in SwiftFormer). D = 0
    has no tokens' worth of features: the weights are then 0, not 0 * inf."""
    return D**-0.5 if D > 0 else 0.0


def additive_attention_reference(
    q: Tensor, k: Tensor, w_g: Tensor, variant: str = "normalize"
) -> tuple[Tensor, Tensor]:
    """SwiftFormer's efficient additive attention up to ``proj``, as published, autograd-able.

    Args:
        q: ``Tensor[B, N, D]``, the output of ``to_query``.
        k: ``Tensor[B, N, D]``, the output of ``to_key``.
        w_g: ``Tensor[D, 1]``, the learned token-weight vector.
        variant: ``"normalize"`` (the fixed SwiftFormer code and timm: L2-normalise the token
            weights over N) or ``"softmax"`` (the original release and transformers: softmax
            over the size-1 last axis, so every weight is exactly 1).

    Returns:
        ``(G * kn, qn)``, both ``Tensor[B, N, D]``: the input of ``proj`` and the residual.
    """
    qn = F.normalize(q, dim=-1, eps=ADDITIVE_EPS)
    kn = F.normalize(k, dim=-1, eps=ADDITIVE_EPS)
    a = (qn @ w_g) * _additive_scale(q.shape[-1])  # [B, N, 1]
    if variant == "normalize":
        alpha = F.normalize(a, dim=1, eps=ADDITIVE_EPS)
    elif variant == "softmax":
        alpha = a.softmax(dim=-1)
    else:
        raise ValueError(f"variant must be one of {ADDITIVE_VARIANTS}, got {variant!r}")
    g = (alpha * qn).sum(dim=1, keepdim=True)  # [B, 1, D]
    return g * kn, qn


def additive_attention_forward_reference(
    q: Tensor, k: Tensor, w_g: Tensor, variant: str = "normalize"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward op's contract: ``(out, qn, g, a_norm)``.

    ``out = G * kn`` and ``qn`` are ``Tensor[B, N, D]`` in the input dtype; the saved statistics
    ``g = G: Tensor[B, D]`` and ``a_norm = ||a||_2 over N: Tensor[B]`` (unclamped) are float32
    (float64 for float64 inputs). The per-token norms are not saved: the backward recomputes them
    from the rows it reads anyway.
    """
    acc = acc_dtype(q.dtype)
    qf, kf, wf = q.to(acc), k.to(acc), w_g.to(acc)
    qn = F.normalize(qf, dim=-1, eps=ADDITIVE_EPS)
    kn = F.normalize(kf, dim=-1, eps=ADDITIVE_EPS)
    a = (qn @ wf)[..., 0] * _additive_scale(q.shape[-1])  # [B, N]
    a_norm = torch.linalg.vector_norm(a, dim=1)
    alpha = _additive_weights(a, a_norm, variant)
    g = (alpha[..., None] * qn).sum(dim=1)
    return (g[:, None, :] * kn).to(q.dtype), qn.to(q.dtype), g, a_norm


def additive_attention_backward_reference(
    grad_out: Tensor,
    grad_qn: Tensor,
    q: Tensor,
    k: Tensor,
    w_g: Tensor,
    g: Tensor,
    a_norm: Tensor,
    variant: str = "normalize",
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's contract: ``(dq, dk, dw_g)`` in the input dtype, derived by hand.

    With ``r = max(||x||, eps)`` the backward of ``xn = x / r`` is ``dxn / eps`` where
    ``||x|| < eps`` (clamped) and ``(dxn - xn (xn . dxn)) / r`` otherwise: at equality, as
    autograd's clamp_min passes the gradient there, and where the norm is NaN, which the full
    formula carries into every element (a test ``||x|| >= eps`` would be false for NaN and give
    the clamped branch's finite values). Per batch:

        dG      = sum_n grad_out[n] * kn[n]                  dkn[n] = grad_out[n] * G
        dalpha  = qn . dG
        da      = normalize: (dalpha - alpha (dG . G)) / r_a   (sum_m alpha[m] dalpha[m] = dG . G)
                  softmax:   alpha (dalpha - alpha dalpha)     (0 for every finite weight)
        dqn[n]  = grad_qn[n] + alpha[n] dG + da[n] * scale * w_g
        dw_g    = sum_{b, n} da[n] * scale * qn[n]
    """
    acc = acc_dtype(q.dtype)
    go, gq, qf, kf, wf = (t.to(acc) for t in (grad_out, grad_qn, q, k, w_g))
    scale = _additive_scale(q.shape[-1])
    qn, q_norm = _normalize_with_norm(qf)
    kn, k_norm = _normalize_with_norm(kf)
    dg = (go * kn).sum(dim=1)  # [B, D]
    dk = _normalize_backward(go * g[:, None, :], kn, k_norm)
    a = (qn @ wf)[..., 0] * scale
    alpha = _additive_weights(a, a_norm, variant)
    dalpha = (qn * dg[:, None, :]).sum(dim=-1)  # [B, N]
    if variant == "normalize":
        ra = a_norm.clamp_min(ADDITIVE_EPS)[:, None]
        dot = (dg * g).sum(dim=-1, keepdim=True)
        da = torch.where(a_norm[:, None] < ADDITIVE_EPS, dalpha / ADDITIVE_EPS,
                         (dalpha - alpha * dot) / ra)  # NaN ||a||: the full, NaN, branch
    else:
        da = alpha * (dalpha - alpha * dalpha)
    dqn = gq + alpha[..., None] * dg[:, None, :] + (da * scale)[..., None] * wf[:, 0]
    dq = _normalize_backward(dqn, qn, q_norm)
    dw = ((da * scale)[..., None] * qn).sum(dim=(0, 1))[:, None]
    return dq.to(q.dtype), dk.to(k.dtype), dw.to(w_g.dtype)


def _additive_weights(a: Tensor, a_norm: Tensor, variant: str) -> Tensor:
    """alpha[B, N] from a[B, N]: normalised over N, or softmax over a size-1 axis (exp(a - a))."""
    if variant == "normalize":
        return a / a_norm.clamp_min(ADDITIVE_EPS)[:, None]
    if variant == "softmax":
        return torch.exp(a - a)
    raise ValueError(f"variant must be one of {ADDITIVE_VARIANTS}, got {variant!r}")


def _normalize_with_norm(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(ADDITIVE_EPS), norm


def _normalize_backward(dxn: Tensor, xn: Tensor, norm: Tensor) -> Tensor:
    """The clamped branch only where ``norm < eps``: a NaN norm takes the full one, NaN."""
    full = (dxn - xn * (xn * dxn).sum(dim=-1, keepdim=True)) / norm.clamp_min(ADDITIVE_EPS)
    return torch.where(norm < ADDITIVE_EPS, dxn / ADDITIVE_EPS, full)
