"""Model throughput (images/s) in inference and training steps (SGD; training+amp: under bf16
autocast), ours fused and unfused against transformers', and the share of the step spent in
attention: one forward records the input of every attention module (projections included: what a
user swaps), then those calls are replayed and timed like the model.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import models as zoo
from ..models import fuse_
from ..models.swiftformer import CONFIGS as SWIFTFORMER
from .kernels import DTYPES
from .timing import Budget, Kind, last_level_cache_bytes, measure, rotating, rotation_count

IMPLS = ("fused", "fused+compile", "fused-kernel", "unfused", "transformers",
         "transformers+compile", "transformers+fuse_")
# "training+amp": the fp32 model's training step under torch.autocast (bf16), as people train.
MODES = ("inference", "training", "training+amp")
AMP_DTYPE = torch.bfloat16


class ModelCase(NamedTuple):
    family: str  # mobilevitv2 or swiftformer
    variant: str  # the width, or xs/s/l1/l3
    resolution: int
    batch: int
    mode: str
    dtype: str = "fp32"


class _Logits(nn.Module):
    """A transformers classifier as ``images -> logits``, like our models."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def model_builders(family: str, variant: str) -> dict[str, Callable[[str], nn.Module]]:
    """``impl -> build(backend)`` for ``family`` ``mobilevitv2`` (variant: the width) or
    ``swiftformer`` (``xs``, ``s``, ``l1``, ``l3``); transformers' models from a config."""
    import transformers

    if family == "mobilevitv2":
        config = transformers.MobileViTV2Config(width_multiplier=float(variant), num_labels=1000)
        hf_class = transformers.MobileViTV2ForImageClassification
        ours = {"fused": True, "fused-kernel": "kernel", "unfused": False}
        factory = functools.partial(zoo.mobilevitv2, float(variant))
    else:
        depths, dims = SWIFTFORMER[variant]
        config = transformers.SwiftFormerConfig(depths=depths, embed_dims=dims, num_labels=1000)
        hf_class = transformers.SwiftFormerForImageClassification
        ours = {"fused": True, "unfused": False}  # no keys to leave out: no fused-kernel
        # transformers' SwiftFormer is the "softmax" variant; both move the same bytes.
        factory = functools.partial(getattr(zoo, f"swiftformer_{variant}"), variant="softmax")

    def fused_hf(backend: str) -> nn.Module:
        model = _Logits(hf_class(config))
        if fuse_(model.hf, backend=backend) == 0:
            raise RuntimeError(f"fuse_ swapped no attention module of {hf_class.__name__}")
        return model

    def compiled(build: Callable[[str], nn.Module], backend: str) -> nn.Module:
        torch._dynamo.reset()  # a static graph per case, never the recompile limit's fallback
        return torch.compile(build(backend), dynamic=False)

    builders = {impl: lambda backend, f=fused: factory(fused=f, backend=backend)
                for impl, fused in ours.items()}
    builders["transformers"] = lambda _: _Logits(hf_class(config))
    builders["transformers+fuse_"] = fused_hf
    for impl in ("fused", "transformers"):
        builders[f"{impl}+compile"] = functools.partial(compiled, builders[impl])
    return builders


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules whose class name contains ``Attention``: ours, transformers'."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) not in inside and "attention" in type(module).__name__.lower():
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def model_step(model: nn.Module, mode: str) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """Inference: a forward under ``inference_mode``. Training: forward, cross-entropy, backward
    and an SGD step, as a training loop runs it (under bf16 autocast for ``training+amp``)."""
    if mode == "inference":
        return torch.inference_mode()(lambda x, _labels: model(x))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train(x: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=AMP_DTYPE, enabled=mode == "training+amp"):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    return train


def _first(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def attention_replay(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """The attention modules' calls of one forward on ``x`` as a callable that replays them as
    the mode's step runs them: under ``inference_mode``, or with a backward of a fixed output
    gradient (under bf16 autocast for ``training+amp``)."""
    mods, calls = attention_modules(model), []

    def record(m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((m, [a.detach().clone() if torch.is_tensor(a) else a for a in args], kwargs))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    training, grads = mode != "inference", [None] * len(calls)
    context = (torch.autocast(x.device.type, dtype=AMP_DTYPE, enabled=mode == "training+amp")
               if training else torch.inference_mode())
    for i, (m, args, kwargs) in enumerate(calls if training else ()):
        for a in args:
            if torch.is_tensor(a) and a.is_floating_point():
                a.requires_grad_()
        with torch.no_grad(), context:
            grads[i] = torch.randn_like(_first(m(*args, **kwargs)))
    params = [p for m in mods for p in m.parameters()]

    def replay() -> None:
        for p in params:
            p.grad = None  # as zero_grad(set_to_none=True) does in the model's step
        for (m, args, kwargs), g in zip(calls, grads, strict=True):
            with context:
                out = _first(m(*args, **kwargs))
            if g is not None:
                out.backward(g)

    return replay


def prepare(case: ModelCase, device: str, budget: Budget, backend: str) -> Callable:
    """Each impl's build times its attention modules' replay (the ``attention_ms`` metadata)
    before the runner times its step."""
    builders, dtype = model_builders(case.family, case.variant), DTYPES[case.dtype]
    shape = (case.batch, 3, case.resolution, case.resolution)
    count = rotation_count(torch.Size(shape).numel() * dtype.itemsize,
                           last_level_cache_bytes(device), budget_bytes=256 << 20, max_sets=8)

    def build(impl: str, _path: None):
        torch.manual_seed(0)
        model = builders[impl](backend).to(device=device, dtype=dtype)
        model.train(case.mode != "inference")
        sets = [(torch.randn(shape, device=device, dtype=dtype),
                 torch.randint(0, 1000, (case.batch,), device=device)) for _ in range(count)]
        attention, n_modules = None, len(attention_modules(model))
        # A compiled model is one graph with no attention module left to replay: null columns.
        if not impl.endswith("+compile") and n_modules:
            replay = attention_replay(model, sets[0][0], case.mode)
            attention = measure(replay, device, budget).median * 1e3
        step = rotating(model_step(model, case.mode), sets)
        return step, {"attention_modules": n_modules, "attention_ms": attention}

    return build


def finish(case: ModelCase, rows: list[dict], timed: dict) -> None:
    for r, ms in zip(rows, timed.values(), strict=True):
        got = [m.metadata["attention_ms"] for m in ms if m.metadata["attention_ms"] is not None]
        r["attention_ms"] = statistics.median(got) if got else None
        r["images_per_s"] = case.batch / (r["median_ms"] * 1e-3)
        r["attention_share"] = r["attention_ms"] / r["median_ms"] if got else None


KIND = Kind(
    lambda c: {"model": f"{c.family}-{c.variant}", "resolution": c.resolution, "batch": c.batch,
               "dtype": c.dtype, "mode": c.mode},
    prepare, {},
    # An impl the model does not have (SwiftFormer's fused-kernel) is left out.
    jobs=lambda c, impls: [(i, None) for i in impls if i in model_builders(c.family, c.variant)],
    finish=finish)
