"""Which backends exist on this machine, and which one a call on a given device runs.

``auto`` picks the CUDA C++ kernels on CUDA tensors (Triton if they were not built), the C++
kernel on CPU tensors, and the reference otherwise. Naming a backend forces it and fails clearly
when it cannot run the given tensors.
"""

from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

try:
    from . import _C  # registers the torch.ops.mvit2.* schemas (and the CUDA kernels when built)
except ImportError as _e:  # not built: only the reference (and Triton) remain
    _C = None
    _C_ERROR: str | None = str(_e)
else:
    _C_ERROR = None

# The CPU kernels are built once per instruction set (setup.py, csrc/build.json): import the
# best build this CPU runs, as torch judges it (ATEN_CPU_CAPABILITY=avx2 lowers both), or a
# single build made for this machine (MVIT2_CPU_ISA=native).
_CPU_ISA_ORDER = {"AVX512": ("avx512", "avx2", "generic"), "AVX2": ("avx2", "generic")}


def _import_cpu_kernels():
    if _C is None:
        return None, _C_ERROR
    capability = torch.backends.cpu.get_cpu_capability()
    tried = []
    for isa in ("native", *_CPU_ISA_ORDER.get(capability, ("generic",))):
        try:
            return importlib.import_module(f"{__package__}._cpu_{isa}"), None
        except ImportError as e:
            tried.append(f"_cpu_{isa}: {e}")
    return None, (f"no CPU kernel build runs on this CPU (torch reports {capability}); "
                  f"tried {'; '.join(tried)}")


_CPU, _CPU_ERROR = _import_cpu_kernels()


def compiled() -> bool:
    """Whether the C++ extension is built: the ``torch.ops.mvit2`` schemas are registered."""
    return _C is not None


def compiled_cpu() -> bool:
    """Whether the CPU kernels are built and importable on this CPU."""
    return _CPU is not None


def cpu_isa() -> str | None:
    """The instruction set of the CPU kernels in use (``"avx512"``, ``"avx2"``, ``"generic"``
    or ``"native"``), or None where they are not available."""
    return None if _CPU is None else _CPU.isa


def compiled_cuda() -> bool:
    """Whether the C++ extension was built with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built)


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# Decided once at import (TRITON_INTERPRET is read by triton.jit then too); a plain bool keeps
# resolve_backend free of caches that torch.compile would have to trace.
_TRITON_USABLE = _triton_usable()


def triton_usable() -> bool:
    """Whether Triton kernels can launch here: on a CUDA device, or under TRITON_INTERPRET=1."""
    return _TRITON_USABLE


def available_backends() -> list[str]:
    """The backends usable on this machine, best first; ``"reference"`` is always there."""
    found = []
    if compiled_cuda() and torch.cuda.is_available():
        found.append("cuda")
    if triton_usable():
        found.append("triton")
    if compiled_cpu():
        found.append("cpu")
    return [*found, "reference"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that runs tensors on ``device``; raises if ``backend`` cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if compiled_cuda():
                return "cuda"
            return "triton" if triton_usable() else "reference"
        return "cpu" if device.type == "cpu" and compiled_cpu() else "reference"
    if backend == "reference":
        return backend
    if backend == "cpu":
        if not compiled_cpu():
            raise RuntimeError(
                f"backend='cpu' needs the C++ extension, which failed to import: "
                f"{_CPU_ERROR} (reinstall with `pip install --no-build-isolation .`)"
            )
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs CPU tensors, got tensors on {device}")
    elif backend == "cuda":
        if not compiled_cuda():
            why = _C_ERROR or "it was built without CUDA (see the build banner)"
            raise RuntimeError(f"backend='cuda' is not available: {why}")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs CUDA tensors, got tensors on {device}")
    elif backend == "triton":
        if not triton_usable():
            raise RuntimeError(
                "backend='triton' needs triton and a CUDA device "
                "(or TRITON_INTERPRET=1 set before import, to run on CPU)"
            )
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            raise ValueError(
                f"backend='triton' runs CUDA tensors (CPU tensors only under "
                f"TRITON_INTERPRET=1), got tensors on {device}"
            )
    return backend
