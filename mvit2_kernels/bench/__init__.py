"""The ``mvit2-bench`` command (also ``python -m mvit2_kernels.bench``): the kernels, the attention
layer and whole models against eager PyTorch, ``torch.compile`` and the memory-copy floor. See
docs/performance.md for the method, the columns and the JSON schema.
"""

from .cli import main

__all__ = ["main"]
