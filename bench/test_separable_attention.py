"""Separable attention: the kernel backends against the eager reference, torch.compile(reference)
and the copy floor, one benchmark group per shape, dtype and pass (DESIGN §3 shapes).

    python -m pytest bench/test_separable_attention.py --benchmark-json bench/results/pytest.json
"""

from __future__ import annotations

import pytest
from conftest import bench_device, synchronized

from mvit2_kernels.bench import cases, shapes
from mvit2_kernels.bench.environment import last_level_cache_bytes
from mvit2_kernels.bench.timing import rotating, rotation_count


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    batch = shapes.train_batch(device)
    chosen = (
        shapes.quick_shapes if metafunc.config.getoption("--mvit2-quick") else shapes.design_shapes
    )(batch)
    impls = ["copy", "eager", "compile", *cases.kernel_backends(device)]
    metafunc.parametrize("device", [device], ids=[device])
    metafunc.parametrize("shape", chosen, ids=[s.name for s in chosen])
    metafunc.parametrize("dtype", cases.DEVICE_DTYPES[device])
    metafunc.parametrize("pass_", cases.PASSES, ids=["fwd", "fwd+bwd"])
    metafunc.parametrize("impl", impls)


def test_separable_attention(benchmark, device, shape, dtype, pass_, impl):
    torch_dtype = cases.DTYPES[dtype]
    nbytes = cases.op_bytes(shape, torch_dtype, pass_)
    cache = last_level_cache_bytes(device)
    if impl == "copy":
        count = rotation_count(nbytes, cache)
        sets = cases.copy_sets(nbytes, torch_dtype, device, count)
    else:
        count = rotation_count(cases.set_bytes(shape, torch_dtype, pass_), cache)
        sets = cases.input_sets(shape, torch_dtype, device, pass_, count)
    fn = synchronized(rotating(cases.impl_callable(impl, pass_), sets), device)
    fn()  # compiles (torch.compile, Triton) outside the timed rounds
    benchmark.group = f"{shape.name} {dtype} {pass_}"
    benchmark.extra_info.update(
        shape=shape.name,
        batch=shape.batch,
        channels=shape.channels,
        pixels=shape.pixels,
        patches=shape.patches,
        dtype=dtype,
        pass_=pass_,
        impl=impl,
        bytes=nbytes,
        rotated_sets=count,
    )
    benchmark(fn)
    benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
