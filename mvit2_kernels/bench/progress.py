"""The progress bar on stderr, so that stdout keeps only the table: tqdm when it is installed,
else a one-line bar of our own with the same three methods (``update``, ``write``, ``close``)."""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["PlainProgress", "progress_bar"]


def progress_bar(total: int, disable: bool):
    """A bar over ``total`` steps; off when ``disable`` or when stderr is not a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        return PlainProgress(total, enabled=not disable and sys.stderr.isatty())
    return tqdm(
        total=total,
        file=sys.stderr,
        disable=True if disable else None,
        unit="timing",
        dynamic_ncols=True,
        leave=False,
    )


class PlainProgress:
    """``[#####.....] 5/10`` redrawn in place on stderr; ``write`` prints a line above it."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width, self.done = max(total, 1), enabled, width, 0
        self._draw()

    def _draw(self) -> None:
        if self.enabled:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "." * (self.width - filled)
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total}")
            sys.stderr.flush()

    def _clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (self.width + 24) + "\r")

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def write(self, line: str, file: TextIO | None = None) -> None:
        self._clear()
        print(line, file=file or sys.stdout, flush=True)
        self._draw()

    def close(self) -> None:
        self._clear()
