"""MobileViTv2's attention layer as SeparableAttention runs it, every impl on the same inputs and
parameters: fused-layer (fused=True: the whole layer without the keys), fused-kernel (the 1x1
convolutions around the fused op), eager (the standard layer), compile (torch.compile of it: what
a user gets without this library) and fused-layer+compile (the fused ops stay opaque to inductor,
which can still fuse the glue around them). forward runs under torch.no_grad; forward+backward
takes torch.autograd.grad of a random output gradient for x and every parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import SeparableAttention
from .kernels import DTYPES, Shape, design_shapes, group_fields
from .timing import Kind, last_level_cache_bytes, rotating, rotation_count

# impl -> (SeparableAttention's ``fused``, whether torch.compile wraps the module)
IMPLS = {"fused-layer": (True, False), "fused-kernel": ("kernel", False), "eager": (False, False),
         "compile": (False, True), "fused-layer+compile": (True, True)}
DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}  # the training dtype of each device


def default_shapes(batch: int, quick: bool) -> list[Shape]:
    """MobileViTv2-1.0's attention stages at 256² (``quick``: L3 only), at B=1 and ``batch``."""
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
        return torch.no_grad()(module.__call__)
    params = tuple(module.parameters())
    # Gradients returned, not accumulated into .grad: zeroing and summing belong to the training
    # loop of the whole model, not to one layer.
    return lambda x, grad_out: torch.autograd.grad(module(x), (x, *params), grad_out)


def prepare(group: tuple[Shape, str, str], device: str, _budget, backend: str) -> Callable:
    """One set of parameters for every impl; x ``[B, D, P, N]`` is contiguous (as the GroupNorm
    before the layer leaves it) and, in training, a leaf that requires grad."""
    s, dtype_name, pass_ = group
    dtype, training = DTYPES[dtype_name], pass_ == "forward+backward"
    state = {k: v.to(device=device, dtype=dtype)
             for k, v in SeparableAttention(s.channels).state_dict().items()}
    count = rotation_count((1 + training) * s.channels * s.elements * dtype.itemsize,
                           last_level_cache_bytes(device))
    xs = [torch.randn(s.batch, s.channels, s.pixels, s.patches, dtype=dtype, device=device)
          for _ in range(count)]
    sets = [(x.requires_grad_(), torch.randn_like(x)) if training else (x,) for x in xs]

    def build(impl: str, _path: None):
        module = layer_module(impl, state, s.channels, backend, training)
        return rotating(layer_step(module, pass_), sets), {"rotated_sets": count}

    return build


KIND = Kind(lambda g: {k: v for k, v in group_fields(g).items() if k != "op"}, prepare,
            {"speedup_vs_eager": "eager", "speedup_vs_compile": "compile"})
