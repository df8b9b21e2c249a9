"""The kernel benchmark (``mvit2-bench``), data-driven like Liger-Kernel's benchmark scripts: per
op (:data:`OPS`) its inputs, eager reference, kernel and the bytes it must move. Every op runs the
impls ``copy`` (``dst.copy_(src)`` of as many bytes: the floor), ``eager`` (the reference),
``compile`` (``torch.compile(reference)``) and each kernel backend, in the passes ``forward`` and
``forward+backward`` (then ``torch.autograd.grad`` of random output gradients for the inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import (
    additive_attention,
    additive_attention_reference,
    available_backends,
    separable_attention,
    separable_attention_reference,
)
from . import results
from .shapes import Shape
from .timing import Budget, last_level_cache_bytes, rotating, rotation_count, time_each

__all__ = ["DEVICE_DTYPES", "DTYPES", "OPS", "PASSES", "Op", "kernel_backends", "time_group"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 has no fast CPU kernels in PyTorch's eager ops: the baselines would not be representative.
DEVICE_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp16", "bf16", "fp32")}
# The SwiftFormer variant timed. "softmax" moves the same bytes in the same passes (its token
# weights are all 1), so it would add run time, not information.
ADDITIVE_VARIANT = "normalize"
RATIOS = {"floor_fraction": "copy", "speedup_vs_eager": "eager", "speedup_vs_compile": "compile"}
Inputs = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]  # the op's inputs, grads


def _forward_backward(fn: Callable[..., Any]) -> Callable[..., Any]:
    def step(*tensors: torch.Tensor):
        inputs, grads = tensors[:3], tensors[3:]  # both ops take three inputs
        out = fn(*inputs)
        return torch.autograd.grad(out if isinstance(out, tuple) else (out,), inputs, grads)

    return step


# pass -> what it makes of the op's function; every pass but "forward" gets output gradients.
PASSES = {"forward": lambda fn: fn, "forward+backward": _forward_backward}


@dataclass(frozen=True)
class Op:
    """What the benchmark needs of one op."""

    reference: Callable[..., Any]
    kernel: Callable[..., Any]  # (*inputs, backend=...)
    inputs: Callable[[Shape, torch.dtype, str, bool], Inputs]  # (shape, dtype, device, backward)
    moved: Callable[[Shape, bool], int]  # elements the op must read and write: the floor


def _separable_inputs(s: Shape, dtype: torch.dtype, device: str, backward: bool) -> Inputs:
    # q, k and v are views of one [B, 1 + 2C, P, N] tensor, as qkv_proj's output is split in
    # the model: the strided case the kernels are built for.
    qkv = torch.randn(s.batch, 1 + 2 * s.channels, s.pixels, s.patches, dtype=dtype, device=device)
    grads = (torch.randn(s.batch, s.channels, s.pixels, s.patches, dtype=dtype, device=device),)
    return tuple(qkv.split([1, s.channels, s.channels], dim=1)), grads if backward else ()


def _additive_inputs(s: Shape, dtype: torch.dtype, device: str, backward: bool) -> Inputs:
    # q and k are separate contiguous [B, N, D] tensors, as to_query's and to_key's outputs are.
    q, k, *grads = (
        torch.randn(s.batch, s.patches, s.channels, dtype=dtype, device=device)
        for _ in range(4 if backward else 2)
    )
    return (q, k, torch.randn(s.channels, 1, dtype=dtype, device=device)), tuple(grads)


def _additive_reference(q: torch.Tensor, k: torch.Tensor, w_g: torch.Tensor):
    return additive_attention_reference(q, k, w_g, ADDITIVE_VARIANT)


def _additive_kernel(q: torch.Tensor, k: torch.Tensor, w_g: torch.Tensor, *, backend: str):
    return additive_attention(q, k, w_g, variant=ADDITIVE_VARIANT, backend=backend)


OPS = {
    # Forward reads q, k, v and writes y: (1 + 3C)·BPN elements; the backward adds reads of g,
    # q, k, v and writes of dq, dk, dv: (2 + 5C)·BPN.
    "separable": Op(
        separable_attention_reference, separable_attention, _separable_inputs,
        lambda s, backward: (1 + 3 * s.channels + backward * (2 + 5 * s.channels)) * s.elements,
    ),
    # Forward reads q, k and writes G·kn and qn: 4·BND; the backward reads both output
    # gradients, q, k and writes dq, dk: 6·BND. w_g and dw_g (D each) are left out.
    "additive": Op(
        _additive_reference, _additive_kernel, _additive_inputs,
        lambda s, backward: (4 + 6 * backward) * s.channels * s.elements,
    ),
}


def kernel_backends(device: str) -> list[str]:
    """The fused backends timed on ``device``; Triton only on a GPU (its CPU interpreter is a
    correctness tool)."""
    wanted = ("cuda", "triton") if device == "cuda" else ("cpu",)
    return [b for b in available_backends() if b in wanted]


def op_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Bytes the op must move at least: the copy floor's bytes."""
    return OPS[shape.op].moved(shape, pass_ != "forward") * dtype.itemsize


