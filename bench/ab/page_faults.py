"""Where the separable backward's time goes on a CPU: the kernels against the allocation of their
outputs (docs/performance.md, "Large outputs"). Run alone on an idle machine:

    python bench/ab/page_faults.py [B C P N]        # default 32 128 4 256, fp32

Five interleaved rounds of ``torch.utils.benchmark`` medians; the median of the rounds is printed.
"""

import itertools
import statistics
import sys

import torch
from torch.utils.benchmark import Timer

import mvit2_kernels  # noqa: F401  (registers torch.ops.mvit2)

B, C, P, N = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (32, 128, 4, 256)
ops = torch.ops.mvit2
torch.manual_seed(0)
sets = []
for _ in range(3):
    qkv = torch.randn(B, 1 + 2 * C, P, N)
    q, k, v = qkv.split([1, C, C], 1)
    y, ctx = ops.separable_attention_forward(q, k, v)
    sets.append((qkv, q, k, v, ctx, torch.randn_like(y)))
cycle = itertools.cycle(sets)
numel = B * (1 + 2 * C) * P * N
reused = torch.empty(numel)


def backward_views():  # dq, dk, dv: three outputs, each under 32 MiB here
    _, q, k, v, ctx, g = next(cycle)
    return ops.separable_attention_backward(g, q, k, v, ctx)


def backward_views_cat():  # ... and autograd's concatenation into one qkv gradient
    _, q, k, v, ctx, g = next(cycle)
    return torch.cat(ops.separable_attention_backward(g, q, k, v, ctx), 1)


def backward_packed():  # one dqkv, allocated by the kernel
    qkv, *_, ctx, g = next(cycle)
    return ops.separable_attention_qkv_backward(g, qkv, ctx)


def fresh_fill():
    return torch.empty(numel).fill_(0)


def reused_fill():
    return reused.fill_(0)


def accumulate():  # what autograd adds on the accumulate path: .grad += new gradient
    reused.add_(next(cycle)[0].view(-1))


fns = {f.__name__: f for f in (backward_views, backward_views_cat, backward_packed, fresh_fill,
                               reused_fill, accumulate)}
times = {name: [] for name in fns}
for _ in range(5):
    for name, fn in fns.items():
        timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        times[name].append(timer.blocked_autorange(min_run_time=0.4).median * 1e3)
print(f"(B, C, P, N) = {(B, C, P, N)}, fp32, {torch.get_num_threads()} threads; "
      f"one qkv-sized tensor: {numel * 4 / 1e6:.1f} MB")
for name, ms in times.items():
    print(f"{name:20s} median {statistics.median(ms):7.2f} ms   rounds {[round(x, 2) for x in ms]}")
