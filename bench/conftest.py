"""pytest-benchmark suite set-up (run on demand: ``python -m pytest bench/``; the default test run
only looks in tests/). Options choose the device and the shape set; ``-k`` filters further."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mvit2_kernels.bench import cases, environment, shapes
from mvit2_kernels.bench.timing import rotating, rotation_count


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
        help="only the --quick shapes of mvit2-bench (MobileViTv2-1.0 stage L3, SwiftFormer-XS "
        "stage 1)",
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


def parametrize_kernels(metafunc: pytest.Metafunc, op: str) -> None:
    """Parametrize a kernel benchmark of ``op`` as ``mvit2-bench --op op`` runs it: device,
    shape, dtype, pass and impl (the copy floor, the baselines, every kernel backend)."""
    device = bench_device(metafunc.config)
    batch = shapes.train_batch(device)
    pick = (
        shapes.quick_shapes if metafunc.config.getoption("--mvit2-quick") else shapes.design_shapes
    )
    chosen = pick(batch, [op])
    impls = ["copy", "eager", "compile", *cases.kernel_backends(device)]
    metafunc.parametrize("device", [device], ids=[device])
    metafunc.parametrize("shape", chosen, ids=[s.name for s in chosen])
    metafunc.parametrize("dtype", cases.DEVICE_DTYPES[device])
    metafunc.parametrize("pass_", cases.PASSES, ids=["fwd", "fwd+bwd"])
    metafunc.parametrize("impl", impls)


def time_kernel(benchmark, device: str, shape: shapes.Shape, dtype: str, pass_: str, impl: str):
    """One benchmark of one group, with the command's inputs, cache rotation and byte count."""
    torch_dtype = cases.DTYPES[dtype]
    nbytes = cases.op_bytes(shape, torch_dtype, pass_)
    cache = environment.last_level_cache_bytes(device)
    if impl == "copy":
        count = rotation_count(nbytes, cache)
        sets = cases.copy_sets(nbytes, torch_dtype, device, count)
    else:
        count = rotation_count(cases.set_bytes(shape, torch_dtype, pass_), cache)
        sets = cases.input_sets(shape, torch_dtype, device, pass_, count)
    fn = synchronized(rotating(cases.impl_callable(impl, pass_, shape.op), sets), device)
    fn()  # compiles (torch.compile, Triton) outside the timed rounds
    benchmark.group = f"{shape.op} {shape.name} {dtype} {pass_}"
    # The shape's fields under the names of a JSON row (docs/performance.md).
    fields = {("shape" if k == "name" else k): v for k, v in dataclasses.asdict(shape).items()}
    benchmark.extra_info.update(
        fields,
        dtype=dtype,
        pass_=pass_,
        impl=impl,
        bytes=nbytes,
        rotated_sets=count,
    )
    benchmark(fn)
    benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
