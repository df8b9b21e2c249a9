"""Triton kernels, one module per op (``separable_attention``).

Nothing is imported here: importing a kernel module imports triton and registers its
``torch.ops.mvit2.*_triton`` ops, which ``mvit2_kernels.ops`` does lazily on the first call with
``backend="triton"``, so machines without triton can still import the package.
"""
