"""Which backends exist on this machine, and which one a call on a given device runs.

``auto`` picks the CUDA C++ kernels on CUDA tensors (Triton if they were not built), the C++
kernel on CPU tensors, and the reference otherwise. Naming a backend forces it and fails clearly
when it cannot run the given tensors.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

try:
    from . import _C  # registers torch.ops.mvit2.* (CPU, and CUDA when built)
except ImportError as _e:  # not built: only the reference (and Triton) remain
    _C = None
    _C_ERROR: str | None = str(_e)
else:
    _C_ERROR = None


def compiled_cpu() -> bool:
    """Whether the C++ extension (and with it the CPU kernels) is built and importable."""
    return _C is not None


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
                f"{_C_ERROR} (reinstall with `pip install --no-build-isolation .`)"
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
