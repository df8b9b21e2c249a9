"""``fuse_(model)``: the one-line upgrade of a model the user keeps in its own code.

Every attention module whose class name has a swapper in ``SWAPPERS`` is replaced, in place, by
our fused module holding the *same* projection modules (so the same parameters, devices, dtypes
and state-dict keys): optimizers, checkpoints and ``load_state_dict`` keep working.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..nn import EfficientAdditiveAttention, SeparableAttention

__all__ = ["SWAPPERS", "fuse_", "register_swapper"]

Swapper = Callable[[nn.Module, bool, str], nn.Module]  # (module, fused, backend) -> replacement


def _dropout_p(module: nn.Module, *names: str) -> float:
    for name in names:
        drop = getattr(module, name, None)
        if isinstance(drop, nn.Dropout):
            return drop.p
    return 0.0


def swap_linear_self_attention(module: nn.Module, fused: bool | str, backend: str) -> nn.Module:
    """MobileViTv2 attention of transformers (``MobileViTV2LinearSelfAttention``), timm and
    ml-cvnets (``LinearSelfAttention``): all hold ``qkv_proj`` and ``out_proj`` modules that
    compute the 1×1 projections, which our module reuses as they are."""
    embed_dim = module.embed_dim
    new = SeparableAttention(
        embed_dim, attn_dropout=_dropout_p(module, "attn_dropout", "attn_drop"),
        proj_dropout=_dropout_p(module, "out_drop"), fused=fused, backend=backend)
    new.qkv_proj, new.out_proj = module.qkv_proj, module.out_proj
    return new.train(module.training)


SWAPPERS: dict[str, Swapper] = {
    "MobileViTV2LinearSelfAttention": swap_linear_self_attention,  # transformers
    "LinearSelfAttention": swap_linear_self_attention,  # timm, ml-cvnets
}


def register_swapper(class_name: str, swapper: Swapper) -> None:
    """Make :func:`fuse_` replace modules of class ``class_name`` by ``swapper(module, fused,
    backend)``."""
    SWAPPERS[class_name] = swapper


def fuse_(model: nn.Module, *, fused: bool | str = True, backend: str = "auto") -> int:
    """Replace, in place, every known attention module of ``model`` by our fused module.

    Works on transformers and timm MobileViTv2 models (and ml-cvnets'); other families add
    their classes with :func:`register_swapper`. Modules already ours are left alone.

    Args:
        fused: passed to each new module: for MobileViTv2, ``True`` fuses the whole layer,
            ``"kernel"`` keeps the projections around the fused op (see
            :class:`~mvit2_kernels.nn.SeparableAttention`).

    Returns:
        The number of modules swapped.
    """
    ours = (SeparableAttention, EfficientAdditiveAttention)  # timm shares a class name with ours
    targets = [(name, m) for name, m in model.named_modules()
               if type(m).__name__ in SWAPPERS and not isinstance(m, ours)]
    if targets and targets[0][0] == "":
        raise ValueError("fuse_ replaces submodules; got an attention module itself: "
                         "wrap it or construct mvit2_kernels.SeparableAttention directly")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        swapped = SWAPPERS[type(module).__name__](module, fused, backend)
        setattr(model.get_submodule(parent_name), child, swapped)
    return len(targets)
