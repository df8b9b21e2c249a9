"""Autograd plumbing shared by the ops' ``autograd.Function``\\ s."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NoDoubleBackward"]


class NoDoubleBackward(torch.autograd.Function):
    """Passes gradients through, tied to the inputs they depend on, so that differentiating them
    raises instead of silently treating them as constants.

    ``NoDoubleBackward.apply(op_name, *inputs4, *grads)``: the first four tensors are the inputs
    the gradients depend on; the gradients come back as views."""

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
