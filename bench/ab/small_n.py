"""Where the separable forward's time goes at small N (MobileViTv2's last stage: C = 256, N = 16)
beside a tiny shape and the first stage: the public function, the packed one, the raw op (with
and without its autograd layer) and ``torch.compile(reference)``, with the copy floor
(docs/performance.md, "Speed round 2"). Run alone on an idle machine:

    python bench/ab/small_n.py [fp32|bf16]

Five interleaved rounds of ``torch.utils.benchmark`` medians; the median of the rounds is printed.
"""

import itertools
import statistics
import sys

import torch
from torch.utils.benchmark import Timer

import mvit2_kernels
from mvit2_kernels.reference import separable_attention_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
dtype = DTYPES[sys.argv[1] if len(sys.argv) > 1 else "fp32"]
compiled = torch.compile(separable_attention_reference, dynamic=False)
for B, C, P, N in [(1, 1, 1, 1), (32, 256, 4, 16), (32, 128, 4, 256)]:
    sets = []
    for _ in range(8 if B > 1 else 1):
        qkv = torch.randn(B, 1 + 2 * C, P, N, dtype=dtype)
        sets.append((qkv, *qkv.split([1, C, C], 1)))
    cycle = itertools.cycle(sets)
    half = (1 + 3 * C) * B * P * N // 2  # the op's elements to read and write, as one copy
    copies = itertools.cycle([(torch.empty(half, dtype=dtype), torch.randn(half, dtype=dtype))
                              for _ in range(len(sets))])

    def copy(copies=copies):
        dst, src = next(copies)
        dst.copy_(src)

    def public(cycle=cycle):
        return mvit2_kernels.separable_attention(*next(cycle)[1:], backend="cpu")

    def packed(cycle=cycle):
        return mvit2_kernels.separable_attention_qkv(next(cycle)[0], backend="cpu")

    def raw_op(cycle=cycle):
        return torch.ops.mvit2.separable_attention_forward(*next(cycle)[1:])

    def raw_op_below_autograd(cycle=cycle):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.mvit2.separable_attention_forward(*next(cycle)[1:])

    def compile_(cycle=cycle):
        return compiled(*next(cycle)[1:])

    fns = {f.__name__: f for f in (copy, compile_, public, packed, raw_op, raw_op_below_autograd)}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn(), fn()
    for _ in range(5):
        for name, fn in fns.items():
            timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            times[name].append(timer.blocked_autorange(min_run_time=0.3).median * 1e6)
    print((B, C, P, N), str(dtype).removeprefix("torch."),
          "  ".join(f"{k} {statistics.median(v):.1f} us" for k, v in times.items()), flush=True)
