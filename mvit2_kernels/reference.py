"""The maths of the fused ops in plain PyTorch: the specification every kernel is tested against.

Nothing here is fused or fast; it is written to be read next to ``DESIGN.md`` §1.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "separable_attention_backward_reference",
    "separable_attention_forward_reference",
    "separable_attention_reference",
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
    acc = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    s = torch.softmax(qf, dim=-1)
    ctx = (kf * s).sum(dim=-1, keepdim=True)
    return (torch.relu(vf) * ctx).to(q.dtype), ctx


def separable_attention_backward_reference(
    grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op's contract: ``(dq, dk, dv)`` from DESIGN §1, in the input dtype."""
    acc = _acc_dtype(q.dtype)
    g, qf, kf, vf = grad_y.to(acc), q.to(acc), k.to(acc), v.to(acc)
    s = torch.softmax(qf, dim=-1)
    dv = g * ctx * (vf > 0)
    dctx = (g * torch.relu(vf)).sum(dim=-1, keepdim=True)
    dk = dctx * s
    ds = (dctx * kf).sum(dim=1, keepdim=True)
    dq = s * (ds - (dctx * ctx).sum(dim=1, keepdim=True))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
