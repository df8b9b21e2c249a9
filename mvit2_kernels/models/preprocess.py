"""Preprocessing of the released MobileViTv2 checkpoints (transformers' MobileViTImageProcessor).

Resize the shortest edge to 288 (aspect kept, PIL resampling on uint8), centre-crop 256×256,
scale by 1/255, flip RGB to BGR (ml-cvnets trained on OpenCV's BGR images); no mean/std
normalization. Resizing goes through PIL so the pixels equal transformers' exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["preprocess"]

_RESAMPLE = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def preprocess(images: Image.Image | Tensor | Sequence[Image.Image | Tensor], *,
               shortest_edge: int = 288, crop_size: int | tuple[int, int] = 256,
               resample: str = "bilinear", rescale_factor: float = 1 / 255,
               flip_channel_order: bool = True) -> Tensor:
    """Images to the model input ``Tensor[B, 3, crop_h, crop_w]`` (float32).

    Args:
        images: PIL images, ``uint8`` tensors ``[3, H, W]`` or ``[B, 3, H, W]`` (RGB), or a list.
        shortest_edge: the shorter side after resizing (the longer one is
            ``int(shortest_edge * long / short)``, as transformers computes it); ``0`` skips it.
        crop_size: centre crop (zero-padded where the image is smaller); ``0`` skips it.
        resample: PIL filter; ``"bilinear"`` is the released checkpoints' setting
            (transformers' class default is ``"bicubic"``).
        rescale_factor: multiplies the uint8 values.
        flip_channel_order: RGB -> BGR, as the released checkpoints expect.
    """
    from PIL import Image

    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {_RESAMPLE}, got {resample!r}")
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    out = []
    for image in _as_list(images):
        if shortest_edge:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = shortest_edge, int(shortest_edge * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)  # PIL: (w, h)
            image = image.resize(size, resample=getattr(Image.Resampling, resample.upper()))
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        if crop_size:
            x = _center_crop(x, crop)
        # float64 then float32, as transformers rescales, so values match bit for bit
        x = (x.to(torch.float64) * rescale_factor).to(torch.float32)
        out.append(x.flip(0) if flip_channel_order else x)
    return torch.stack(out)


def _as_list(images) -> list:
    from PIL import Image

    if isinstance(images, (Image.Image, Tensor)):
        images = [images]
    result = []
    for im in images:
        if isinstance(im, Image.Image):
            result.append(im if im.mode == "RGB" else im.convert("RGB"))
        elif isinstance(im, Tensor):
            if im.dtype != torch.uint8:
                raise TypeError(f"image tensors must be uint8, got {im.dtype}")
            batch = im if im.dim() == 4 else im.unsqueeze(0)
            if batch.dim() != 4 or batch.shape[1] != 3:
                raise ValueError(f"image tensors must be [3, H, W] or [B, 3, H, W], "
                                 f"got {tuple(im.shape)}")
            hwc = batch.permute(0, 2, 3, 1).contiguous().cpu().numpy()
            result += [Image.fromarray(a) for a in hwc]
        else:
            raise TypeError(f"expected PIL images or uint8 tensors, got {type(im).__name__}")
    if not result:
        raise ValueError("no images given")
    return result


def _center_crop(x: Tensor, crop: tuple[int, int]) -> Tensor:
    """transformers' ``center_crop``: top-left at ``(H - h) // 2``; pads with zeros, centred
    (ceil), where the image is smaller than the crop."""
    h, w = x.shape[-2:]
    ch, cw = crop
    if ch > h or cw > w:
        new_h, new_w = max(ch, h), max(cw, w)
        top, left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        padded = x.new_zeros((x.shape[0], new_h, new_w))
        padded[:, top:top + h, left:left + w] = x
        x, h, w = padded, new_h, new_w
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top:top + ch, left:left + cw]
