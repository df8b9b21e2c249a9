"""Specification of data-parallel training of the fused models on torch.distributed: two
processes on gloo (this machine's CPU), spawned by the test, against one process.

BatchNorm is in eval mode throughout: batch statistics per rank are not those of the concatenated
batch (and SyncBatchNorm runs on GPUs only), while running statistics are the same maths in
both, so "DDP on 2 x B images" and "one process on the 2B images" are then equal up to the order
of float32 sums. Everything else (GroupNorm, the attention, the optimizer) runs as in training.

One spawn runs every case; each test reads its case from the shared result.
"""

import os
import socket
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import mvit2_kernels.nn as mnn
from mvit2_kernels.models import mobilevitv2, swiftformer_xs
from mvit2_kernels.models.mobilevitv2 import TransformerLayer
from mvit2_kernels.models.swiftformer import SwiftFormerBlock

WORLD, BATCH, SIZE, STEPS = 2, 4, 32, 3  # BATCH images per rank, SIZE x SIZE, optimizer steps
TIMEOUT_S = 240
FSDP_CASES = ("fsdp_blocks", "fsdp_projections")
CASES = [(wrap, model, fused) for wrap in ("ddp",) for model in ("mobilevitv2", "swiftformer")
         for fused in (True, False)] + [(wrap, "mobilevitv2", True) for wrap in FSDP_CASES]

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    fully_shard = None


def build(name: str, fused: bool) -> nn.Module:
    torch.manual_seed(0)
    if name == "mobilevitv2":
        model = mobilevitv2(0.5, num_classes=10, fused=fused)
    else:
        model = swiftformer_xs(10, variant="normalize", fused=fused)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (WORLD * BATCH images); rank r trains on its r-th slice."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.rand(WORLD * BATCH, 3, SIZE, SIZE, generator=g), torch.randint(
        0, 10, (WORLD * BATCH,), generator=g)


def train(model: nn.Module, rank: int | None = None) -> None:
    """STEPS of SGD with momentum (Adam would turn round-off in near-zero gradients into full
    steps) on the global batch, or on rank ``rank``'s slice of it."""
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for step in range(STEPS):
        x, y = batch(step)
        if rank is not None:
            x, y = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with FSDP's sharded DTensors gathered into whole tensors."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


class PathCounter:
    """Counts which path SeparableAttention takes: the whole fused layer or projections + op."""

    def __init__(self) -> None:
        self.counts = {"layer": 0, "kernel": 0}
        self.layer, self.op = mnn.separable_attention_layer, mnn.separable_attention_qkv

    def __enter__(self):
        def layer(*a, **k):
            self.counts["layer"] += 1
            return self.layer(*a, **k)

        def op(*a, **k):
            self.counts["kernel"] += 1
            return self.op(*a, **k)

        mnn.separable_attention_layer, mnn.separable_attention_qkv = layer, op
        return self.counts

    def __exit__(self, *exc):
        mnn.separable_attention_layer, mnn.separable_attention_qkv = self.layer, self.op


