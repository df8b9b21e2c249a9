"""Shared test set-up: Triton's interpreter on machines without a GPU, and NaN-poisoned outputs."""

import os

import torch

# Must precede the first import of a Triton kernel module: triton.jit reads it at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from mvit2_kernels import available_backends

BACKENDS = [b for b in ("cuda", "triton", "cpu") if b in available_backends()]


def device_of(backend: str) -> str:
    """The device a backend's tests run on (Triton runs CPU tensors under the interpreter)."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


@pytest.fixture
def poison_empty():
    """Every ``torch.empty``/``at::empty`` in the test is filled with NaN (integers with their
    maximum), so an output element the kernel forgot to write cannot pass as a value."""
    det, fill = (
        torch.are_deterministic_algorithms_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det)
    torch.utils.deterministic.fill_uninitialized_memory = fill
