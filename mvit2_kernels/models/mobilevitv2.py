"""MobileViTv2 (Mehta & Rastegari, 2022) with the fused separable attention.

The structure and numerics follow ml-cvnets, transformers and timm (docs/design.md §3); where they
differ the behaviour is an argument:

* ``odd_size="resize"`` (ml-cvnets, timm): a MobileViT block whose input has an odd height or
  width first resizes it up to the next multiple of the patch size (bilinear,
  ``align_corners=True``) and keeps that size. ``"floor"`` (transformers): unfolding drops the
  last row/column, folding zero-fills it, the size is unchanged.
* ``dilate_block_conv=True`` (ml-cvnets, timm): with ``output_stride`` < 32 the block's
  depthwise 3×3 conv is dilated like the stage; ``False`` (transformers) leaves it undilated.

The module order of every block is its forward order, which is also the order of the public
implementations' state dicts (the checkpoint converters rely on it only for their tests).
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import SeparableAttention

__all__ = ["MobileViTv2", "MobileViTv2Block", "mobilevitv2", "mobilevitv2_channels"]

OddSize = Literal["resize", "floor"]
WIDTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round to a multiple of ``divisor`` without dropping more than 10% (MobileNetV2 rule)."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return int(new_value)


def mobilevitv2_channels(width: float) -> dict[str, tuple[int, ...]]:
    """Channel counts at a width multiplier: the table of docs/design.md §3.

    Returns ``{"stem": (c,), "stages": (c1, ..., c5), "attn": (d3, d4, d5), "ffn": (f3, f4, f5)}``.
    """
    stem = make_divisible(min(max(32 * width, 16), 64), 8, min_value=16)
    stages = (make_divisible(64 * width, 16),
              *(make_divisible(c * width, 8) for c in (128, 256, 384, 512)))
    attn = tuple(make_divisible(c * width, 8) for c in (128, 192, 256))
    ffn = tuple(int(2 * d // 16 * 16) for d in attn)  # FFN dims are multiples of 16
    return {"stem": (stem,), "stages": stages, "attn": attn, "ffn": ffn}


class ConvNormAct(nn.Module):
    """Conv2d (no bias) → BatchNorm2d → activation (``"silu"``, ``"relu"`` or ``None``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, *, stride: int = 1,
                 groups: int = 1, dilation: int = 1, act: str | None = "silu") -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.1)
        self.act = {"silu": nn.SiLU(), "relu": nn.ReLU(), None: nn.Identity()}[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (×2) → depthwise 3×3 → 1×1 reduce; skip when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, dilation: int = 1,
                 expand_ratio: float = 2.0) -> None:
        super().__init__()
        hidden = make_divisible(round(in_ch * expand_ratio), 8)
        self.expand = ConvNormAct(in_ch, hidden, 1)
        self.dw = ConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, dilation=dilation)
        self.reduce = ConvNormAct(hidden, out_ch, 1, act=None)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        y = self.reduce(self.dw(self.expand(x)))
        return x + y if self.use_residual else y


class ConvMlp(nn.Module):
    """The transformer's feed-forward network on ``[B, C, P, N]``: 1×1 conv → SiLU → 1×1 conv."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class TransformerLayer(nn.Module):
    """Pre-norm layer: ``x + attn(GN(x))`` then ``x + mlp(GN(x))``; GN = GroupNorm(1, C)."""

    def __init__(self, dim: int, ffn_dim: int, *, attn_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, dropout: float = 0.0, fused: bool | str = True,
                 backend: str = "auto") -> None:
        super().__init__()
        # GroupNorm(1, C) normalizes over (C, P, N) per sample: the "LayerNorm2D" of ml-cvnets.
        self.norm1 = nn.GroupNorm(1, dim, eps=1e-5)
        self.attn = SeparableAttention(dim, attn_dropout=attn_dropout, fused=fused,
                                       backend=backend)
        self.norm2 = nn.GroupNorm(1, dim, eps=1e-5)
        self.mlp = ConvMlp(dim, ffn_dim, ffn_dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.mlp(self.norm2(x)))


class MobileViTv2Block(nn.Module):
    """Local depthwise conv, unfold to ``[B, d, P, N]``, L transformer layers, fold, 1×1 conv."""

    def __init__(self, channels: int, attn_dim: int, ffn_dim: int, depth: int, *,
                 dilation: int = 1, patch_size: int = 2, odd_size: OddSize = "resize",
                 attn_dropout: float = 0.0, ffn_dropout: float = 0.0, dropout: float = 0.0,
                 fused: bool | str = True, backend: str = "auto") -> None:
        super().__init__()
        if odd_size not in ("resize", "floor"):
            raise ValueError(f"odd_size must be 'resize' or 'floor', got {odd_size!r}")
        self.patch_size = patch_size
        self.odd_size = odd_size
        self.conv_kxk = ConvNormAct(channels, channels, 3, groups=channels, dilation=dilation)
        self.conv_1x1 = nn.Conv2d(channels, attn_dim, 1, bias=False)
        self.transformer = nn.Sequential(*(
            TransformerLayer(attn_dim, ffn_dim, attn_dropout=attn_dropout,
                             ffn_dropout=ffn_dropout, dropout=dropout, fused=fused,
                             backend=backend)
            for _ in range(depth)))
        self.norm = nn.GroupNorm(1, attn_dim, eps=1e-5)
        self.conv_proj = ConvNormAct(attn_dim, channels, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        if self.odd_size == "resize" and (h % p or w % p):
            size = (math.ceil(h / p) * p, math.ceil(w / p) * p)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        x = self.conv_1x1(self.conv_kxk(x))
        out_hw = x.shape[-2:]
        patches = self.norm(self.transformer(self.unfold(x)))
        return self.conv_proj(self.fold(patches, out_hw))

    def unfold(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, P, N]``, the order of ``F.unfold`` (P = p·p, N = nh·nw).

        Rows/columns past the last whole patch are dropped (they exist only with ``"floor"``).
        """
        b, c, h, w = x.shape
        p = self.patch_size
        nh, nw = h // p, w // p
        x = x[:, :, : nh * p, : nw * p]
        x = x.reshape(b, c, nh, p, nw, p).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c, p * p, nh * nw)

    def fold(self, patches: Tensor, out_hw: tuple[int, int]) -> Tensor:
        """Inverse of :meth:`unfold`; zero-fills up to ``out_hw`` like ``F.fold``."""
        b, c, _, _ = patches.shape
        p = self.patch_size
        nh, nw = out_hw[0] // p, out_hw[1] // p
        x = patches.reshape(b, c, p, p, nh, nw).permute(0, 1, 4, 2, 5, 3)
        x = x.reshape(b, c, nh * p, nw * p)
        if (nh * p, nw * p) != tuple(out_hw):
            x = F.pad(x, (0, out_hw[1] - nw * p, 0, out_hw[0] - nh * p))
        return x


