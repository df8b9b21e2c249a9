"""Whole-model measurements for ``mvit2-bench model``: the implementations of each model, a
training or inference step, the throughput, and the share of the time spent in attention.

The share is measured by timing the attention modules on their own: one forward records the input
of every attention module, then those calls are replayed and timed like the model itself
(forward, or forward + backward in training). Attention here is the whole module, projections
included, since that is what a user swaps.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import environment
from .cases import DTYPES
from .shapes import SWIFTFORMER  # depths and dims (DESIGN §3); transformers' default is XS
from .timing import Budget, measure, rotating, rotation_count

__all__ = [
    "ModelCase",
    "ModelRow",
    "attention_modules",
    "model_builders",
    "model_step",
    "our_factory",
    "time_model",
]

IMPLS = (
    "fused",
    "fused+compile",
    "fused-kernel",
    "unfused",
    "transformers",
    "transformers+compile",
    "transformers+fuse_",
)
# A compiled model is one graph: there are no attention modules left to replay and time alone,
# so these rows leave the attention columns null.
COMPILED_IMPLS = ("fused+compile", "transformers+compile")
# "training+amp": the fp32 model's training step under torch.autocast (bf16), as people train.
MODES = ("inference", "training", "training+amp")
AMP_DTYPE = torch.bfloat16


@dataclass
class ModelRow:
    """One row of the model table and of ``rows`` in a ``kind: "model"`` JSON document."""

    model: str
    resolution: int
    batch: int
    dtype: str
    mode: str
    impl: str
    median_ms: float
    iqr_ms: float
    repeats: int
    images_per_s: float
    attention_modules: int
    attention_ms: float | None
    attention_share: float | None


class _Logits(nn.Module):
    """A transformers classifier as ``images -> logits``, like our models."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


@functools.cache
def _our_models():
    """``mvit2_kernels.models``, or ``None`` with the reason printed once (it may not exist)."""
    try:
        from .. import models
    except ImportError as e:
        print(
            f"mvit2-bench model: mvit2_kernels.models is not available ({e}); timing the "
            "transformers implementation only",
            file=sys.stderr,
        )
        return None
    return models


@functools.cache
def our_factory(name: str) -> Callable[..., nn.Module] | None:
    """``mvit2_kernels.models.<name>``, or ``None``, saying once why fused/unfused are left out."""
    ours = _our_models()
    factory = getattr(ours, name, None)
    if not callable(factory):  # a submodule of the same name is not the factory
        factory = None
    if ours is not None and factory is None:
        print(
            f"mvit2-bench model: mvit2_kernels.models has no {name}() (yet); the rows that "
            "need it are left out",
            file=sys.stderr,
        )
    return factory


def model_builders(family: str, variant: str) -> dict[str, Callable[[str], nn.Module]]:
    """For ``family`` in ``mobilevitv2`` (variant: the width) or ``swiftformer`` (``xs``, ``s``,
    ``l1``, ``l3``): ``impl -> build(backend)`` for every implementation present here."""
    import transformers

    import mvit2_kernels

    builders: dict[str, Callable[[str], nn.Module]] = {}
    if family == "mobilevitv2":
        width = float(variant)
        config = transformers.MobileViTV2Config(width_multiplier=width, num_labels=1000)
        hf_class = transformers.MobileViTV2ForImageClassification
        factory = our_factory("mobilevitv2")
        if factory is not None:
            builders["fused"] = lambda backend: factory(width=width, fused=True, backend=backend)
            # The projections as convolutions around the fused op (the keys are computed).
            builders["fused-kernel"] = lambda backend: factory(
                width=width, fused="kernel", backend=backend
            )
            builders["unfused"] = lambda _: factory(width=width, fused=False)
    else:
        depths, dims = SWIFTFORMER[variant]
        config = transformers.SwiftFormerConfig(depths=depths, embed_dims=dims, num_labels=1000)
        hf_class = transformers.SwiftFormerForImageClassification
        factory = our_factory(f"swiftformer_{variant}")
        if factory is not None:
            # transformers' SwiftFormer is the "softmax" variant; both move the same bytes.
            builders["fused"] = lambda backend: factory(
                variant="softmax", fused=True, backend=backend
            )
            builders["unfused"] = lambda _: factory(variant="softmax", fused=False)
    builders["transformers"] = lambda _: _Logits(hf_class(config))
    for impl in ("fused", "transformers"):
        if impl in builders:
            builders[f"{impl}+compile"] = _compiled(builders[impl])
    # fuse_ swaps a transformers model's attention for ours in place (top-level or in models).
    fuse = getattr(mvit2_kernels, "fuse_", None) or our_factory("fuse_")
    if fuse is not None:

        def fused_hf(backend: str) -> nn.Module:
            model = _Logits(hf_class(config))
            if fuse(model.hf, backend=backend) == 0:
                raise RuntimeError(f"fuse_ swapped no attention module of {hf_class.__name__}")
            return model

        builders["transformers+fuse_"] = fused_hf
    return builders


