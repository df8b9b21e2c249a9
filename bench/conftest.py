"""pytest-benchmark suite set-up (run on demand: ``python -m pytest bench/``; the default test run
only looks in tests/). Options choose the device and the shape set; ``-k`` filters further."""

from __future__ import annotations

import pytest
import torch

from mvit2_kernels.bench import environment


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mvit2", "mvit2-kernels benchmarks")
    group.addoption(
        "--mvit2-device",
        choices=("cpu", "cuda"),
        default=None,
        help="device to time on (default: cuda if available, else cpu)",
    )
    group.addoption(
        "--mvit2-quick",
        action="store_true",
        help="only the --quick shapes of mvit2-bench (MobileViTv2-1.0, stage L3)",
    )


def bench_device(config: pytest.Config) -> str:
    device = config.getoption("--mvit2-device") or environment.best_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--mvit2-device cuda: no CUDA device is visible to torch")
    return device


def synchronized(fn, device: str):
    """pytest-benchmark reads a wall clock: on a GPU, each call must wait for its kernels."""
    if device != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call
