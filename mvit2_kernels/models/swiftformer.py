"""SwiftFormer (Shaker et al., ICCV 2023) with the fused efficient additive attention.

Structure and numerics follow the original code (github.com/Amshaker/SwiftFormer), timm and
transformers (docs/design.md §3): a two-conv stem to 1/4 resolution, four stages of ConvEncoders
whose last block is a SwiftFormer encoder (local representation, additive attention, MLP; each
residual scaled per channel), 3×3 stride-2 conv-BN downsampling between stages, and BatchNorm,
global average pooling and the classification and distillation heads, whose logits are averaged.

The attention variant is explicit: ``"normalize"`` (the current original code and timm) or
``"softmax"`` (the original release and transformers). Our key names follow timm's module tree
(``stem``, ``stages.{i}.downsample``, ``stages.{i}.blocks.{j}``, ``head``, ``head_dist``) with
the original's parameter names inside the blocks (``dwconv``, ``pwconv1``, ``layer_scale``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..nn import EfficientAdditiveAttention

__all__ = [
    "CONFIGS",
    "SwiftFormer",
    "SwiftFormerBlock",
    "swiftformer_l1",
    "swiftformer_l3",
    "swiftformer_s",
    "swiftformer_xs",
]

# name -> (depths, dims): the published configurations (docs/design.md §3).
CONFIGS = {
    "xs": ((3, 3, 6, 4), (48, 56, 112, 220)),
    "s": ((3, 3, 9, 6), (48, 64, 168, 224)),
    "l1": ((4, 3, 10, 5), (48, 96, 192, 384)),
    "l3": ((4, 4, 12, 6), (64, 128, 320, 512)),
}


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` in training
    and scale the kept ones by ``1 / (1 - p)``; identity in eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1.0 - self.p) / (1.0 - self.p)


def _layer_scale(dim: int, value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((dim, 1, 1), float(value)))


# The layer scales are parameters of the blocks themselves, which no torch module resets: the
# blocks' ``reset_parameters`` refill them, so a model built on the meta device, materialised
# with ``to_empty`` and reset module by module (FSDP's meta-device initialisation) holds no
# uninitialised memory.


class ConvEncoder(nn.Module):
    """3×3 depthwise conv → BN → 1×1 conv → GELU → 1×1 conv, scaled per channel, plus the
    input. With ``hidden = dim`` it is also the encoder's local representation."""

    def __init__(
        self, dim: int, hidden: int, *, drop_path: float = 0.0, bn_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim, eps=bn_eps)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(hidden, dim, 1)
        self.layer_scale = _layer_scale(dim, 1.0)
        self.drop_path = DropPath(drop_path)

    def reset_parameters(self) -> None:
        """``layer_scale`` to 1 (its submodules reset themselves)."""
        nn.init.ones_(self.layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.drop_path(self.layer_scale * y)


class Mlp(nn.Module):
    """BN → 1×1 conv → GELU → dropout → 1×1 conv → dropout."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim, eps=bn_eps)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm1(x))))))


class SwiftFormerBlock(nn.Module):
    """The SwiftFormer encoder: local representation, then ``x + s1 * attn(x)`` over the H·W
    tokens and ``x + s2 * mlp(x)``, with per-channel scales ``layer_scale_1/2``."""

    def __init__(
        self,
        dim: int,
        *,
        variant: str,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-5,
        bn_eps: float = 1e-5,
        fused: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.local_representation = ConvEncoder(dim, dim, bn_eps=bn_eps)
        self.attn = EfficientAdditiveAttention(dim, variant=variant, fused=fused, backend=backend)
        self.linear = Mlp(dim, int(dim * mlp_ratio), drop=drop, bn_eps=bn_eps)
        self.layer_scale_init = layer_scale_init
        self.layer_scale_1 = _layer_scale(dim, layer_scale_init)
        self.layer_scale_2 = _layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def reset_parameters(self) -> None:
        """``layer_scale_1/2`` to ``layer_scale_init`` (its submodules reset themselves)."""
        nn.init.constant_(self.layer_scale_1, self.layer_scale_init)
        nn.init.constant_(self.layer_scale_2, self.layer_scale_init)

    def forward(self, x: Tensor) -> Tensor:
        x = self.local_representation(x)
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, H·W, C], a view: to_query reads it in place
        attn = self.attn(tokens).transpose(1, 2).reshape(B, C, H, W)
        x = x + self.drop_path(self.layer_scale_1 * attn)
        return x + self.drop_path(self.layer_scale_2 * self.linear(x))


class Downsample(nn.Module):
    """3×3 stride-2 conv → BN between stages (the original's and timm's ``Embedding``)."""

    def __init__(self, in_dim: int, out_dim: int, *, bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim, eps=bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))


class SwiftFormerStage(nn.Module):
    """Optional downsampling, then ``depth - 1`` ConvEncoders and one SwiftFormer encoder."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        drop_paths: Sequence[float],
        *,
        downsample: bool,
        mlp_ratio: float,
        bn_eps: float,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim, dim, bn_eps=bn_eps) if downsample else nn.Identity()
        hidden = int(dim * mlp_ratio)
        self.blocks = nn.Sequential(
            *(
                ConvEncoder(dim, hidden, drop_path=drop_paths[j], bn_eps=bn_eps)
                for j in range(depth - 1)
            ),
            SwiftFormerBlock(
                dim, mlp_ratio=mlp_ratio, drop_path=drop_paths[-1], bn_eps=bn_eps, **block_kwargs
            ),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class SwiftFormer(nn.Module):
    """SwiftFormer classifier with classification and distillation heads.

    Args:
        depths, dims: blocks and channels of the four stages (see ``CONFIGS``).
        num_classes: classes of both heads; 0 leaves the pooled features (``Tensor[B, dims[-1]]``).
        variant: ``"normalize"`` or ``"softmax"``, the additive attention's token weights.
        mlp_ratio: hidden channels of the ConvEncoders and MLPs, times ``dim``.
        drop_rate: dropout in the MLPs (0 in the releases); drop_path_rate: stochastic depth,
            growing linearly over the blocks as published.
        layer_scale_init: initial value of the encoders' ``layer_scale_1/2`` (1e-5 as published).
        fused, backend: of the attention modules.

    ``forward(x: Tensor[B, 3, H, W])`` returns ``(head(f) + head_dist(f)) / 2`` with ``f`` the
    pooled features, or both logits as a tuple when ``distilled_training`` is set in training
    mode (timm's convention for training with a distillation target).
    """

    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int],
        num_classes: int = 1000,
        *,
        variant: str,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-5,
        bn_eps: float = 1e-5,
        fused: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(depths) != len(dims) or min(depths, default=0) < 1:
            raise ValueError(
                f"depths and dims must be equally long, depths >= 1; got "
                f"{list(depths)}, {list(dims)}"
            )
        self.variant = variant
        self.distilled_training = False
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0] // 2, eps=bn_eps),
            nn.ReLU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0], eps=bn_eps),
            nn.ReLU(),
        )
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            stages.append(
                SwiftFormerStage(
                    dims[max(i - 1, 0)],
                    dim,
                    depth,
                    rates[start : start + depth],
                    downsample=i > 0,
                    mlp_ratio=mlp_ratio,
                    bn_eps=bn_eps,
                    variant=variant,
                    drop=drop_rate,
                    layer_scale_init=layer_scale_init,
                    fused=fused,
                    backend=backend,
                )
            )
            start += depth
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(dims[-1], eps=bn_eps)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # As the public implementations: truncated normal (std 0.02) convs and Linears, zero
        # biases; w_g keeps its standard normal init.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``Tensor[B, 3, H, W]`` -> normalised last-stage features ``Tensor[B, C, H/32, W/32]``."""
        return self.norm(self.stages(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        f = self.forward_features(x).mean(dim=(2, 3))
        cls, dist = self.head(f), self.head_dist(f)
        if self.distilled_training and self.training:
            return cls, dist
        return (cls + dist) / 2


def _factory(name: str):
    depths, dims = CONFIGS[name]

    def build(num_classes: int = 1000, *, variant: str, **kwargs) -> SwiftFormer:
        return SwiftFormer(depths, dims, num_classes, variant=variant, **kwargs)

    build.__name__ = f"swiftformer_{name}"
    build.__doc__ = (
        f"SwiftFormer-{name.upper()}: depths {depths}, dims {dims}. ``variant`` "
        f"(``'normalize'`` or ``'softmax'``) is required; see :class:`SwiftFormer`."
    )
    return build


swiftformer_xs = _factory("xs")
swiftformer_s = _factory("s")
swiftformer_l1 = _factory("l1")
swiftformer_l3 = _factory("l3")
