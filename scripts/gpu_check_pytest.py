"""pytest plugin of scripts/gpu_check.sh, loaded with ``-p gpu_check_pytest`` (scripts/ on
PYTHONPATH); it changes nothing unless the variables below are set.

- ``GPU_CHECK_PRETEND_CUDA=1`` (the rehearsal without a GPU, with ``--collect-only`` only): torch
  reports one CUDA device and the extension reports its CUDA kernels, so the collection shows
  every test the GPU run selects, the ``[cuda-...]`` and ``[triton-...]`` cases included (a
  module that makes CUDA tensors at import is reported skipped instead). Tests never run so: a
  run without ``--collect-only`` is refused.
- ``GPU_CHECK_SLOW_GROUP=1`` (the GPU run under pytest-xdist with ``--dist loadgroup``): the tests
  marked ``slow`` (tens of GB of GPU memory each) go to one worker, one after another, and each
  gives its cached memory back when done, so two never hold the GPU's memory at once.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("GPU_CHECK_PRETEND_CUDA") == "1":
    import torch

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    import mvit2_kernels.backends as _backends  # first import: Triton is judged usable now

    _backends.compiled_cuda = lambda: True


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("GPU_CHECK_PRETEND_CUDA") == "1" and not config.option.collectonly:
        raise pytest.UsageError("GPU_CHECK_PRETEND_CUDA=1 is for --collect-only: it fakes a GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Pretending: a module that makes CUDA tensors at import (to build its cases) cannot be
    collected without a GPU; it is reported as skipped, with that reason, not as an error."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("GPU_CHECK_PRETEND_CUDA") != "1" or not report.failed:
        return
    text = str(report.longrepr)
    if any(m in text for m in ("not compiled with CUDA", "NVIDIA driver", "no CUDA GPUs")):
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), None,
                           "Skipped: makes CUDA tensors at import: collected on a GPU only")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("GPU_CHECK_SLOW_GROUP") != "1":
        return
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("slow"))


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if os.environ.get("GPU_CHECK_SLOW_GROUP") == "1" and item.get_closest_marker("slow"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
