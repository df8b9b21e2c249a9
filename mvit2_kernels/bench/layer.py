"""The layer benchmark (``mvit2-bench layer``): MobileViTv2's whole attention layer,
``out_proj(separable_attention(*qkv_proj(x).split(...)))``, as
:class:`~mvit2_kernels.SeparableAttention` runs it, in five implementations ("impl") timed back
to back on the same inputs and parameters:

- ``fused-layer``: ``fused=True``, the whole layer without the keys;
- ``fused-kernel``: ``fused="kernel"``, the two 1×1 convolutions around the fused op;
- ``eager``: ``fused=False``, the standard layer (convolutions around the reference);
- ``compile``: ``torch.compile`` of the standard layer: what a user gets without this library;
- ``fused-layer+compile``: ``torch.compile`` of ``fused=True`` (the fused ops stay opaque to
  inductor, which can still fuse the glue around them).

Passes: ``forward`` (under ``torch.no_grad``) and ``forward+backward`` (forward, then
``torch.autograd.grad`` of a random output gradient for x and every parameter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import SeparableAttention
from . import results
from .kernels import DTYPES
from .shapes import Shape, design_shapes
from .timing import Budget, last_level_cache_bytes, rotating, rotation_count, time_each

__all__ = ["DEFAULT_DTYPES", "IMPLS", "default_shapes", "layer_module", "layer_step", "time_group"]

# impl -> (SeparableAttention's ``fused``, whether torch.compile wraps the module)
IMPLS = {
    "fused-layer": (True, False),
    "fused-kernel": ("kernel", False),
    "eager": (False, False),
    "compile": (False, True),
    "fused-layer+compile": (True, True),
}
DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}  # the training dtype of each device
RATIOS = {"speedup_vs_eager": "eager", "speedup_vs_compile": "compile"}


def default_shapes(batch: int, quick: bool) -> list[Shape]:
    """The attention stages L3, L4, L5 of MobileViTv2-1.0 at 256², each at ``B=1`` and
    ``B=batch``; ``quick``: L3 only."""
    prefix = "w1.0-256px-" + ("L3-" if quick else "")
    return [s for s in design_shapes(batch, ["separable"]) if s.name.startswith(prefix)]


def layer_module(impl: str, state: dict[str, torch.Tensor], dim: int, backend: str,
                 training: bool) -> nn.Module:
    """The ``SeparableAttention(dim)`` of ``impl`` holding the parameters ``state`` (in their
    dtype), compiled afresh for the ``+compile`` impls."""
    fused, compiled = IMPLS[impl]
    like = next(iter(state.values()))
    module = SeparableAttention(dim, fused=fused, backend=backend).to(like.device, like.dtype)
    module.load_state_dict(state)
    module.train(training)
    if compiled:
        torch._dynamo.reset()  # a static graph per group, never the recompile limit's fallback
        return torch.compile(module, dynamic=False)
    return module


def layer_step(module: nn.Module, pass_: str) -> Callable[..., Any]:
    """The function of one input set, ``(x,)`` or ``(x, grad_out)``, that a measurement calls."""
    if pass_ == "forward":

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return forward
    params = tuple(module.parameters())

    def forward_backward(x: torch.Tensor, grad_out: torch.Tensor):
        # Gradients returned, not accumulated into .grad: zeroing and summing belong to the
        # training loop of the whole model, not to one layer.
        return torch.autograd.grad(module(x), (x, *params), grad_out)

    return forward_backward


def jobs(group: tuple[Shape, str, str], impls: list[str]) -> list[tuple[str, None]]:
    """The ``(impl, None)`` timings of one group (one round; the layer has one gradient path)."""
    return [(impl, None) for impl in impls]


def time_group(group: tuple[Shape, str, str], impls: list[str], device: str, budget: Budget,
               backend: str, tick: Callable) -> dict:
    """Time ``impls`` on one (shape, dtype, pass) with one set of parameters: ``(impl, None) ->
    [Measurement or the exception raised]``. x ``[B, D, P, N]`` is contiguous (as the GroupNorm
    before the layer leaves it) and, in training, a leaf that requires grad."""
    s, dtype_name, pass_ = group
    dtype, training = DTYPES[dtype_name], pass_ == "forward+backward"
    state = {k: v.to(device=device, dtype=dtype)
             for k, v in SeparableAttention(s.channels).state_dict().items()}
    count = rotation_count((1 + training) * s.channels * s.elements * dtype.itemsize,
                           last_level_cache_bytes(device))
    sets = []
    for _ in range(count):
        x = torch.randn(s.batch, s.channels, s.pixels, s.patches, dtype=dtype, device=device)
        sets.append((x.requires_grad_(), torch.randn_like(x)) if training else (x,))

    def build(impl: str):
        module = layer_module(impl, state, s.channels, backend, training)
        return rotating(layer_step(module, pass_), sets), {"rotated_sets": count}

    return time_each([((i, None), lambda i=i: build(i)) for i in impls], device, budget, tick)


def fields(group: tuple[Shape, str, str]) -> dict:
    """What one group's rows (and skips) say of it."""
    s, dtype, pass_ = group
    return {"shape": s.name, "batch": s.batch, "channels": s.channels, "pixels": s.pixels,
            "patches": s.patches, "dtype": dtype, "pass": pass_}


def rows(group: tuple[Shape, str, str], timed: dict[tuple, list]) -> list[dict]:
    """The JSON rows of one group from its rounds (docs/performance.md)."""
    return results.summarize(fields(group), timed, RATIOS)