class MobileViTv2(nn.Module):
    """MobileViTv2 image classifier (or backbone with ``num_classes=0``).

    Args:
        width: width multiplier α (0.5 … 2.0 in the releases; docs/design.md §3).
        num_classes: classifier outputs; 0 drops the classifier and returns pooled features.
        fused, backend: passed to every :class:`~mvit2_kernels.nn.SeparableAttention`.
        output_stride: 32, 16 or 8; below 32 the last stages are dilated instead of strided.
        odd_size: ``"resize"`` (ml-cvnets, timm) or ``"floor"`` (transformers); see module doc.
        dilate_block_conv: dilate the blocks' depthwise conv with the stage (ml-cvnets, timm).
        attn_dropout, ffn_dropout, dropout: as in ml-cvnets (all 0 in the released configs).

    Shape:
        ``Tensor[B, 3, H, W]`` -> ``Tensor[B, num_classes]``.
    """

    def __init__(self, width: float = 1.0, num_classes: int = 1000, *, fused: bool | str = True,
                 backend: str = "auto", output_stride: int = 32, odd_size: OddSize = "resize",
                 dilate_block_conv: bool = True, patch_size: int = 2, attn_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        ch = mobilevitv2_channels(width)
        self.width, self.output_stride = width, output_stride
        self.num_features = ch["stages"][-1]
        self.stem = ConvNormAct(3, ch["stem"][0], 3, stride=2)
        c1, c2 = ch["stages"][:2]
        stages = [nn.Sequential(InvertedResidual(ch["stem"][0], c1)),
                  nn.Sequential(InvertedResidual(c1, c2, stride=2), InvertedResidual(c2, c2))]
        in_ch, dilation = c2, 1
        dilate_from = {32: 5, 16: 4, 8: 3}[output_stride]  # first stage index that is dilated
        for i, (out_ch, d, f, depth) in enumerate(
                zip(ch["stages"][2:], ch["attn"], ch["ffn"], (2, 4, 3), strict=True)):
            prev_dilation = dilation
            if i + 2 >= dilate_from:
                dilation *= 2  # the stage keeps its resolution and dilates instead
                down = InvertedResidual(in_ch, out_ch, dilation=prev_dilation)
            else:
                down = InvertedResidual(in_ch, out_ch, stride=2)
            block = MobileViTv2Block(
                out_ch, d, f, depth, dilation=dilation if dilate_block_conv else 1,
                patch_size=patch_size, odd_size=odd_size, attn_dropout=attn_dropout,
                ffn_dropout=ffn_dropout, dropout=dropout, fused=fused, backend=backend)
            stages.append(nn.Sequential(down, block))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_ch, num_classes) if num_classes > 0 else None
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """``Tensor[B, 3, H, W]`` -> last feature map ``Tensor[B, C5, H/s, W/s]``."""
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.forward_features(x).mean(dim=(-2, -1))
        return pooled if self.classifier is None else self.classifier(pooled)


def init_weights(model: nn.Module) -> None:
    """ml-cvnets' initialisation: Kaiming-normal (fan-out) convs, N(0, 0.02) linears, unit norms."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def mobilevitv2(width: float = 1.0, num_classes: int = 1000, *, fused: bool | str = True,
                backend: str = "auto", **kwargs) -> MobileViTv2:
    """MobileViTv2-``width`` classifier; ``kwargs`` go to :class:`MobileViTv2`.

    ``width`` is one of 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0 (the released configurations).
    """
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}, got {width}")
    return MobileViTv2(width, num_classes, fused=fused, backend=backend, **kwargs)
