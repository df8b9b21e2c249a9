"""What one layer measurement runs (``mvit2-bench layer``): MobileViTv2's whole attention layer,
``out_proj(separable_attention(*qkv_proj(x).split(...)))``, as a user would run it, in five
implementations timed back to back on the same inputs and the same parameters.

Implementations ("impl" in tables and JSON), all :class:`~mvit2_kernels.SeparableAttention`:

- ``fused-layer``: ``fused=True``, the whole layer without the keys
  (:func:`~mvit2_kernels.separable_attention_layer`);
- ``fused-kernel``: ``fused="kernel"``, the two 1×1 convolutions around the fused op;
- ``eager``: ``fused=False``, the standard layer (convolutions around the reference);
- ``compile``: ``torch.compile`` of the standard layer: what a user gets without this library;
- ``fused-layer+compile``: ``torch.compile`` of ``fused=True`` (the fused ops stay opaque to
  inductor; what it can still do is fuse the glue around them).

Passes: ``forward`` (inference, under ``torch.no_grad``) and ``forward+backward`` (a training
step of the layer: forward, then ``torch.autograd.grad`` of a random output gradient for x and
every parameter).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import SeparableAttention
from . import shapes
from .cases import DTYPES
from .runner import Group, Skip
from .shapes import Shape
from .timing import Budget, Timing, measure, rotating, rotation_count

__all__ = [
    "DEFAULT_DTYPES",
    "IMPLS",
    "LayerRow",
    "default_shapes",
    "group_rows",
    "input_sets",
    "layer_module",
    "layer_step",
    "set_bytes",
    "time_group",
]

# impl -> (SeparableAttention's ``fused``, whether torch.compile wraps the module)
_MODULES = {
    "fused-layer": (True, False),
    "fused-kernel": ("kernel", False),
    "eager": (False, False),
    "compile": (False, True),
    "fused-layer+compile": (True, True),
}
IMPLS = tuple(_MODULES)
# The dtypes a default run times: the training dtypes of each device (bf16 on CPU with --dtype).
DEFAULT_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}
# The layer's shapes are those of MobileViTv2-1.0's three attention stages on 256² images.
_STAGES = "w1.0-256px-"


def default_shapes(batch: int, quick: bool) -> list[Shape]:
    """The attention stages L3, L4, L5 of MobileViTv2-1.0 at 256² (``D, P, N`` = 128, 4, 256;
    192, 4, 64; 256, 4, 16), each at ``B=1`` and ``B=batch``; ``quick``: L3 only."""
    prefix = _STAGES + ("L3-" if quick else "")
    return [s for s in shapes.design_shapes(batch, ["separable"]) if s.name.startswith(prefix)]


@dataclass
class LayerRow:
    """One row of the layer table and of ``rows`` in a ``kind: "layer"`` JSON document;
    ``channels`` is the layer's width D (= C, the attention's channels, in MobileViTv2)."""

    shape: str
    batch: int
    channels: int
    pixels: int
    patches: int
    dtype: str
    pass_: str
    impl: str
    median_ms: float
    iqr_ms: float
    repeats: int
    rotated_sets: int
    round_ms: list[float]  # each round's median (--repeat); median_ms is their median
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None

    def to_json(self) -> dict:
        return {("pass" if k == "pass_" else k): v for k, v in dataclasses.asdict(self).items()}


def layer_module(
    impl: str, state: dict[str, torch.Tensor], dim: int, backend: str, training: bool
) -> nn.Module:
    """The ``SeparableAttention(dim)`` of ``impl`` holding the parameters ``state``, compiled
    for the ``+compile`` impls.

    Compiling resets dynamo first so that each shape, dtype and pass gets a fresh static-shape
    graph rather than hitting the recompile limit and silently falling back to eager.
    """
    fused, compiled = _MODULES[impl]
    like = next(iter(state.values()))  # load_state_dict copies into the module's own dtype
    module = SeparableAttention(dim, fused=fused, backend=backend).to(like.device, like.dtype)
    module.load_state_dict(state)
    module.train(training)
    if compiled:
        torch._dynamo.reset()
        return torch.compile(module, dynamic=False)
    return module


def input_sets(
    shape: Shape, dtype: torch.dtype, device: str, pass_: str, count: int
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` independent ``(x,)`` (forward) or ``(x, grad_out)`` (forward+backward) sets;
    x ``[B, D, P, N]`` contiguous, as the GroupNorm before the layer leaves it, and a leaf that
    requires grad in training, as the layer's input does in a model."""
    B, D, P, N = shape.batch, shape.channels, shape.pixels, shape.patches
    sets = []
    for _ in range(count):
        x = torch.randn(B, D, P, N, dtype=dtype, device=device)
        if pass_ == "forward":
            sets.append((x,))
        else:
            sets.append((x.requires_grad_(), torch.randn_like(x)))
    return sets


