"""MobileViTv2 with a DeepLabV3 head (ASPP) for semantic segmentation.

The head is the one of ml-cvnets and transformers: four ASPP branches (1×1 and three dilated 3×3
conv-BN-ReLU) plus image pooling, concatenated, projected by a 1×1 conv-BN-ReLU, then a 1×1
classifier. transformers returns these low-resolution logits; ml-cvnets upsamples them by the
output stride inside the head (``upsample_logits=True``).

The backbone keeps its strides down to ``output_stride`` and dilates the stages past it: 8
dilates L4 and L5, 16 dilates L5, 32 (transformers' default, also for segmentation) dilates
nothing, so the head sees the classifier's 1/32 features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mobilevitv2 import WIDTHS, ConvNormAct, MobileViTv2, OddSize, init_weights

__all__ = ["ASPP", "MobileViTv2DeepLabV3", "mobilevitv2_deeplabv3"]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``[B, C_in, h, w]`` -> ``[B, C_out, h, w]``."""

    def __init__(self, in_ch: int, out_ch: int, atrous_rates: Sequence[int],
                 dropout: float = 0.1) -> None:
        super().__init__()
        if len(atrous_rates) != 3:
            raise ValueError(f"atrous_rates must have 3 values, got {tuple(atrous_rates)}")
        self.convs = nn.ModuleList(
            [ConvNormAct(in_ch, out_ch, 1, act="relu")]
            + [ConvNormAct(in_ch, out_ch, 3, dilation=r, act="relu") for r in atrous_rates])
        self.pool = ConvNormAct(in_ch, out_ch, 1, act="relu")  # applied to the global average
        self.project = ConvNormAct(5 * out_ch, out_ch, 1, act="relu")
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = torch.cat([conv(x) for conv in self.convs] + [pooled], dim=1)
        return self.drop(self.project(y))


class MobileViTv2DeepLabV3(nn.Module):
    """MobileViTv2 backbone (dilated to ``output_stride``) + DeepLabV3 head.

    Args:
        width: width multiplier of the backbone.
        num_classes: segmentation classes (21 for Pascal VOC, 151 for ADE20k releases).
        output_stride: 8, 16 or 32 (undilated: the classification backbone).
        aspp_channels, atrous_rates, aspp_dropout, classifier_dropout: head settings (the
            released checkpoints use 512, (6, 12, 18), 0.1, 0.1).
        upsample_logits: upsample the logits by ``output_stride`` (bilinear,
            ``align_corners=True``) like ml-cvnets; ``False`` returns them at 1/output_stride
            like transformers.
        fused, backend, odd_size, dilate_block_conv, **backbone_kwargs: see
            :class:`~mvit2_kernels.models.MobileViTv2`.

    Shape:
        ``Tensor[B, 3, H, W]`` -> ``Tensor[B, num_classes, H/s, W/s]`` (or ``H, W`` upsampled).
    """

    def __init__(self, width: float = 1.0, num_classes: int = 21, output_stride: int = 16, *,
                 fused: bool | str = True, backend: str = "auto", odd_size: OddSize = "resize",
                 dilate_block_conv: bool = True, aspp_channels: int = 512,
                 atrous_rates: Sequence[int] = (6, 12, 18), aspp_dropout: float = 0.1,
                 classifier_dropout: float = 0.1, upsample_logits: bool = False,
                 **backbone_kwargs) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.output_stride = output_stride
        self.upsample_logits = upsample_logits
        self.backbone = MobileViTv2(
            width, 0, fused=fused, backend=backend, output_stride=output_stride,
            odd_size=odd_size, dilate_block_conv=dilate_block_conv, **backbone_kwargs)
        self.aspp = ASPP(self.backbone.num_features, aspp_channels, atrous_rates, aspp_dropout)
        self.drop = nn.Dropout2d(classifier_dropout)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        init_weights(self.aspp)
        init_weights(self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.classifier(self.drop(self.aspp(self.backbone.forward_features(x))))
        if self.upsample_logits:
            logits = F.interpolate(logits, scale_factor=self.output_stride, mode="bilinear",
                                   align_corners=True)
        return logits


def mobilevitv2_deeplabv3(width: float = 1.0, num_classes: int = 21, output_stride: int = 16, *,
                          fused: bool | str = True, backend: str = "auto",
                          **kwargs) -> MobileViTv2DeepLabV3:
    """MobileViTv2-``width`` DeepLabV3; ``kwargs`` go to :class:`MobileViTv2DeepLabV3`."""
    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}, got {width}")
    return MobileViTv2DeepLabV3(width, num_classes, output_stride, fused=fused, backend=backend,
                                **kwargs)
