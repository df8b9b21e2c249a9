"""The attention shapes worth timing (DESIGN §3), named so that ``--shape`` globs can pick them.

Two ops, each with its own names:

- ``separable`` (MobileViTv2): ``w<width>-<resolution>px-<stage>-B<batch>``;
  ``w1.0-256px-L3-B32`` is the first attention stage (L3) of MobileViTv2-1.0 on 256×256 images at
  batch 32, i.e. ``C=128, P=4, N=256``. Custom shapes: ``BxCxPxN``.
- ``additive`` (SwiftFormer): ``sf-<variant>-224px-s<stage>-B<batch>``; ``sf-xs-224px-s1-B32`` is
  the attention of SwiftFormer-XS's first stage at batch 32, i.e. ``N=3136`` tokens of ``D=48``.
  Custom shapes: ``BxNxD``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "OPS",
    "SWIFTFORMER",
    "Shape",
    "design_shapes",
    "known_shapes",
    "quick_shapes",
    "select_shapes",
    "train_batch",
]

OPS = ("separable", "additive")

# --- MobileViTv2 (separable attention) ---
WIDTHS = (0.5, 1.0, 2.0)
# Attention dim of stages L3, L4, L5 at width 1.0; it scales with the width multiplier.
STAGE_CHANNELS = {"L3": 128, "L4": 192, "L5": 256}
# Output strides 8, 16, 32 with 2x2 patches: N = (res/stride/2)^2 patches per pixel position.
STAGE_STRIDE = {"L3": 8, "L4": 16, "L5": 32}
RESOLUTIONS = (256, 512)  # classification; DeepLabV3 segmentation at 512²
PIXELS = 4  # P: 2x2 patches

# --- SwiftFormer (additive attention) ---
# Depths and stage dims as published (SwiftFormer_depth / SwiftFormer_width, DESIGN §3).
SWIFTFORMER = {
    "xs": ((3, 3, 6, 4), (48, 56, 112, 220)),
    "s": ((3, 3, 9, 6), (48, 64, 168, 224)),
    "l1": ((4, 3, 10, 5), (48, 96, 192, 384)),
    "l3": ((4, 4, 12, 6), (64, 128, 320, 512)),
}
# The default run: the smallest and the largest variant, every stage. S and L1 stay selectable by
# --shape; their stage 1 is XS's shape and their later stages lie between XS's and L3's.
SWIFTFORMER_TIMED = ("xs", "l3")
SWIFTFORMER_RESOLUTION = 224
# Strides 4, 8, 16, 32: N = 56², 28², 14², 7² tokens at 224², one attention block per stage.
SWIFTFORMER_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class Shape:
    """One attention call.

    ``separable``: q ``[batch, 1, pixels, patches]``, k/v ``[batch, channels, pixels, patches]``.
    ``additive``: q/k ``[batch, patches, channels]`` (N tokens of D channels) and ``pixels == 1``,
    so that both ops share the fields of a JSON row.
    """

    name: str
    batch: int
    channels: int
    pixels: int
    patches: int
    op: str = "separable"

    @property
    def elements(self) -> int:
        """Elements of one ``[B, 1, P, N]`` plane (``B·P·N``), or of one token column (``B·N``)."""
        return self.batch * self.pixels * self.patches


def train_batch(device_type: str) -> int:
    """The training batch timed beside B=1: 32 on a CPU, 256 on a GPU."""
    return 256 if device_type == "cuda" else 32


def _batches(batch: int) -> list[int]:
    return list(dict.fromkeys((1, batch)))


def _separable_shapes(batch: int) -> list[Shape]:
    """Every width × resolution × stage of MobileViTv2 at ``B=1`` and ``B=batch``."""
    shapes = []
    for width in WIDTHS:
        for res in RESOLUTIONS:
            for stage, base in STAGE_CHANNELS.items():
                side = res // STAGE_STRIDE[stage] // 2
                for b in _batches(batch):
                    name = f"w{width}-{res}px-{stage}-B{b}"
                    shapes.append(Shape(name, b, int(base * width), PIXELS, side * side))
    return shapes


def _additive_shapes(batch: int, variants: Sequence[str]) -> list[Shape]:
    """The attention of every stage of the SwiftFormer ``variants`` at 224², ``B=1`` and
    ``B=batch``."""
    shapes = []
    for variant in variants:
        dims = SWIFTFORMER[variant][1]
        for stage, (dim, stride) in enumerate(zip(dims, SWIFTFORMER_STRIDES, strict=True)):
            side = SWIFTFORMER_RESOLUTION // stride
            for b in _batches(batch):
                name = f"sf-{variant}-{SWIFTFORMER_RESOLUTION}px-s{stage + 1}-B{b}"
                shapes.append(Shape(name, b, dim, 1, side * side, op="additive"))
    return shapes


def design_shapes(batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """The default run of ``ops``: every MobileViTv2 shape of DESIGN §3, and every stage of
    SwiftFormer XS and L3; each at ``B=1`` and ``B=batch``."""
    return _of_ops(_separable_shapes(batch) + _additive_shapes(batch, SWIFTFORMER_TIMED), ops)


def known_shapes(batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """Every named shape ``--shape`` can pick: the design shapes plus SwiftFormer S and L1."""
    return _of_ops(_separable_shapes(batch) + _additive_shapes(batch, tuple(SWIFTFORMER)), ops)


def quick_shapes(batch: int, ops: Sequence[str] = OPS) -> list[Shape]:
    """The ``--quick`` subset: MobileViTv2-1.0's first attention stage (C=128, N=256), the shape
    the foundation issue's targets are stated for, and SwiftFormer-XS's first stage (N=3136, the
    most tokens); each at B=1 and the training batch."""
    quick = ("w1.0-256px-L3-", "sf-xs-224px-s1-")
    return [s for s in design_shapes(batch, ops) if s.name.startswith(quick)]


def _of_ops(shapes: list[Shape], ops: Sequence[str]) -> list[Shape]:
    """``shapes`` of ``ops``, grouped by op in the order of :data:`OPS`."""
    return [s for op in OPS if op in ops for s in shapes if s.op == op]


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
    """The known shapes of ``ops`` whose names match any glob in ``patterns``, plus custom
    ``BxCxPxN`` (separable) and ``BxNxD`` (additive) shapes, grouped by op; raises
    ``ValueError`` naming a pattern that matches nothing."""
    known = known_shapes(batch, ops)
    chosen: dict[str, Shape] = {}
    for pattern in patterns:
        if _CUSTOM.match(pattern):
            shape = _custom(pattern, ops)
            chosen[shape.name] = shape
            continue
        hits = [s for s in known if fnmatch.fnmatchcase(s.name, pattern)]
        if not hits:
            names = ", ".join(s.name for s in known)
            raise ValueError(
                f"--shape {pattern!r} matches no {' or '.join(ops)} shape; give a glob over these "
                f"names, or a custom 'BxCxPxN' (separable) or 'BxNxD' (additive): {names}"
            )
        chosen.update((s.name, s) for s in hits)
    return _of_ops(list(chosen.values()), ops)