def set_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Bytes of one input set: x, plus the output gradient for a backward."""
    tensors = 1 if pass_ == "forward" else 2
    return tensors * shape.elements * shape.channels * dtype.itemsize


def layer_step(module: nn.Module, pass_: str) -> Callable[..., object]:
    """The function of one input set that a measurement calls."""
    if pass_ == "forward":

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return forward
    params = tuple(module.parameters())

    def forward_backward(x: torch.Tensor, grad_out: torch.Tensor):
        # Gradients are returned rather than accumulated into .grad: no zeroing or summing,
        # which a training loop would spread over the whole model, not charge to one layer.
        return torch.autograd.grad(module(x), (x, *params), grad_out)

    return forward_backward


def time_group(
    group: Group,
    impls: list[str],
    device: str,
    budget: Budget,
    backend: str,
    cache_bytes: int,
    tick: Callable[[str], None] = lambda impl: None,
) -> tuple[dict[str, Timing], list[Skip], int]:
    """Time ``impls`` on one group's inputs with one set of parameters: the timing of each impl,
    a :class:`Skip` for each that raised (not fatal), and the number of rotated input sets.
    ``tick(impl)`` is called after each, timed or skipped."""
    s, dtype = group.shape, DTYPES[group.dtype]
    training = group.pass_ == "forward+backward"
    state = {
        k: v.to(device=device, dtype=dtype)
        for k, v in SeparableAttention(s.channels).state_dict().items()
    }
    count = rotation_count(set_bytes(s, dtype, group.pass_), cache_bytes)
    sets = input_sets(s, dtype, device, group.pass_, count)
    timings, skips = {}, []
    for impl in impls:
        try:
            module = layer_module(impl, state, s.channels, backend, training)
            timings[impl] = measure(rotating(layer_step(module, group.pass_), sets), device, budget)
        except Exception as e:  # a missing kernel or a failed compile is reported, not fatal
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            skips.append(Skip(s.op, s.name, group.dtype, group.pass_, impl, reason))
        module = None
        gc.collect()  # this impl's graphs and saved activations go before the next is timed
        tick(impl)
    return timings, skips, count


def group_rows(group: Group, rounds: list[dict[str, Timing]], count: int) -> list[LayerRow]:
    """The rows of one group from its rounds (the :func:`time_group` timings of each): per impl
    the median of its round medians, the median of their IQRs and the speed-ups over the
    baselines' medians; impls in the order they were timed."""

    def median_of(impl: str, field: str) -> float | None:
        got = [getattr(r[impl], field) for r in rounds if impl in r]
        return statistics.median(got) if got else None

    impls = list(dict.fromkeys(impl for r in rounds for impl in r))
    eager, compiled = median_of("eager", "median_ms"), median_of("compile", "median_ms")
    s, rows = group.shape, []
    for impl in impls:
        ms = median_of(impl, "median_ms")
        rows.append(
            LayerRow(
                shape=s.name,
                batch=s.batch,
                channels=s.channels,
                pixels=s.pixels,
                patches=s.patches,
                dtype=group.dtype,
                pass_=group.pass_,
                impl=impl,
                median_ms=ms,
                iqr_ms=median_of(impl, "iqr_ms"),
                repeats=sum(r[impl].repeats for r in rounds if impl in r),
                rotated_sets=count,
                round_ms=[r[impl].median_ms for r in rounds if impl in r],
                speedup_vs_eager=None if eager is None else eager / ms,
                speedup_vs_compile=None if compiled is None else compiled / ms,
            )
        )
    return rows
