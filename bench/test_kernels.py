"""pytest-benchmark over the cases of ``mvit2-bench`` (the same inputs, input rotation and byte
counts): one benchmark group per op, shape, dtype and pass, one test per impl (the copy floor, the
eager and compiled references, every kernel backend of the device). Not part of the default test
run, which looks only in tests/:

    python -m pytest bench/ --benchmark-json bench/results/pytest.json -k "w1.0-256px-L3 and fp32"

pytest-benchmark reads a wall clock, so on a GPU every call synchronizes.
"""

from __future__ import annotations

import pytest
import torch

from mvit2_kernels.bench import kernels, shapes
from mvit2_kernels.bench.timing import last_level_cache_bytes, rotating

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = shapes.design_shapes(shapes.train_batch(DEVICE))
IMPLS = ["copy", "eager", "compile", *kernels.kernel_backends(DEVICE)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", list(kernels.PASSES), ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", kernels.DEVICE_DTYPES[DEVICE])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_kernel(benchmark, shape, dtype, pass_, impl):
    torch_dtype, cache = kernels.DTYPES[dtype], last_level_cache_bytes(DEVICE)
    nbytes = kernels.op_bytes(shape, torch_dtype, pass_)
    if impl == "copy":
        sets = kernels.copy_sets(nbytes, torch_dtype, DEVICE, cache)
    else:
        sets = kernels.input_sets(shape, torch_dtype, DEVICE, pass_, cache)
    step = rotating(kernels.impl_callable(impl, pass_, shape.op), sets)
    fn = (lambda: (step(), torch.cuda.synchronize())) if DEVICE == "cuda" else step
    fn()  # compiles (torch.compile, Triton) outside the timed rounds
    benchmark.group = f"{shape.op} {shape.name} {dtype} {pass_}"
    benchmark.extra_info.update(bytes=nbytes, rotated_sets=len(sets))
    benchmark(fn)
    if benchmark.stats:  # None under --benchmark-disable, which runs fn once as a smoke test
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