def _compiled(build: Callable[[str], nn.Module]) -> Callable[[str], nn.Module]:
    """``build`` under ``torch.compile(dynamic=False)``, compiled lazily at the first call."""

    def build_compiled(backend: str) -> nn.Module:
        # A fresh dynamo state per model: each case compiles its own static-shape graph instead
        # of hitting the recompile limit and silently running eager.
        torch._dynamo.reset()
        return torch.compile(build(backend), dynamic=False)

    return build_compiled


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules whose class name contains ``Attention``: ours
    (``SeparableAttention``, ``EfficientAdditiveAttention``) and transformers'
    (``MobileViTV2LinearSelfAttention``, ``SwiftFormerEfficientAdditiveAttention``)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if "attention" in type(module).__name__.lower():
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def model_step(model: nn.Module, mode: str) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """Inference: a forward under ``inference_mode``. Training: forward, cross-entropy, backward
    and an SGD step, as a training loop runs it."""
    if mode == "inference":

        def infer(x, _):
            with torch.inference_mode():
                return model(x)

        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    amp = mode == "training+amp"

    def train(x, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=AMP_DTYPE, enabled=amp):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    return train


def _attention_replay(model: nn.Module, x: torch.Tensor, mode: str):
    """The attention modules' calls of one forward on ``x``, as a callable that replays them
    (with a backward of a fixed output gradient in training), and the number of modules."""
    mods = attention_modules(model)
    calls = []

    def record(module, args, kwargs):
        calls.append(
            (module, [a.detach().clone() if torch.is_tensor(a) else a for a in args], kwargs)
        )

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if mode == "inference":

        def replay():
            with torch.inference_mode():
                for module, args, kwargs in calls:
                    module(*args, **kwargs)

        return replay, len(mods)
    grads = []
    amp = torch.autocast(x.device.type, dtype=AMP_DTYPE, enabled=mode == "training+amp")
    for module, args, kwargs in calls:
        for a in args:
            if torch.is_tensor(a) and a.is_floating_point():
                a.requires_grad_()
        with torch.no_grad(), amp:
            out = module(*args, **kwargs)
        grads.append(torch.randn_like(out[0] if isinstance(out, tuple) else out))
    params = [p for m in mods for p in m.parameters()]

    def replay_train():
        for p in params:
            p.grad = None  # as zero_grad(set_to_none=True) does in the model's step
        for (module, args, kwargs), g in zip(calls, grads, strict=True):
            with amp:
                out = module(*args, **kwargs)
            (out[0] if isinstance(out, tuple) else out).backward(g)

    return replay_train, len(mods)


@dataclass(frozen=True)
class ModelCase:
    family: str
    variant: str
    resolution: int
    batch: int
    mode: str

    @property
    def name(self) -> str:
        return f"{self.family}-{self.variant}"


def time_model(
    build: Callable[[str], nn.Module],
    impl: str,
    case: ModelCase,
    dtype: str,
    device: str,
    budget: Budget,
    backend: str,
) -> ModelRow:
    """Throughput of one implementation on one case, and its attention modules' share."""
    torch.manual_seed(0)
    model = build(backend).to(device=device, dtype=DTYPES[dtype])
    model.train(case.mode != "inference")
    shape = (case.batch, 3, case.resolution, case.resolution)
    image_bytes = case.batch * 3 * case.resolution**2 * model_itemsize(model)
    count = rotation_count(
        image_bytes, environment.last_level_cache_bytes(device), budget_bytes=256 << 20, max_sets=8
    )
    sets = [
        (
            torch.randn(shape, device=device, dtype=DTYPES[dtype]),
            torch.randint(0, 1000, (case.batch,), device=device),
        )
        for _ in range(count)
    ]
    t = measure(rotating(model_step(model, case.mode), sets), device, budget)
    if impl in COMPILED_IMPLS:
        n_modules, attention = len(attention_modules(model)), None
    else:
        replay, n_modules = _attention_replay(model, sets[0][0], case.mode)
        attention = measure(replay, device, budget).median_ms if n_modules else None
    return ModelRow(
        model=case.name,
        resolution=case.resolution,
        batch=case.batch,
        dtype=dtype,
        mode=case.mode,
        impl=impl,
        median_ms=t.median_ms,
        iqr_ms=t.iqr_ms,
        repeats=t.repeats,
        images_per_s=case.batch / (t.median_ms * 1e-3),
        attention_modules=n_modules,
        attention_ms=attention,
        attention_share=None if attention is None else attention / t.median_ms,
    )


def model_itemsize(model: nn.Module) -> int:
    return next(model.parameters()).element_size()
