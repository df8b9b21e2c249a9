"""The attention shapes worth timing, derived from the models' own configurations
(:func:`~mvit2_kernels.models.mobilevitv2.mobilevitv2_channels`, SwiftFormer's ``CONFIGS``) and
named so that ``--shape`` globs can pick them:

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

__all__ = ["OPS", "Shape", "design_shapes", "known_shapes", "quick_shapes", "select_shapes"]

OPS = ("separable", "additive")
# MobileViTv2: the smallest, the default and the largest width, at ImageNet size and at the
# DeepLabV3 segmentation size. Its attention stages L3, L4, L5 run at output strides 8, 16, 32
# (the stem and every stage before them halve the image) on 2×2 patches: P = 4, N = (res/s/2)².
TIMED_WIDTHS = (WIDTHS[0], 1.0, WIDTHS[-1])
RESOLUTIONS = (256, 512)
STAGE_STRIDES = {3: 8, 4: 16, 5: 32}
# SwiftFormer: one attention block ends each of its four stages, at strides 4, 8, 16, 32 of a 224²
# image. The default run times the smallest and the largest variant; S and L1 stay selectable
# (their stage 1 is XS's shape, their later stages lie between XS's and L3's).
SWIFTFORMER_TIMED = ("xs", "l3")
SWIFTFORMER_RESOLUTION = 224
SWIFTFORMER_STRIDES = (4, 8, 16, 32)


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


def _all(batch: int, variants: Sequence[str]) -> list[Shape]:
    batches = list(dict.fromkeys((1, batch)))
    shapes = []
    for width in TIMED_WIDTHS:
        dims = mobilevitv2_channels(width)["attn"]
        for res in RESOLUTIONS:
            for (stage, stride), dim in zip(STAGE_STRIDES.items(), dims, strict=True):
                n = (res // stride // 2) ** 2
                shapes += [Shape(f"w{width}-{res}px-L{stage}-B{b}", b, dim, 4, n) for b in batches]
    for variant in variants:
        dims = SWIFTFORMER[variant][1]
        for stage, (dim, stride) in enumerate(zip(dims, SWIFTFORMER_STRIDES, strict=True), 1):
            n, res = (SWIFTFORMER_RESOLUTION // stride) ** 2, SWIFTFORMER_RESOLUTION
            shapes += [
                Shape(f"sf-{variant}-{res}px-s{stage}-B{b}", b, dim, 1, n, op="additive")
                for b in batches
            ]
    return shapes


def _of_ops(shapes: list[Shape], ops: Sequence[str]) -> list[Shape]:
    """``shapes`` of ``ops``, grouped by op in the order of :data:`OPS`."""
    return [s for op in OPS if op in ops for s in shapes if s.op == op]


def design_shapes(batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """The default run: every timed MobileViTv2 width × resolution × stage, every stage of
    SwiftFormer XS and L3; each at ``B=1`` and ``B=batch``."""
    return _of_ops(_all(batch, SWIFTFORMER_TIMED), ops)


def known_shapes(batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """Every named shape ``--shape`` can pick: the design shapes and every SwiftFormer variant."""
    return _of_ops(_all(batch, tuple(SWIFTFORMER)), ops)


def quick_shapes(batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """``--quick``: MobileViTv2-1.0's first attention stage and SwiftFormer-XS's first stage (the
    most tokens), each at B=1 and the training batch."""
    quick = ("w1.0-256px-L3-", "sf-xs-224px-s1-")
    return [s for s in design_shapes(batch, ops) if s.name.startswith(quick)]


# Commas separate list items, so custom shapes use "x": BxCxPxN (separable), BxNxD (additive).
_CUSTOM = re.compile(r"^\d+(x\d+){2,3}$")


def _custom(pattern: str, ops: Sequence[str]) -> Shape:
    sizes = [int(x) for x in pattern.split("x")]
    op, layout = ("separable", "BxCxPxN") if len(sizes) == 4 else ("additive", "BxNxD")
    if op not in ops:
        raise ValueError(f"--shape {pattern!r} is a {op} shape ({layout}) but --op leaves {op} out")
    if min(sizes) < 1:
        raise ValueError(f"--shape {pattern!r}: every size of {layout} must be >= 1")
    if op == "separable":
        b, c, p, n = sizes
        return Shape(f"B{b}-C{c}-P{p}-N{n}", b, c, p, n)
    b, n, d = sizes
    return Shape(f"B{b}-N{n}-D{d}", b, d, 1, n, op="additive")


def select_shapes(patterns: list[str], batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """The known shapes of ``ops`` matching any glob in ``patterns``, plus custom shapes, grouped
    by op; ``ValueError`` naming a pattern that matches nothing."""
    known, chosen = known_shapes(batch, ops), {}
    for pattern in patterns:
        if _CUSTOM.match(pattern):
            shape = _custom(pattern, ops)
            chosen[shape.name] = shape
            continue
        hits = [s for s in known if fnmatch.fnmatchcase(s.name, pattern)]
        if not hits:
            raise ValueError(
                f"--shape {pattern!r} matches no {' or '.join(ops)} shape; give a glob over these "
                f"names, or a custom 'BxCxPxN' (separable) or 'BxNxD' (additive): "
                + ", ".join(s.name for s in known)
            )
        chosen.update((s.name, s) for s in hits)
    return _of_ops(list(chosen.values()), ops)
