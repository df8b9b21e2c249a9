"""A fix for an inductor bug that fused MobileViTv2 models trigger under ``torch.compile`` on CPU.

Inductor's C++ backend generates a 2-D tiled kernel (a 16×16 transposed tile of one input, the
tile's outer variable ``x`` stepped by an inner loop ``x_inner``) when one kernel reads tensors
in two layouts, as where the fused layer's ``[B, C, P, N]`` output (contiguous) meets
transformers' channels-last tensors. When that kernel also scatters with ``atomic_add``
(``F.fold``, transformers' patch folding, lowers to an accumulating ``index_put``) and runs on
more than one thread, the scatter index gets the tile offset twice: ``CppTile2DKernel.store``
substitutes ``x -> x + x_inner`` and passes the result to ``CppVecKernel.store``, which rebuilds
the index with ``ops.index_expr``, and ``CppTile2DOverrides.index_expr`` substitutes again. The
kernel writes at ``x + 2·x_inner``, past its buffer: heap corruption
(docs/compile.md has a plain-torch repro).

The fix hands that one case (a parallel ``atomic_add`` store whose own index needs no
transposition) to ``CppVecKernel.store`` with the index as it came, so the offset is applied
once, as upstream's fix does; every other store runs inductor's code unchanged. Importing
``mvit2_kernels`` installs it (:func:`install`): at once if inductor's C++ codegen is loaded,
else when it is imported, so the import of ``mvit2_kernels`` stays as cheap as before. It patches
only a torch whose source has both halves of the bug.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import sys
from types import ModuleType

__all__ = ["install", "installed"]

_CODEGEN = "torch._inductor.codegen.cpp"
_installed = False


def install() -> None:
    """Fix inductor's doubled tile offset in parallel ``atomic_add`` stores of 2-D tiled CPU
    kernels, now or when ``torch._inductor.codegen.cpp`` is imported; once per process."""
    module = sys.modules.get(_CODEGEN)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def installed() -> bool:
    """Whether the fix is in place (False before inductor's C++ codegen is imported, and where
    this torch does not have the bug or its code is not the one the fix was written for)."""
    return _installed


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the import of inductor's C++ codegen, it leaves the module to the
    other finders and patches it once its code has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _CODEGEN:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch(cpp: ModuleType) -> None:
    global _installed
    if _installed:
        return
    tile2d, vec = getattr(cpp, "CppTile2DKernel", None), getattr(cpp, "CppVecKernel", None)
    if tile2d is None or vec is None or not _has_double_offset(tile2d.store, vec.store):
        return
    from torch._inductor import config

    original = tile2d.store

    def store(self, name, index, value, mode=None):
        parallel = config.cpp.dynamic_threads or self.num_threads != 1
        if (mode == "atomic_add" and parallel
                and not self.need_vec_transpose(self.rename_indexing(index))):
            # CppVecKernel.store offsets the index itself (ops.index_expr): pass it as it is.
            return vec.store(self, name, index, value, mode)
        return original(self, name, index, value, mode)

    store.__wrapped__ = original
    tile2d.store = store
    _installed = True


def _has_double_offset(tile2d_store, vec_store) -> bool:
    """Whether this inductor has the bug: the tiled store offsets the index before delegating,
    whatever the mode, and the vectorised store rebuilds an ``atomic_add``'s index through
    ``ops.index_expr`` (which offsets it again)."""
    try:
        tile2d, vec = inspect.getsource(tile2d_store), inspect.getsource(vec_store)
    except (OSError, TypeError):
        return False
    delegates_offset = ("super().store(name, new_index, value, mode)" in tile2d
                        and "atomic_add" not in tile2d)
    return delegates_offset and "ops.index_expr(index" in vec
