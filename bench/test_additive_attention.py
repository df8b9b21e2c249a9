"""Efficient additive attention (SwiftFormer, variant "normalize"): the kernel backends against the
eager reference, torch.compile(reference) and the copy floor, one benchmark group per shape, dtype
and pass (every stage of SwiftFormer XS and L3 at 224²).

    python -m pytest bench/test_additive_attention.py --benchmark-json bench/results/pytest.json
"""

from __future__ import annotations

import pytest
from conftest import parametrize_kernels, time_kernel


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        parametrize_kernels(metafunc, "additive")


def test_additive_attention(benchmark, device, shape, dtype, pass_, impl):
    time_kernel(benchmark, device, shape, dtype, pass_, impl)
