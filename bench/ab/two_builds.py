"""The separable forward of two builds of the package side by side (docs/performance.md,
"Short rows"): each round runs one process per build, alternating, and the median of the rounds'
medians is printed, with ``torch.compile(reference)`` timed in every process as the yardstick.
Run alone on an idle machine, with a second checkout built in place
(``git worktree add /tmp/old <commit>``, then ``python setup.py build_ext --inplace`` there):

    python bench/ab/two_builds.py /tmp/old .
"""

import itertools
import json
import os
import statistics
import subprocess
import sys

SHAPES = [(32, 256, 4, 16), (32, 512, 4, 16), (1, 256, 4, 16), (32, 384, 4, 64), (32, 128, 4, 256)]
ROUNDS = int(os.environ.get("ROUNDS", "5"))


def child() -> None:
    import torch
    from torch.utils.benchmark import Timer

    import mvit2_kernels  # noqa: F401  (registers torch.ops.mvit2)
    from mvit2_kernels.reference import separable_attention_reference

    times = {}
    for (B, C, P, N), dtype in itertools.product(SHAPES, (torch.float32, torch.bfloat16)):
        sets = [torch.randn(B, 1 + 2 * C, P, N, dtype=dtype).split([1, C, C], 1)
                for _ in range(8 if B > 1 else 1)]
        cycle = itertools.cycle(sets)
        compiled = torch.compile(separable_attention_reference, dynamic=False)
        fns = {"op": lambda c=cycle: torch.ops.mvit2.separable_attention_forward(*next(c)),
               "compile": lambda c=cycle, f=compiled: f(*next(c))}
        for name, fn in fns.items():
            fn(), fn()
            timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            key = f"{(B, C, P, N)} {str(dtype).removeprefix('torch.')} {name}"
            times[key] = timer.blocked_autorange(min_run_time=0.3).median * 1e6
    print(json.dumps(times))


def driver(roots: list[str]) -> None:
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(ROUNDS):
        for root in roots:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                                 check=True, capture_output=True, text=True, cwd="/").stdout
            for key, us in json.loads(out.splitlines()[-1]).items():
                results.setdefault(key, {}).setdefault(root, []).append(us)
        print(f"round {r + 1} of {ROUNDS} done", file=sys.stderr, flush=True)
    for key, by_root in results.items():
        print(f"{key:32s}", "  ".join(f"{root} {statistics.median(v):8.1f} us"
                                      for root, v in by_root.items()))


if __name__ == "__main__":
    child() if sys.argv[1:] == ["--child"] else driver(sys.argv[1:])
