"""Drop-in attention modules built on the fused ops.

``SeparableAttention`` is MobileViTv2's linear self-attention with the parameter layout of
ml-cvnets, transformers and timm (``qkv_proj`` / ``out_proj`` 1×1 convolutions), so their
checkpoints load unchanged; by default the whole layer is fused (the keys are never computed).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from .layer import separable_attention_layer
from .ops import additive_attention, separable_attention_qkv
from .reference import additive_attention_reference, separable_attention_reference

__all__ = ["EfficientAdditiveAttention", "SeparableAttention"]

# Dropout on the softmax weights is not in the kernels (docs/design.md §1); the fallback says so
# once per process, not once per layer, so a 9-layer model does not print nine warnings.
_warned_dropout_fallback = False


class SeparableAttention(nn.Module):
    """MobileViTv2 separable self-attention over unfolded patches.

    ``out_proj(relu(v) * Σ_n softmax_N(q)[n] · k[:, n])`` with ``q, k, v`` the ``1 + C + C``
    channels of ``qkv_proj(x)``.

    Args:
        embed_dim: channels ``C`` of the input ``x: Tensor[B, C, P, N]``.
        attn_dropout: dropout on the softmax weights (where ml-cvnets, transformers and timm apply
            it). With ``p > 0`` in training mode the module runs the reference, warning once.
        proj_dropout: dropout after ``out_proj`` (timm's ``proj_drop``; 0 in every release).
        bias: whether both projections have a bias.
        fused: ``True`` (default) runs the whole layer fused, without ever materialising the
            keys (:func:`~mvit2_kernels.separable_attention_layer`), whenever both projections
            are plain 1×1 convolutions without hooks (else it runs as ``"kernel"``);
            ``"kernel"`` runs the two projections as the modules they are around the fused op
            :func:`~mvit2_kernels.separable_attention_qkv`; ``False`` runs the reference
            :func:`~mvit2_kernels.reference.separable_attention_reference` between them.
            The parameters and the state dict are the same in all three.
        backend: passed to the fused functions (``"auto"``, ``"cpu"``, ...).

    Shape:
        ``x: Tensor[B, C, P, N]`` (P pixels per patch, N patches) -> ``Tensor[B, C, P, N]``.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.0,
        bias: bool = True,
        fused: bool | str = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if fused not in (True, False, "kernel"):
            raise ValueError(f"fused must be True, 'kernel' or False, got {fused!r}")
        if not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1), got {attn_dropout}")
        self.embed_dim = embed_dim
        # Registration order (qkv_proj, out_proj) is the forward order, as in the public code.
        self.qkv_proj = nn.Conv2d(embed_dim, 1 + 2 * embed_dim, kernel_size=1, bias=bias)
        self.out_proj = nn.Conv2d(embed_dim, embed_dim, kernel_size=1, bias=bias)
        self.proj_drop = nn.Dropout(proj_dropout) if proj_dropout > 0 else nn.Identity()
        self.attn_dropout = float(attn_dropout)
        self.fused = fused
        self.backend = backend

    # How to find the 1×1 convolution inside another library's projection module: fuse_ sets it
    # (transformers wraps each in a MobileViTV2ConvLayer); None: the projections are nn.Conv2d.
    unwrap_projection: Callable[[nn.Module], nn.Module | None] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """``x: Tensor[B, C, P, N]`` -> ``Tensor[B, C, P, N]``."""
        dropout = self.training and self.attn_dropout > 0
        if self.fused is True and not dropout:
            convs = (_conv1x1(self.qkv_proj, self.unwrap_projection),
                     _conv1x1(self.out_proj, self.unwrap_projection))
            if None not in convs:
                qkv, out = convs
                return self.proj_drop(separable_attention_layer(
                    x, qkv.weight, qkv.bias, out.weight, out.bias, backend=self.backend))
        qkv = self.qkv_proj(x)
        if self.fused and not dropout:
            # The op reads the q/k/v channels of qkv in place and writes its gradient as one
            # tensor, with no split backward to concatenate (docs/design.md §1, the packed op).
            y = separable_attention_qkv(qkv, backend=self.backend)
            return self.proj_drop(self.out_proj(y))
        q, k, v = qkv.split([1, self.embed_dim, self.embed_dim], dim=1)
        if dropout:
            y = self._attend_with_dropout(q, k, v)
        else:
            y = separable_attention_reference(q, k, v)
        return self.proj_drop(self.out_proj(y))

    def _attend_with_dropout(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        global _warned_dropout_fallback
        if self.fused and not _warned_dropout_fallback:
            _warned_dropout_fallback = True
            warnings.warn(
                f"SeparableAttention: attn_dropout={self.attn_dropout} in training mode is not "
                "fused; running the PyTorch reference with dropout on the softmax weights",
                stacklevel=3,
            )
        s = F.dropout(torch.softmax(q, dim=-1), p=self.attn_dropout, training=True)
        ctx = (k * s).sum(dim=-1, keepdim=True)
        return torch.relu(v) * ctx

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, attn_dropout={self.attn_dropout}, "
                f"fused={self.fused}, backend={self.backend!r}")


