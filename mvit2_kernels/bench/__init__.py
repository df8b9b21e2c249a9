"""``mvit2-bench`` (also ``python -m mvit2_kernels.bench``): the kernels, the attention layer and
whole models against eager PyTorch, ``torch.compile`` and the copy floor (docs/performance.md)."""

from .cli import main

__all__ = ["main"]
