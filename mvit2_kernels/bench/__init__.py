"""Benchmarks of the fused kernels and of whole models: the ``mvit2-bench`` command.

``python -m mvit2_kernels.bench`` (or ``mvit2-bench``) times the kernels on the best device;
``... model`` times MobileViTv2 (and SwiftFormer) end to end; ``... report`` renders result files
as Markdown. See docs/performance.md for the method, the columns and the JSON schema.
"""

from .cli import main

__all__ = ["main"]
