"""Separable attention (MobileViTv2): the kernel backends against the eager reference,
torch.compile(reference) and the copy floor, one benchmark group per shape, dtype and pass
(DESIGN §3 shapes).

    python -m pytest bench/test_separable_attention.py --benchmark-json bench/results/pytest.json
"""

from __future__ import annotations

import pytest
from conftest import parametrize_kernels, time_kernel


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        parametrize_kernels(metafunc, "separable")


def test_separable_attention(benchmark, device, shape, dtype, pass_, impl):
    time_kernel(benchmark, device, shape, dtype, pass_, impl)
