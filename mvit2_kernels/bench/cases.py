"""What one separable-attention measurement runs: its inputs, its callable and its byte count.

Implementations ("impl" in tables and JSON):

- ``copy``: ``dst.copy_(src)`` moving as many bytes (read + write) as the op must: the floor;
- ``eager``: :func:`mvit2_kernels.reference.separable_attention_reference`, autograd for backward;
- ``compile``: ``torch.compile(reference)``, compiled per shape and dtype;
- a kernel backend (``cpu``, ``cuda``, ``triton``): ``separable_attention(..., backend=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import available_backends, separable_attention
from ..reference import separable_attention_reference
from .shapes import Shape

__all__ = [
    "DEVICE_DTYPES",
    "DTYPES",
    "PASSES",
    "copy_into",
    "copy_sets",
    "impl_callable",
    "input_sets",
    "kernel_backends",
    "op_bytes",
    "set_bytes",
]

PASSES = ("forward", "forward+backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 has no fast CPU kernels in PyTorch's eager ops: the baselines would not be representative.
DEVICE_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp16", "bf16", "fp32")}


def kernel_backends(device: str) -> list[str]:
    """The fused backends that run on ``device`` as performance backends. The reference is the
    baseline, and Triton counts only on a GPU: its CPU interpreter is a correctness tool."""
    wanted = ("cuda", "triton") if device == "cuda" else ("cpu",)
    return [b for b in available_backends() if b in wanted]


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def op_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Bytes the op must move at least (DESIGN §1, the floor): forward reads q, k, v and writes
    y, ``(1 + 3C)·B·P·N`` elements; backward adds reads of g, q, k, v and writes of dq, dk, dv,
    ``(2 + 5C)·B·P·N`` elements."""
    elements = (1 + 3 * shape.channels) * shape.elements
    if pass_ == "forward+backward":
        elements += (2 + 5 * shape.channels) * shape.elements
    return elements * _itemsize(dtype)


def set_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Bytes of one input set: the qkv tensor, plus the output gradient for a backward."""
    channels = 1 + 2 * shape.channels + (shape.channels if pass_ == "forward+backward" else 0)
    return channels * shape.elements * _itemsize(dtype)


def input_sets(
    shape: Shape, dtype: torch.dtype, device: str, pass_: str, count: int
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` independent ``(q, k, v)`` (``(q, k, v, grad_y)`` for a backward). q, k and v
    are views of one ``[B, 1 + 2C, P, N]`` tensor, as ``qkv_proj``'s output is split in the
    model: the strided case the kernels are built for."""
    B, C, P, N = shape.batch, shape.channels, shape.pixels, shape.patches
    sets = []
    for _ in range(count):
        qkv = torch.randn(B, 1 + 2 * C, P, N, dtype=dtype, device=device)
        q, k, v = qkv.split([1, C, C], dim=1)
        if pass_ == "forward":
            sets.append((q, k, v))
            continue
        # Detached views are leaves that still share qkv's storage: gradients come back per
        # view, without the cost of assembling a dqkv tensor, which is not part of the op.
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        sets.append((q, k, v, torch.randn(B, C, P, N, dtype=dtype, device=device)))
    return sets


def copy_sets(
    nbytes: int, dtype: torch.dtype, device: str, count: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` ``(dst, src)`` pairs whose copy reads and writes ``nbytes`` in all."""
    numel = max(1, nbytes // (2 * _itemsize(dtype)))
    return [
        (
            torch.empty(numel, dtype=dtype, device=device),
            torch.randn(numel, dtype=dtype, device=device),
        )
        for _ in range(count)
    ]


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    return dst.copy_(src)


def impl_callable(impl: str, pass_: str) -> Callable[..., Any]:
    """The function of one input set that a measurement calls; ``copy`` takes ``(dst, src)``.

    ``compile`` resets dynamo first, so each shape and dtype gets a fresh, static-shape graph
    rather than hitting the recompile limit and silently falling back to eager.
    """
    if impl == "copy":
        return copy_into
    if impl == "eager":
        op = separable_attention_reference
    elif impl == "compile":
        torch._dynamo.reset()
        op = torch.compile(separable_attention_reference, dynamic=False)
    else:

        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return separable_attention(q, k, v, backend=impl)

    if pass_ == "forward":
        return op

    def forward_backward(q, k, v, grad_y):
        return torch.autograd.grad(op(q, k, v), (q, k, v), grad_y)

    return forward_backward
