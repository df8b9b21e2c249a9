"""pytest-benchmark over the cases of ``mvit2-bench`` (the same inputs, input rotation and byte
counts): one benchmark group per op, shape, dtype, pass and gradient path, one test per impl (the
copy floor, the eager and compiled references, every kernel backend of the device). Not part of
the default test run, which looks only in tests/:

    python -m pytest bench/ --benchmark-json bench/results/pytest.json -k "w1.0-256px-L3 and fp32"

pytest-benchmark reads a wall clock, so on a GPU every call synchronizes.
"""

from __future__ import annotations

import pytest
import torch

from mvit2_kernels.bench import kernels
from mvit2_kernels.bench.timing import last_level_cache_bytes, rotating

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = kernels.design_shapes(kernels.TRAIN_BATCH[DEVICE])
IMPLS = ["copy", "eager", "compile", *kernels.kernel_backends(DEVICE)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grads", [None, *kernels.GRAD_PATHS],
                         ids=["fwd", *(f"fwd+bwd-{p}" for p in kernels.GRAD_PATHS)])
@pytest.mark.parametrize("dtype", kernels.DEVICE_DTYPES[DEVICE])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_kernel(benchmark, shape, dtype, grads, impl):
    if grads is not None and grads not in kernels.OPS[shape.op].grad_paths:
        pytest.skip(f"{shape.op} is timed along {kernels.OPS[shape.op].grad_paths}")
    pass_ = "forward" if grads is None else "forward+backward"
    torch_dtype, cache = kernels.DTYPES[dtype], last_level_cache_bytes(DEVICE)
    nbytes = kernels.op_bytes(shape, torch_dtype, pass_)
    if impl == "copy":
        sets, fn = kernels.copy_sets(nbytes, torch_dtype, DEVICE, cache), torch.Tensor.copy_
    else:
        sets = kernels.input_sets(shape, torch_dtype, DEVICE, grads is not None, cache)
        fn = kernels.step(kernels.op_function(impl, shape.op), shape.op, grads)
    step = rotating(fn, sets)
    fn = (lambda: (step(), torch.cuda.synchronize())) if DEVICE == "cuda" else step
    fn()  # compiles (torch.compile, Triton) outside the timed rounds
    benchmark.group = f"{shape.op} {shape.name} {dtype} {pass_} {grads or ''}".rstrip()
    benchmark.extra_info.update(bytes=nbytes, rotated_sets=len(sets))
    benchmark(fn)
    if benchmark.stats:  # None under --benchmark-disable, which runs fn once as a smoke test
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
