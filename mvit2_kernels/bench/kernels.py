"""The kernel benchmark (``mvit2-bench``), data-driven like Liger-Kernel's benchmark scripts: per
op (:data:`OPS`) the tensors a model holds, the op's inputs made of them, the eager reference, the
kernel and the bytes it must move. Every op runs the impls ``copy`` (``dst.copy_(src)`` of as
many bytes: the floor), ``eager`` (the reference), ``compile`` (``torch.compile(reference)``) and
each kernel backend, in the passes ``forward`` and ``forward+backward``.

The backward is a training step's: ``backward()`` of random output gradients into the ``.grad``
of the tensors the model holds, along each of the op's gradient paths (:data:`GRAD_PATHS`), timed
interleaved in :data:`GRAD_ROUNDS` rounds.
"""

from __future__ import annotations

import dataclasses
import functools
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

__all__ = ["DEVICE_DTYPES", "DTYPES", "GRAD_PATHS", "OPS", "Op", "kernel_backends", "step",
           "time_group"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 has no fast CPU kernels in PyTorch's eager ops: the baselines would not be representative.
DEVICE_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("fp16", "bf16", "fp32")}
PASSES = ("forward", "forward+backward")
# set_to_none: every step starts with .grad = None (zero_grad's default), so autograd hands the
# new gradient over; accumulate: it is added into the existing .grad (gradient accumulation).
GRAD_PATHS = ("set_to_none", "accumulate")
GRAD_ROUNDS = 3  # the paths alternate; each figure is the median of its round medians
# "softmax" moves the same bytes in the same passes (its token weights are all 1).
ADDITIVE_VARIANT = "normalize"
RATIOS = {"floor_fraction": "copy", "speedup_vs_eager": "eager", "speedup_vs_compile": "compile"}


@dataclass(frozen=True)
class Op:
    """What the benchmark needs of one op."""

    reference: Callable[..., Any]
    kernel: Callable[..., Any]  # (*inputs, backend=...)
    leaves: Callable[[Shape, torch.dtype, str], tuple[torch.Tensor, ...]]  # what a model holds
    inputs: Callable[..., tuple[torch.Tensor, ...]]  # (*leaves) -> the op's inputs
    outputs: Callable[[Shape], list[tuple[int, ...]]]  # output shapes, for output gradients
    moved: Callable[[Shape, bool], int]  # elements the op must read and write: the floor
    grad_paths: tuple[str, ...] = GRAD_PATHS


