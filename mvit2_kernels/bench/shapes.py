"""The attention shapes worth timing (DESIGN §3), named so that ``--shape`` globs can pick them.

A name reads ``w<width>-<resolution>px-<stage>-B<batch>``: ``w1.0-256px-L3-B32`` is the first
attention stage (L3) of MobileViTv2-1.0 on 256×256 images at batch 32, i.e. ``C=128, P=4, N=256``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

__all__ = ["Shape", "design_shapes", "quick_shapes", "select_shapes", "train_batch"]

WIDTHS = (0.5, 1.0, 2.0)
# Attention dim of stages L3, L4, L5 at width 1.0; it scales with the width multiplier.
STAGE_CHANNELS = {"L3": 128, "L4": 192, "L5": 256}
# Output strides 8, 16, 32 with 2x2 patches: N = (res/stride/2)^2 patches per pixel position.
STAGE_STRIDE = {"L3": 8, "L4": 16, "L5": 32}
RESOLUTIONS = (256, 512)  # classification; DeepLabV3 segmentation at 512²
PIXELS = 4  # P: 2x2 patches


@dataclass(frozen=True)
class Shape:
    """One attention call: q ``[batch, 1, pixels, patches]``, k/v ``[batch, channels, pixels,
    patches]``."""

    name: str
    batch: int
    channels: int
    pixels: int
    patches: int

    @property
    def elements(self) -> int:
        """Elements of one ``[B, 1, P, N]`` plane: ``B·P·N``."""
        return self.batch * self.pixels * self.patches


def train_batch(device_type: str) -> int:
    """The training batch timed beside B=1: 32 on a CPU, 256 on a GPU."""
    return 256 if device_type == "cuda" else 32


def design_shapes(batch: int) -> list[Shape]:
    """Every width × resolution × stage of DESIGN §3 at ``B=1`` and ``B=batch``."""
    shapes = []
    for width in WIDTHS:
        for res in RESOLUTIONS:
            for stage, base in STAGE_CHANNELS.items():
                side = res // STAGE_STRIDE[stage] // 2
                for b in dict.fromkeys((1, batch)):
                    name = f"w{width}-{res}px-{stage}-B{b}"
                    shapes.append(Shape(name, b, int(base * width), PIXELS, side * side))
    return shapes


def quick_shapes(batch: int) -> list[Shape]:
    """The ``--quick`` subset: MobileViTv2-1.0's first attention stage (C=128, N=256) at B=1 and
    the training batch: the shape the foundation issue's targets are stated for."""
    return [s for s in design_shapes(batch) if s.name.startswith("w1.0-256px-L3-")]


_CUSTOM = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+)$")  # BxCxPxN: commas separate list items


def select_shapes(patterns: list[str], batch: int) -> list[Shape]:
    """The design shapes whose names match any glob in ``patterns``, plus custom ``BxCxPxN``
    shapes; raises ``ValueError`` naming a pattern that matches nothing."""
    known = design_shapes(batch)
    chosen: dict[str, Shape] = {}
    for pattern in patterns:
        custom = _CUSTOM.match(pattern)
        if custom:
            b, c, p, n = (int(x) for x in custom.groups())
            if min(b, c, p, n) < 1:
                raise ValueError(f"--shape {pattern!r}: B, C, P and N must be >= 1")
            chosen[pattern] = Shape(f"B{b}-C{c}-P{p}-N{n}", b, c, p, n)
            continue
        hits = [s for s in known if fnmatch.fnmatchcase(s.name, pattern)]
        if not hits:
            names = ", ".join(s.name for s in known)
            raise ValueError(
                f"--shape {pattern!r} matches no shape; give a glob over these "
                f"names or a custom 'BxCxPxN': {names}"
            )
        chosen.update((s.name, s) for s in hits)
    return list(chosen.values())
