"""What one kernel measurement runs: its inputs, its callable and its byte count, for both ops
(``separable``: MobileViTv2's separable self-attention; ``additive``: SwiftFormer's efficient
additive attention, variant ``"normalize"``).

Implementations ("impl" in tables and JSON):

- ``copy``: ``dst.copy_(src)`` moving as many bytes (read + write) as the op must: the floor;
- ``eager``: the op's reference in :mod:`mvit2_kernels.reference`, autograd for backward;
- ``compile``: ``torch.compile(reference)``, compiled per shape and dtype;
- a kernel backend (``cpu``, ``cuda``, ``triton``): ``separable_attention(..., backend=...)`` or
  ``additive_attention(..., backend=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import available_backends, separable_attention
from ..ops import additive_attention
from ..reference import additive_attention_reference, separable_attention_reference
from .shapes import Shape

__all__ = [
    "ADDITIVE_VARIANT",
    "DEVICE_DTYPES",
    "DTYPES",
    "OP_TITLES",
    "PASSES",
    "additive_reference",
    "copy_into",
    "copy_sets",
    "impl_callable",
    "input_sets",
    "kernel_backends",
    "op_bytes",
    "set_bytes",
]

PASSES = ("forward", "forward+backward")
# The SwiftFormer variant timed. "softmax" reads and writes the same tensors in the same passes
# (its token weights are all 1), so it would add run time, not information.
ADDITIVE_VARIANT = "normalize"
# Printed above each op's table.
OP_TITLES = {
    "separable": "separable attention (MobileViTv2): q [B, 1, P, N], k, v [B, C, P, N]",
    "additive": f"additive attention (SwiftFormer, variant {ADDITIVE_VARIANT}): q, k [B, N, D]",
}
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
    """Bytes the op must move at least (the floor).

    Separable (DESIGN §1): forward reads q, k, v and writes y, ``(1 + 3C)·B·P·N`` elements;
    backward adds reads of g, q, k, v and writes of dq, dk, dv, ``(2 + 5C)·B·P·N`` elements.

    Additive (DESIGN §2, ``C = D``, ``P = 1``): forward reads q, k and writes ``G·kn``, qn,
    ``4·B·N·D`` elements; backward adds reads of both output gradients, q, k and writes of dq,
    dk, ``6·B·N·D`` elements. w_g and dw_g (``D`` elements each) are left out: under
    ``1/(3·B·N)`` of the total.
    """
    if shape.op == "additive":
        per_element = 4 if pass_ == "forward" else 4 + 6
        return per_element * shape.channels * shape.elements * _itemsize(dtype)
    elements = (1 + 3 * shape.channels) * shape.elements
    if pass_ == "forward+backward":
        elements += (2 + 5 * shape.channels) * shape.elements
    return elements * _itemsize(dtype)


def set_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Bytes of one input set: the op's inputs, plus the output gradients for a backward."""
    backward = pass_ == "forward+backward"
    if shape.op == "additive":  # q, k (+ grad_out, grad_qn); w_g is negligible
        channels = (2 + (2 if backward else 0)) * shape.channels
    else:  # the qkv tensor (+ grad_y)
        channels = 1 + 2 * shape.channels + (shape.channels if backward else 0)
    return channels * shape.elements * _itemsize(dtype)


def input_sets(
    shape: Shape, dtype: torch.dtype, device: str, pass_: str, count: int
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` independent sets of the op's three inputs, followed for a backward by the
    gradients of its outputs:

    - separable: ``(q, k, v[, grad_y])``; q, k and v are views of one ``[B, 1 + 2C, P, N]``
      tensor, as ``qkv_proj``'s output is split in the model: the strided case the kernels are
      built for;
    - additive: ``(q, k, w_g[, grad_out, grad_qn])``; q and k ``[B, N, D]`` are separate
      contiguous tensors, as the outputs of ``to_query`` and ``to_key`` are; w_g ``[D, 1]``.
    """
    make = _additive_set if shape.op == "additive" else _separable_set
    sets = []
    for _ in range(count):
        inputs, grads = make(shape, dtype, device, pass_ == "forward+backward")
        if pass_ == "forward":
            sets.append(inputs)
            continue
        # Detached tensors are leaves (views keep sharing their base's storage): gradients come
        # back per input, without the cost of assembling a dqkv tensor, which is not part of the op.
        sets.append((*(t.detach().requires_grad_() for t in inputs), *grads))
    return sets


def _separable_set(shape: Shape, dtype: torch.dtype, device: str, backward: bool):
    B, C, P, N = shape.batch, shape.channels, shape.pixels, shape.patches
    qkv = torch.randn(B, 1 + 2 * C, P, N, dtype=dtype, device=device)
    grads = (torch.randn(B, C, P, N, dtype=dtype, device=device),) if backward else ()
    return tuple(qkv.split([1, C, C], dim=1)), grads


def _additive_set(shape: Shape, dtype: torch.dtype, device: str, backward: bool):
    B, N, D = shape.batch, shape.patches, shape.channels
    q, k, *grads = (
        torch.randn(B, N, D, dtype=dtype, device=device) for _ in range(4 if backward else 2)
    )
    return (q, k, torch.randn(D, 1, dtype=dtype, device=device)), tuple(grads)


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


def impl_callable(impl: str, pass_: str, op: str = "separable") -> Callable[..., Any]:
    """The function of one input set of ``op`` that a measurement calls; ``copy`` takes
    ``(dst, src)``.

    ``compile`` resets dynamo first, so each shape and dtype gets a fresh, static-shape graph
    rather than hitting the recompile limit and silently falling back to eager.
    """
    if impl == "copy":
        return copy_into
    reference = additive_reference if op == "additive" else separable_attention_reference
    if impl == "eager":
        fn = reference
    elif impl == "compile":
        torch._dynamo.reset()
        fn = torch.compile(reference, dynamic=False)
    elif op == "additive":

        def fn(q: torch.Tensor, k: torch.Tensor, w_g: torch.Tensor):
            return additive_attention(q, k, w_g, variant=ADDITIVE_VARIANT, backend=impl)

    else:

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return separable_attention(q, k, v, backend=impl)

    if pass_ == "forward":
        return fn

    def forward_backward(*tensors: torch.Tensor):
        # Both ops take three inputs; the rest of a set are the gradients of the outputs.
        inputs, grads = tensors[:3], tensors[3:]
        out = fn(*inputs)
        return torch.autograd.grad(out if isinstance(out, tuple) else (out,), inputs, grads)

    return forward_backward


def additive_reference(
    q: torch.Tensor, k: torch.Tensor, w_g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager baseline of the additive rows: the reference of the timed variant."""
    return additive_attention_reference(q, k, w_g, ADDITIVE_VARIANT)
