"""The attention shapes worth timing, derived from the models' own configurations
(:data:`~mvit2_kernels.models.mobilevitv2.WIDTHS` and ``mobilevitv2_channels``, SwiftFormer's
``CONFIGS``) and named so that ``--shape`` globs can pick them:

- ``separable`` (MobileViTv2): ``w<width>-<resolution>px-L<stage>-B<batch>``; ``w1.0-256px-L3-B32``
  is the first attention stage of MobileViTv2-1.0 on 256² images at batch 32: ``C=128, P=4,
  N=256``. Custom: ``BxCxPxN``.
- ``additive`` (SwiftFormer): ``sf-<variant>-224px-s<stage>-B<batch>``; ``sf-xs-224px-s1-B32`` is
  the attention of SwiftFormer-XS's first stage at batch 32: ``N=3136`` tokens of ``D=48``.
  Custom: ``BxNxD``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..models.mobilevitv2 import WIDTHS, mobilevitv2_channels
from ..models.swiftformer import CONFIGS as SWIFTFORMER

__all__ = ["OPS", "RESOLUTION", "Shape", "design_shapes", "quick_shapes", "select_shapes"]

OPS = ("separable", "additive")
RESOLUTION = {"mobilevitv2": 256, "swiftformer": 224}  # the models' ImageNet image sizes
# MobileViTv2: the smallest, the default and the largest width, at ImageNet size and at the
# DeepLabV3 segmentation size. Its attention stages L3, L4, L5 run at output strides 8, 16, 32 on
# 2×2 patches: P = 4, N = (res/stride/2)².
TIMED_WIDTHS = (WIDTHS[0], 1.0, WIDTHS[-1])
RESOLUTIONS = (RESOLUTION["mobilevitv2"], 512)
STAGE_STRIDES = {3: 8, 4: 16, 5: 32}
# SwiftFormer: one attention block ends each of its four stages, at strides 4, 8, 16, 32. The
# default times the smallest and the largest variant; S and L1 lie between them (``--shape``).
SWIFTFORMER_TIMED = ("xs", "l3")
SWIFTFORMER_STRIDES = (4, 8, 16, 32)
QUICK = ("w1.0-256px-L3-", "sf-xs-224px-s1-")  # one stage per op: the most patches or tokens
_CUSTOM = re.compile(r"^\d+(x\d+){2,3}$")  # commas separate list items, so sizes use "x"


@dataclass(frozen=True)
class Shape:
    """One attention call. ``separable``: q ``[batch, 1, pixels, patches]``, k and v
    ``[batch, channels, pixels, patches]``. ``additive``: q and k ``[batch, patches, channels]``
    (N tokens of D channels) with ``pixels == 1``, so that both fill the same JSON fields."""

    name: str
    batch: int
    channels: int
    pixels: int
    patches: int
    op: str = "separable"

    @property
    def elements(self) -> int:
        """``B·P·N``: the elements of one channel."""
        return self.batch * self.pixels * self.patches


def train_batch(device: str) -> int:
    """The training batch timed beside B=1: 32 on a CPU, 256 on a GPU."""
    return 256 if device == "cuda" else 32


def design_shapes(batch: int, ops: Sequence[str] = OPS,
                  variants: Sequence[str] = SWIFTFORMER_TIMED) -> list[Shape]:
    """Every timed MobileViTv2 width × resolution × stage, then every stage of the SwiftFormer
    ``variants``, each at ``B=1`` and ``B=batch``; only those of ``ops``."""
    out, batches = [], list(dict.fromkeys((1, batch)))
    for width in TIMED_WIDTHS if "separable" in ops else ():
        for res in RESOLUTIONS:
            dims = zip(STAGE_STRIDES.items(), mobilevitv2_channels(width)["attn"], strict=True)
            for (stage, stride), c in dims:
                out += [Shape(f"w{width}-{res}px-L{stage}-B{b}", b, c, 4, (res // stride // 2) ** 2)
                        for b in batches]
    res = RESOLUTION["swiftformer"]
    for variant in variants if "additive" in ops else ():
        for stage, (d, stride) in enumerate(zip(SWIFTFORMER[variant][1], SWIFTFORMER_STRIDES,
                                                strict=True), 1):
            out += [Shape(f"sf-{variant}-{res}px-s{stage}-B{b}", b, d, 1, (res // stride) ** 2,
                          "additive") for b in batches]
    return out


def quick_shapes(batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """``--quick``: MobileViTv2-1.0's first attention stage and SwiftFormer-XS's first stage."""
    return [s for s in design_shapes(batch, ops) if s.name.startswith(QUICK)]


def select_shapes(patterns: list[str], batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """The named shapes of ``ops`` (every SwiftFormer variant) matching any glob in
    ``patterns``, plus custom shapes, grouped by op; ``ValueError`` naming a bad pattern."""
    known, chosen = design_shapes(batch, ops, tuple(SWIFTFORMER)), {}
    for pattern in patterns:
        if _CUSTOM.match(pattern):
            sizes = [int(x) for x in pattern.split("x")]
            op, layout = ("separable", "BxCxPxN") if len(sizes) == 4 else ("additive", "BxNxD")
            if op not in ops:
                raise ValueError(f"--shape {pattern!r} is a {op} shape ({layout}) but --op leaves "
                                 f"{op} out")
            if min(sizes) < 1:
                raise ValueError(f"--shape {pattern!r}: every size of {layout} must be >= 1")
            if op == "separable":
                b, c, p, n = sizes
                shape = Shape(f"B{b}-C{c}-P{p}-N{n}", b, c, p, n)
            else:
                b, n, d = sizes
                shape = Shape(f"B{b}-N{n}-D{d}", b, d, 1, n, op)
            chosen[shape.name] = shape
            continue
        hits = [s for s in known if fnmatch.fnmatchcase(s.name, pattern)]
        if not hits:
            raise ValueError(
                f"--shape {pattern!r} matches no {' or '.join(ops)} shape; give a glob over these "
                "names, or a custom 'BxCxPxN' (separable) or 'BxNxD' (additive): "
                + ", ".join(s.name for s in known))
        chosen.update((s.name, s) for s in hits)
    return sorted(chosen.values(), key=lambda s: OPS.index(s.op))