def _conv1x1(proj: nn.Module, unwrap: Callable[[nn.Module], nn.Module | None] | None
             ) -> nn.Conv2d | None:
    """The plain 1×1 convolution that ``proj`` computes, or None when it computes something else.

    Ours are ``nn.Conv2d``; another library's wrapped convolution is found by ``unwrap`` (which
    ``fuse_`` sets for the library it swaps in). Anything else (a subclass, a quantised or
    adapted projection) runs as the module it is, around the fused op; so does one with hooks
    (observers, pruning, weight norm): the fused layer would not call them."""
    if _has_hooks(proj):
        return None
    if unwrap is not None:
        proj = unwrap(proj)
    plain = (type(proj) is nn.Conv2d and proj.kernel_size == (1, 1) and proj.stride == (1, 1)
             and proj.padding == (0, 0) and proj.dilation == (1, 1) and proj.groups == 1
             and not _has_hooks(proj))
    return proj if plain else None


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or the global ones)."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks",
                    "_global_backward_hooks", "_global_backward_pre_hooks")
    return (any(getattr(module, name, None) for name in hooks)
            or any(getattr(_module_globals, name, None) for name in global_hooks))


class EfficientAdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention over tokens, with the published parameters.

    ``final(proj(G * kn) + qn)`` where ``qn, kn`` are the L2-normalised ``to_query(x)``,
    ``to_key(x)`` and ``G = sum_n alpha[n] qn[n]`` with ``alpha`` from ``(qn @ w_g) * dim**-0.5``
    (see :func:`mvit2_kernels.additive_attention`). The parameters are those of SwiftFormer's
    code (``to_query``, ``to_key``, ``w_g``, ``proj`` — the original's ``Proj`` loads too —
    and ``final``), so checkpoints of the original code, timm and transformers load unchanged.

    Args:
        dim: token features ``D``.
        variant: ``"normalize"`` (current SwiftFormer code, timm) or ``"softmax"`` (the original
            release, transformers: every token weight is 1). No default: the two differ.
        fused: ``False`` runs :func:`~mvit2_kernels.reference.additive_attention_reference`.
        backend: passed to :func:`mvit2_kernels.additive_attention`.

    Shape:
        ``x: Tensor[B, N, D]`` -> ``Tensor[B, N, D]``.
    """

    def __init__(self, dim: int, *, variant: str, fused: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if variant not in ("normalize", "softmax"):
            raise ValueError(f"variant must be 'normalize' or 'softmax', got {variant!r}")
        self.dim, self.variant, self.fused, self.backend = dim, variant, fused, backend
        # Registration order is the published one, so state dicts list keys in the same order.
        self.to_query = nn.Linear(dim, dim)
        self.to_key = nn.Linear(dim, dim)
        self.w_g = nn.Parameter(torch.empty(dim, 1))
        self.reset_parameters()  # here, so that a seed draws w_g before proj and final as published
        self.scale_factor = dim**-0.5  # as published; the kernels use q.shape[-1] ** -0.5
        self.proj = nn.Linear(dim, dim)
        self.final = nn.Linear(dim, dim)

    def reset_parameters(self) -> None:
        """``w_g`` from a standard normal, as published (the Linear layers reset themselves), so
        a model built on the meta device and reset module by module is initialised."""
        nn.init.normal_(self.w_g)

    def forward(self, x: Tensor) -> Tensor:
        """``x: Tensor[B, N, D]`` -> ``Tensor[B, N, D]``."""
        q, k = self.to_query(x), self.to_key(x)
        if self.fused:  # under autocast the op casts w_g like the Linear outputs
            out, qn = additive_attention(q, k, self.w_g, variant=self.variant,
                                         backend=self.backend)
        else:
            out, qn = additive_attention_reference(q, k, self.w_g, self.variant)
        return self.final(self.proj(out) + qn)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The original SwiftFormer code names the projection ``Proj``.
        for key in [k for k in state_dict if k.startswith(prefix + "Proj.")]:
            state_dict[prefix + "proj." + key[len(prefix) + 5:]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, variant={self.variant!r}, fused={self.fused}, "
                f"backend={self.backend!r}")