OPS = {
    # q, k and v are views of one [B, 1 + 2C, P, N] qkv, as qkv_proj's output is split in the
    # model: the strided case the kernels are built for; the gradient lands in qkv.grad.
    # Forward reads q, k, v and writes y: (1 + 3C)·BPN elements; the backward adds reads of g,
    # q, k, v and writes of dq, dk, dv: (2 + 5C)·BPN.
    "separable": Op(
        separable_attention_reference, separable_attention,
        lambda s, dtype, device: (torch.randn(s.batch, 1 + 2 * s.channels, s.pixels, s.patches,
                                              dtype=dtype, device=device),),
        lambda qkv: qkv.split([1, qkv.shape[1] // 2, qkv.shape[1] // 2], dim=1),
        lambda s: [(s.batch, s.channels, s.pixels, s.patches)],
        lambda s, backward: (1 + 3 * s.channels + backward * (2 + 5 * s.channels)) * s.elements,
    ),
    # q and k are separate contiguous [B, N, D] tensors, as to_query's and to_key's outputs are.
    # Forward reads q, k and writes G·kn and qn: 4·BND; the backward reads both output
    # gradients, q, k and writes dq, dk: 6·BND. w_g and dw_g (D each) are left out. Its
    # gradients are separate tensors: one path tells what there is to tell.
    "additive": Op(
        functools.partial(additive_attention_reference, variant=ADDITIVE_VARIANT),
        functools.partial(additive_attention, variant=ADDITIVE_VARIANT),
        lambda s, dtype, device: (*(torch.randn(s.batch, s.patches, s.channels, dtype=dtype,
                                                device=device) for _ in range(2)),
                                  torch.randn(s.channels, 1, dtype=dtype, device=device)),
        lambda q, k, w_g: (q, k, w_g),
        lambda s: [(s.batch, s.patches, s.channels)] * 2,
        lambda s, backward: (4 + 6 * backward) * s.channels * s.elements,
        ("set_to_none",),
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


def op_function(impl: str, op: str) -> Callable[..., Any]:
    """The op as ``impl`` runs it: the reference, its ``torch.compile`` or a kernel backend."""
    spec = OPS[op]
    if impl == "eager":
        return spec.reference
    if impl == "compile":
        # A fresh dynamo state: each shape and dtype gets its own static graph instead of
        # hitting the recompile limit and silently falling back to eager.
        torch._dynamo.reset()
        return torch.compile(spec.reference, dynamic=False)
    return functools.partial(spec.kernel, backend=impl)


def step(fn: Callable[..., Any], op: str, grads: str | None) -> Callable[..., Any]:
    """One call on an input set: the forward ``fn(*inputs)``, or with ``grads`` (a gradient
    path) a training step on ``(leaves, output_grads)``: the leaves made into the op's inputs,
    its forward, and ``backward()`` into the leaves' .grad."""
    if grads is None:
        return fn

    def forward_backward(leaves: tuple[torch.Tensor, ...], out_grads: list[torch.Tensor]) -> None:
        if grads == "set_to_none":
            for t in leaves:
                t.grad = None
        out = fn(*OPS[op].inputs(*leaves))
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), out_grads)

    return forward_backward


def input_sets(shape: Shape, dtype: torch.dtype, device: str, backward: bool,
               cache: int) -> list[tuple]:
    """Enough independent sets to outgrow ``cache`` twice over: the op's inputs for a forward
    (views of the leaves, made once), ``(leaves, output_grads)`` for a backward (counting the
    leaves' .grad)."""
    spec = OPS[shape.op]

    def one():
        leaves = spec.leaves(shape, dtype, device)
        if not backward:
            return spec.inputs(*leaves)
        grads = [torch.randn(s, dtype=dtype, device=device) for s in spec.outputs(shape)]
        return tuple(t.requires_grad_() for t in leaves), grads

    first = one()
    tensors = [*first[0], *first[1]] if backward else first
    nbytes = sum(t.nbytes * (1 + t.requires_grad) for t in tensors)
    return [first, *(one() for _ in range(rotation_count(nbytes, cache) - 1))]


def copy_sets(nbytes: int, dtype: torch.dtype, device: str, cache: int) -> list:
    """Enough ``(dst, src)`` pairs, each copy reading and writing ``nbytes`` in all, to outgrow
    ``cache`` twice over."""
    numel = max(1, nbytes // (2 * dtype.itemsize))
    return [(torch.empty(numel, dtype=dtype, device=device),
             torch.randn(numel, dtype=dtype, device=device))
            for _ in range(rotation_count(nbytes, cache))]


def jobs(group: tuple[Shape, str, str], impls: list[str]) -> list[tuple[str, str | None]]:
    """The ``(impl, gradient path)`` timings of one group, in order: a forward's once, a
    backward's paths alternating over GRAD_ROUNDS rounds when there are several."""
    paths = OPS[group[0].op].grad_paths if group[2] != "forward" else (None,)
    rounds = GRAD_ROUNDS if len(paths) > 1 else 1
    return [(impl, path) for _ in range(rounds) for path in paths for impl in impls]


def time_group(group: tuple[Shape, str, str], impls: list[str], device: str, budget: Budget,
               tick: Callable) -> dict:
    """Time ``impls`` on one (shape, dtype, pass)'s inputs: ``(impl, path) -> [Measurement or
    the exception raised, ...]``, one per round."""
    shape, dtype_name, pass_ = group
    dtype, cache = DTYPES[dtype_name], last_level_cache_bytes(device)
    nbytes = op_bytes(shape, dtype, pass_)
    sets = input_sets(shape, dtype, device, pass_ != "forward", cache)
    fns: dict[str, Callable] = {}  # built once per group: one compile, whatever the rounds

    def build(impl: str, path: str | None):
        if impl == "copy":
            impl_sets, fn = copy_sets(nbytes, dtype, device, cache), torch.Tensor.copy_
        else:
            if impl not in fns:
                fns[impl] = op_function(impl, shape.op)
            impl_sets, fn = sets, step(fns[impl], shape.op, path)
        return rotating(fn, impl_sets), {"rotated_sets": len(impl_sets), "bytes": nbytes,
                                         "grads": path}

    todo = jobs(group, impls)
    rounds = todo.count(todo[0])  # the rounds share the budget of one measurement
    budget = dataclasses.replace(budget, warmup_s=budget.warmup_s / rounds,
                                 min_run_time_s=budget.min_run_time_s / rounds)
    return time_each([(key, functools.partial(build, *key)) for key in todo], device, budget, tick)


def fields(group: tuple[Shape, str, str]) -> dict:
    """What one group's rows (and skips) say of it."""
    s, dtype, pass_ = group
    return {"op": s.op, "shape": s.name, "batch": s.batch, "channels": s.channels,
            "pixels": s.pixels, "patches": s.patches, "dtype": dtype, "pass": pass_}


def rows(group: tuple[Shape, str, str], timed: dict[tuple, list]) -> list[dict]:
    """The JSON rows of one group from its rounds (docs/performance.md)."""
    out = results.summarize(fields(group), timed, RATIOS)
    floor = {r["grads"]: r["median_ms"] for r in out if r["impl"] == "copy"}
    for r in out:
        r.update(gbps=r["bytes"] / r["median_ms"] / 1e6, floor_ms=floor.get(r["grads"]))
    return out
