"""Non-temporal (streaming) stores against plain ones for the separable forward and the packed
backward, by output size: MVIT2_STREAM_MIB sets the size from which the CPU kernels stream
(docs/performance.md, "Streaming stores"). Run alone on an idle machine:

    python bench/ab/streaming.py            # the driver: interleaved rounds of every setting
    python bench/ab/streaming.py --child    # one process's medians (read by the driver)

The threshold is read once per process, so every setting runs in its own process; five rounds
alternate the settings, and the median of the rounds' medians is printed beside compile's.
"""

import itertools
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(32, 512, 4, 16), (32, 384, 4, 64), (32, 128, 4, 256), (32, 256, 4, 256),
          (32, 384, 4, 256)]
SETTINGS = {"stream >= 8 MiB": "8", "stream >= 32 MiB": "32", "never stream": "1000000"}


def child() -> None:
    import torch
    from torch.utils.benchmark import Timer

    import mvit2_kernels
    from mvit2_kernels.reference import separable_attention_reference

    times = {}
    for B, C, P, N in SHAPES:
        sets = []
        for _ in range(3):  # rotated, so that the inputs are not all in cache
            qkv = torch.randn(B, 1 + 2 * C, P, N, requires_grad=True)
            y = mvit2_kernels.separable_attention_qkv(qkv, backend="cpu")
            sets.append((qkv, *qkv.detach().split([1, C, C], 1), y, torch.randn_like(y)))
        cycle = itertools.cycle(sets)
        compiled = torch.compile(separable_attention_reference, dynamic=False)

        def forward(cycle=cycle):
            return mvit2_kernels.separable_attention(*next(cycle)[1:4], backend="cpu")

        def packed_backward(cycle=cycle):
            qkv, _, _, _, y, g = next(cycle)
            return torch.autograd.grad(y, qkv, g, retain_graph=True)

        def compile_forward(cycle=cycle, compiled=compiled):
            return compiled(*next(cycle)[1:4])

        fns = {"forward": forward, "packed backward": packed_backward}
        if os.environ.get("WITH_COMPILE") == "1":
            fns["compile forward"] = compile_forward
        for name, fn in fns.items():
            fn(), fn()
            timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            times[f"{(B, C, P, N)} {name}"] = timer.blocked_autorange(min_run_time=0.4).median * 1e3
    print(json.dumps(times))


def driver() -> None:
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(5):
        for label, mib in SETTINGS.items():
            env = dict(os.environ, MVIT2_STREAM_MIB=mib,
                       WITH_COMPILE="1" if label == "never stream" else "0")
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            for key, ms in json.loads(out.splitlines()[-1]).items():
                results.setdefault(key, {}).setdefault(label, []).append(ms)
        print(f"round {r + 1} of 5 done", file=sys.stderr, flush=True)
    for key, by_label in results.items():
        print(f"{key:40s}", "  ".join(f"{label} {statistics.median(v):6.2f} ms"
                                      for label, v in by_label.items()))


if __name__ == "__main__":
    child() if "--child" in sys.argv else driver()