def shard(model: nn.Module, wrap: str) -> nn.Module:
    """FSDP2: each attention block (and the root) sharded, or each attention projection too."""
    for m in list(model.modules()):
        if wrap == "fsdp_blocks" and isinstance(m, (TransformerLayer, SwiftFormerBlock)):
            fully_shard(m)
        if wrap == "fsdp_projections" and isinstance(m, mnn.SeparableAttention):
            fully_shard(m.qkv_proj)
            fully_shard(m.out_proj)
    return fully_shard(model)


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    results = {}
    for wrap, name, fused in CASES:
        model = build(name, fused)
        if wrap == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        elif fully_shard is None:
            results[wrap, name, fused] = {"error": "no torch.distributed.fsdp.fully_shard"}
            continue
        else:
            wrapped = shard(model, wrap)
        with PathCounter() as paths:
            train(wrapped, rank)
        results[wrap, name, fused] = {"state": full_state(model), "paths": dict(paths)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs():
    """Every case on 2 gloo processes, and the same models trained in this process on the
    concatenated batch."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=False)
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"the two training processes did not finish in {TIMEOUT_S} s")
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                 for r in range(WORLD)]
    single, init, threads = {}, {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: a second thread only waits at OpenMP's barriers
    for name, fused in {(name, fused) for _, name, fused in CASES}:
        model = build(name, fused)
        init[name] = full_state(model)
        train(model)
        single[name, fused] = full_state(model)
    torch.set_num_threads(threads)
    return ranks, single, init


def assert_same_training(a, b, init, what, rtol=1e-3):
    """Every tensor of state ``a`` equals ``b`` up to ``rtol`` of what training changed in it
    (||a - b|| <= rtol ||b - init||): float32 sums in another order (measured: 3e-5 of the
    update), not a missing or doubled gradient (an error of the order of the update itself)."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            err, update = (a[k] - b[k]).norm().item(), (b[k] - init[k]).norm().item()
            assert err <= rtol * update + 1e-7 * init[k].norm().item(), (
                f"{what}, {k}: differ by {err:.3g}, training moved it by {update:.3g}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}, {k}"


def assert_identical(a, b, what):
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "ddp"], ids=str)
def test_ddp_replicas_stay_identical_and_match_one_process(runs, case):
    ranks, single, init = runs
    _, name, fused = case
    states = [r[case]["state"] for r in ranks]
    assert all(v.isfinite().all() for v in states[0].values() if v.is_floating_point())
    assert_identical(states[0], states[1], "rank 0 vs rank 1")
    assert_same_training(states[0], single[name, fused], init[name],
                         "2 processes vs 1 process on the concatenated batch")


@pytest.mark.parametrize("name", ["mobilevitv2", "swiftformer"])
def test_ddp_fused_and_unfused_models_train_alike(runs, name):
    ranks, _, init = runs
    assert_same_training(ranks[0]["ddp", name, True]["state"],
                         ranks[0]["ddp", name, False]["state"], init[name], "fused vs unfused")


def test_ddp_keeps_the_fused_layer_path(runs):
    """DDP hooks gradients, not modules: SeparableAttention runs the whole fused layer."""
    ranks, _, _ = runs
    paths = ranks[0]["ddp", "mobilevitv2", True]["paths"]
    assert paths["layer"] > 0 and paths["kernel"] == 0, paths


@pytest.mark.parametrize("wrap", FSDP_CASES)
def test_fsdp_fully_shard_matches_one_process(runs, wrap):
    ranks, single, init = runs
    results = [r[wrap, "mobilevitv2", True] for r in ranks]
    if "error" in results[0]:
        pytest.skip(results[0]["error"])
    assert_identical(results[0]["state"], results[1]["state"], "rank 0 vs rank 1")
    assert_same_training(results[0]["state"], single["mobilevitv2", True], init["mobilevitv2"],
                         f"{wrap} vs 1 process on the concatenated batch")


def test_fsdp_on_blocks_keeps_the_fused_layer_and_on_projections_falls_back(runs):
    """fully_shard on a block (or the root) hooks that module only: the projections inside are
    plain nn.Conv2d holding the gathered weights, so the whole layer runs fused. fully_shard on a
    projection makes it an FSDPConv2d with forward hooks, which the fused layer could not call:
    SeparableAttention then runs the projections as modules around the fused op ("kernel")."""
    ranks, _, _ = runs
    blocks, projections = (ranks[0][w, "mobilevitv2", True] for w in FSDP_CASES)
    if "error" in blocks:
        pytest.skip(blocks["error"])
    assert blocks["paths"]["layer"] > 0 and blocks["paths"]["kernel"] == 0, blocks["paths"]
    assert projections["paths"]["layer"] == 0 and projections["paths"]["kernel"] > 0, (
        projections["paths"])
