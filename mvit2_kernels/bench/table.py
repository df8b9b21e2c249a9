"""Plain-text tables with aligned columns, printed line by line as results arrive."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CHANNELS_TITLE",
    "Column",
    "TextTable",
    "fmt",
    "layer_table",
    "layer_values",
    "model_table",
    "model_values",
    "op_table",
    "op_values",
]

PASS_SHORT = {"forward": "fwd", "forward+backward": "fwd+bwd"}
# What the "channels" field of a row is for each op: C of k/v, or D of a token.
CHANNELS_TITLE = {"separable": "C", "additive": "D"}


def fmt(x: float | None, digits: int = 4) -> str:
    """``x`` to about ``digits`` significant figures without an exponent; ``-`` for missing."""
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    decimals = 0
    while abs(x) < 10 ** (digits - 1 - decimals) and decimals < 6:
        decimals += 1
    return f"{x:.{decimals}f}"


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    left: bool = False  # text columns align left, numbers right


class TextTable:
    """Formats a header, a rule, and rows, each padded to its column's width."""

    def __init__(self, columns: Sequence[Column]):
        self.columns = [Column(c.title, max(c.width, len(c.title)), c.left) for c in columns]

    def line(self, values: Sequence[str]) -> str:
        cells = [
            v.ljust(c.width) if c.left else v.rjust(c.width)
            for c, v in zip(self.columns, values, strict=True)
        ]
        return "  ".join(cells).rstrip()

    def header(self) -> str:
        titles = self.line([c.title for c in self.columns])
        return titles + "\n" + "  ".join("-" * c.width for c in self.columns)


def op_table(shape_names: Sequence[str], op: str = "separable") -> TextTable:
    """The kernel benchmark's table for one op, its shape column as wide as the longest name."""
    width = max((len(n) for n in shape_names), default=5)
    return TextTable(
        [
            Column("shape", width, left=True),
            Column("B", 3),
            Column(CHANNELS_TITLE[op], 4),
            Column("N", 4),
            Column("dtype", 5, left=True),
            Column("pass", 7, left=True),
            Column("impl", 7, left=True),
            Column("ms", 8),
            Column("GB/s", 6),
            Column("floor", 5),
            Column("×eager", 6),
            Column("×compile", 8),
        ]
    )


def op_values(row) -> list[str]:
    """The cells of one :class:`~mvit2_kernels.bench.runner.OpRow`; ``floor`` is the fraction of
    the copy floor achieved (floor time / measured time; 1.0 = at the floor)."""
    return [
        row.shape,
        str(row.batch),
        str(row.channels),
        str(row.patches),
        row.dtype,
        PASS_SHORT.get(row.pass_, row.pass_),
        row.impl,
        fmt(row.median_ms),
        fmt(row.gbps, 3),
        fmt(row.floor_fraction, 2),
        fmt(row.speedup_vs_eager, 3),
        fmt(row.speedup_vs_compile, 3),
    ]


def layer_table(shape_names: Sequence[str]) -> TextTable:
    """The layer benchmark's table, its shape column as wide as the longest name."""
    width = max((len(n) for n in shape_names), default=5)
    return TextTable(
        [
            Column("shape", width, left=True),
            Column("B", 3),
            Column("D", 4),
            Column("N", 4),
            Column("dtype", 5, left=True),
            Column("pass", 7, left=True),
            Column("impl", 19, left=True),
            Column("ms", 8),
            Column("×eager", 6),
            Column("×compile", 8),
        ]
    )


def layer_values(row) -> list[str]:
    """The cells of one :class:`~mvit2_kernels.bench.layer.LayerRow`."""
    return [
        row.shape,
        str(row.batch),
        str(row.channels),
        str(row.patches),
        row.dtype,
        PASS_SHORT.get(row.pass_, row.pass_),
        row.impl,
        fmt(row.median_ms),
        fmt(row.speedup_vs_eager, 3),
        fmt(row.speedup_vs_compile, 3),
    ]


def model_table(model_names: Sequence[str]) -> TextTable:
    """The model benchmark's table, its model column as wide as the longest name."""
    width = max((len(n) for n in model_names), default=5)
    return TextTable(
        [
            Column("model", width, left=True),
            Column("res", 3),
            Column("B", 3),
            Column("dtype", 5, left=True),
            Column("mode", 12, left=True),
            Column("impl", 20, left=True),
            Column("ms", 8),
            Column("img/s", 7),
            Column("attn ms", 8),
            Column("attn share", 10),
        ]
    )


def model_values(row) -> list[str]:
    """The cells of one :class:`~mvit2_kernels.bench.models.ModelRow`; the attention share is
    the attention modules' time over the model's, in percent."""
    share = "-" if row.attention_share is None else f"{100 * row.attention_share:.0f}%"
    return [
        row.model,
        str(row.resolution),
        str(row.batch),
        row.dtype,
        row.mode,
        row.impl,
        fmt(row.median_ms),
        fmt(row.images_per_s),
        fmt(row.attention_ms),
        share,
    ]
