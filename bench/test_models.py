"""Model throughput: MobileViTv2-1.0 (and SwiftFormer-XS when mvit2_kernels.models has it), ours
fused and unfused against transformers, inference at B=1 and a training step at the training batch.

    python -m pytest bench/test_models.py --benchmark-json bench/results/pytest-models.json
"""

from __future__ import annotations

import pytest
import torch
from conftest import bench_device, synchronized

from mvit2_kernels.bench import models, shapes

pytest.importorskip("transformers")

IMPLS = ("fused", "unfused", "transformers")
FAMILIES = (("mobilevitv2", "1.0", 256), ("swiftformer", "xs", 224))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    batch = shapes.train_batch(device)
    chosen = [
        models.ModelCase(family, variant, res, b, mode)
        for family, variant, res in FAMILIES
        for mode, b in (("inference", 1), ("training", batch))
    ]
    metafunc.parametrize("device", [device], ids=[device])
    metafunc.parametrize("case", chosen, ids=[f"{c.name}-{c.mode}-B{c.batch}" for c in chosen])
    metafunc.parametrize("impl", IMPLS)


def test_model(benchmark, device, case, impl):
    builders = models.model_builders(case.family, case.variant)
    if impl not in builders:
        pytest.skip(f"{impl} {case.name} is not available (mvit2_kernels.models lacks it)")
    torch.manual_seed(0)
    model = builders[impl]("auto").to(device)
    model.train(case.mode == "training")
    x = torch.randn(case.batch, 3, case.resolution, case.resolution, device=device)
    labels = torch.randint(0, 1000, (case.batch,), device=device)
    step = models.model_step(model, case.mode)
    fn = synchronized(lambda: step(x, labels), device)
    fn()
    benchmark.group = f"{case.name} {case.mode} B={case.batch}"
    benchmark.extra_info.update(model=case.name, mode=case.mode, batch=case.batch, impl=impl)
    benchmark(fn)
    benchmark.extra_info["images_per_s"] = case.batch / benchmark.stats.stats.median
