"""The separable forward into a fresh output, into a reused one (``out=``) and
``torch.compile(reference)``, at MobileViTv2-1.0's first stage and MobileViTv2-2.0's first stage
at 512 px, B=32 (docs/performance.md, "Large outputs"). Run alone on an idle machine, with and
without ``THP_MEM_ALLOC_ENABLE=1``:

    python bench/ab/forward_out.py

Three interleaved rounds of ``torch.utils.benchmark`` medians; the median of the rounds is printed.
"""

import itertools
import statistics

import torch
from torch.utils.benchmark import Timer

import mvit2_kernels
from mvit2_kernels.reference import separable_attention_reference

for B, C, P, N in [(32, 128, 4, 256), (32, 256, 4, 1024)]:
    for dtype in (torch.float32, torch.bfloat16):
        sets = []
        for _ in range(2 if C == 256 else 4):  # enough to outgrow the last-level cache
            qkv = torch.randn(B, 1 + 2 * C, P, N, dtype=dtype)
            sets.append(qkv.split([1, C, C], 1))
        cycle = itertools.cycle(sets)
        out = torch.empty(B, C, P, N, dtype=dtype)
        compiled = torch.compile(separable_attention_reference, dynamic=False)

        def fresh(cycle=cycle):
            return mvit2_kernels.separable_attention(*next(cycle), backend="cpu")

        def reused(cycle=cycle, out=out):
            return mvit2_kernels.separable_attention(*next(cycle), backend="cpu", out=out)

        def compile_(cycle=cycle, compiled=compiled):
            return compiled(*next(cycle))

        fns = {"fresh y": fresh, "out=": reused, "compile": compile_}
        times = {name: [] for name in fns}
        with torch.no_grad():
            for fn in fns.values():
                fn(), fn()
            for _ in range(3):
                for name, fn in fns.items():
                    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                    times[name].append(timer.blocked_autorange(min_run_time=0.5).median * 1e3)
        print((B, C, P, N), str(dtype).removeprefix("torch."), f"y {out.nbytes / 1e6:.0f} MB",
              "  ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in times.items()),
              flush=True)