def impl_callable(impl: str, pass_: str, op: str) -> Callable[..., Any]:
    """The function of one input set that ``impl`` runs: ``(*inputs, *grads)``, or for
    ``copy`` ``(dst, src)``."""
    spec = OPS[op]
    if impl == "copy":
        return torch.Tensor.copy_
    if impl == "eager":
        fn = spec.reference
    elif impl == "compile":
        # A fresh dynamo state: each shape and dtype gets its own static graph instead of
        # hitting the recompile limit and silently falling back to eager.
        torch._dynamo.reset()
        fn = torch.compile(spec.reference, dynamic=False)
    else:

        def fn(*inputs: torch.Tensor):
            return spec.kernel(*inputs, backend=impl)

    return PASSES[pass_](fn)


def input_sets(shape: Shape, dtype: torch.dtype, device: str, pass_: str, cache: int) -> list:
    """Enough independent ``(*inputs, *grads)`` sets to outgrow ``cache`` twice over; for a
    backward the inputs are leaves that require grad (views keep sharing their base)."""
    backward = pass_ != "forward"

    def one():
        inputs, grads = OPS[shape.op].inputs(shape, dtype, device, backward)
        if backward:
            inputs = tuple(t.detach().requires_grad_() for t in inputs)
        return (*inputs, *grads)

    first = one()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in first}
    return [first, *(one() for _ in range(rotation_count(sum(storages.values()), cache) - 1))]


def copy_sets(nbytes: int, dtype: torch.dtype, device: str, cache: int) -> list:
    """Enough ``(dst, src)`` pairs, each copy reading and writing ``nbytes`` in all, to outgrow
    ``cache`` twice over."""
    numel = max(1, nbytes // (2 * dtype.itemsize))
    return [
        (torch.empty(numel, dtype=dtype, device=device),
         torch.randn(numel, dtype=dtype, device=device))
        for _ in range(rotation_count(nbytes, cache))
    ]


def time_group(
    group: tuple[Shape, str, str], impls: list[str], device: str, budget: Budget, tick: Callable
) -> dict[str, Any]:
    """Time ``impls`` on one (shape, dtype, pass)'s inputs: a Measurement, or the exception
    raised, per impl."""
    shape, dtype_name, pass_ = group
    dtype, cache = DTYPES[dtype_name], last_level_cache_bytes(device)
    nbytes, sets = op_bytes(shape, dtype, pass_), input_sets(shape, dtype, device, pass_, cache)

    def build(impl: str):
        impl_sets = copy_sets(nbytes, dtype, device, cache) if impl == "copy" else sets
        fn = rotating(impl_callable(impl, pass_, shape.op), impl_sets)
        return fn, {"rotated_sets": len(impl_sets), "bytes": nbytes}

    return time_each(impls, build, device, budget, tick)


def fields(group: tuple[Shape, str, str]) -> dict:
    """What one group's rows (and skips) say of it."""
    s, dtype, pass_ = group
    return {"op": s.op, "shape": s.name, "batch": s.batch, "channels": s.channels,
            "pixels": s.pixels, "patches": s.patches, "dtype": dtype, "pass": pass_}


def rows(group: tuple[Shape, str, str], timed: dict[str, list]) -> list[dict]:
    """The JSON rows of one group from its rounds (docs/performance.md)."""
    out = results.summarize(fields(group), timed, RATIOS)
    floor = next((r["median_ms"] for r in out if r["impl"] == "copy"), None)
    for r in out:
        r.update(gbps=r["bytes"] / r["median_ms"] / 1e6, floor_ms=floor)
    return out
