"""``fuse_(model)``: the one-line upgrade of a model the user keeps in its own code.

Every attention module whose class name has a swapper in ``SWAPPERS`` is replaced, in place, by
our fused module holding the *same* projection modules (so the same parameters, devices, dtypes
and state-dict keys): optimizers, checkpoints and ``load_state_dict`` keep working.

The replacement is also an instance of the class it replaces (see :func:`hosted_class`): host
libraries dispatch on ``isinstance``, transformers' ``_init_weights`` among them, which is what
initialises SwiftFormer's ``w_g`` when ``from_pretrained`` does not find it in a checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from ..nn import EfficientAdditiveAttention, SeparableAttention

__all__ = ["SWAPPERS", "fuse_", "hosted_class", "register_swapper"]

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
    if type(module).__name__ == "MobileViTV2LinearSelfAttention":
        new.unwrap_projection = transformers_conv
    return new.train(module.training)


def transformers_conv(proj: nn.Module) -> nn.Module | None:
    """The convolution inside transformers' ``MobileViTV2ConvLayer`` when that is all it runs
    (no normalisation, no activation: the attention's projections), so that the fused layer
    computes it; None (run the module as it is) otherwise."""
    if type(proj).__name__ != "MobileViTV2ConvLayer":
        return proj
    if getattr(proj, "normalization", None) is not None or getattr(proj, "activation", None):
        return None
    return getattr(proj, "convolution", None)


SWAPPERS: dict[str, Swapper] = {
    "MobileViTV2LinearSelfAttention": swap_linear_self_attention,  # transformers
    "LinearSelfAttention": swap_linear_self_attention,  # timm, ml-cvnets
}


@functools.cache
def hosted_class(ours: type[nn.Module], host: type[nn.Module]) -> type[nn.Module]:
    """``Fused<host>``: a subclass of ``ours`` first (its methods, ``forward`` included, win)
    and of ``host``, whose ``__init__`` never runs; one class per pair.

    A swapped module takes this class so that the host library's ``isinstance`` checks still
    see the module they built. transformers initialises parameters a module owns directly by
    its class (``SwiftFormerEfficientAdditiveAttention`` -> ``normal_(w_g)``); without it,
    ``from_pretrained`` of a model fused in ``__init__`` leaves a ``w_g`` that the checkpoint
    lacks as the uninitialised memory it allocated for it.
    """
    return type(f"Fused{host.__name__}", (ours, host), {
        "__module__": __name__,  # where pickle would look; _reduce_hosted spares it
        "__doc__": f"{ours.__name__} in place of {host.__module__}.{host.__qualname__}.",
        "__reduce_ex__": _reduce_hosted,
        # Our attributes, not the host's (ml-cvnets' __repr__ reads self.attn_dropout.p).
        "__repr__": nn.Module.__repr__,
        "_hosted": (ours, host),
    })


def _reduce_hosted(module: nn.Module, protocol: int):
    # The class is made at run time, so pickle cannot find it by name: rebuild it from the two
    # classes it joins (deepcopy goes through here as well).
    return _rebuild_hosted, type(module)._hosted, module.__getstate__()


def _rebuild_hosted(ours: type[nn.Module], host: type[nn.Module]) -> nn.Module:
    return object.__new__(hosted_class(ours, host))


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

    Each new module is an instance of both our class and the class it replaced (a
    :func:`hosted_class`), so the host library's initialisation (transformers' ``init_weights``
    and ``from_pretrained``) still reaches parameters the module holds itself, such as
    SwiftFormer's ``w_g``.

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
        if isinstance(swapped, ours) and swapped is not module:
            swapped.__class__ = hosted_class(type(swapped), type(module))
        setattr(model.get_submodule(parent_name), child, swapped)
    return len(targets)
