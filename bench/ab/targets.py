"""Issue 17's targets, read from an ``mvit2-bench`` result file (docs/performance.md,
"Speed round 2"):

    python bench/ab/targets.py bench/results/cpu.json

Per op, dtype, pass and gradient path, for each fused impl: the median and the worst ratio to
``torch.compile`` over the shapes and the shapes below the target (forward >= 1x compile,
forward+backward >= 1.5x); the forward's multiple of the copy floor at the large MobileViTv2
shapes (B > 1, N >= 256: target <= 1.3x); the packed forward+backward at (32, 128, 4, 256) fp32
(target >= 8x compile, <= 3x the floor). As a gauge of the machine's noise, the forward of
``cpu`` and ``cpu-qkv`` (the same kernel) are compared shape by shape.
"""

import json
import statistics
import sys
from pathlib import Path

rows = json.loads(Path(sys.argv[1]).read_text())["rows"]
fused = [r for r in rows if r["impl"] not in ("copy", "eager", "compile")]

print("| op | dtype | pass | grads | impl | x compile: median (worst) | target | shapes met "
      "| below target |")
print("|---|---|---|---|---|---|---|---|---|")
groups: dict[tuple, list[dict]] = {}
for r in fused:
    key = (r["op"], r["dtype"], r["pass"], r.get("grads") or "-", r["impl"])
    groups.setdefault(key, []).append(r)
for (op, dtype, pass_, grads, impl), rs in groups.items():
    target = 1.0 if pass_ == "forward" else 1.5
    ratios = [(r["speedup_vs_compile"], r["shape"]) for r in rs if r["speedup_vs_compile"]]
    below = sorted(x for x in ratios if x[0] < target)
    shown = ", ".join(f"{s} {v:.2f}" for v, s in below[:6]) + (" ..." if len(below) > 6 else "")
    print(f"| {op} | {dtype} | {pass_} | {grads} | {impl} | "
          f"{statistics.median(v for v, _ in ratios):.2f} ({min(ratios)[0]:.2f}) | >= {target} | "
          f"{len(ratios) - len(below)} of {len(ratios)} | {shown} |")

print("\nForward, multiple of the copy floor at the large MobileViTv2 shapes (target <= 1.3):")
for r in fused:
    if r["op"] == "separable" and r["pass"] == "forward" and r["batch"] > 1 and r["patches"] >= 256:
        print(f"  {r['shape']:22s} {r['dtype']} {r['impl']:8s} {r['median_ms']:8.2f} ms  "
              f"floor {r['floor_ms']:8.2f} ms  {r['median_ms'] / r['floor_ms']:.2f}x floor")

print("\nforward+backward at w1.0-256px-L3-B32 fp32 (packed target: >= 8x compile, <= 3x floor):")
for r in fused:
    if (r["shape"], r["dtype"], r["pass"]) == ("w1.0-256px-L3-B32", "fp32", "forward+backward"):
        floors = r["median_ms"] / r["floor_ms"]
        grads = r.get("grads") or "-"
        print(f"  {r['impl']:8s} {grads:12s} {r['median_ms']:7.2f} ms  "
              f"{r['speedup_vs_compile']:.2f}x compile  {floors:.2f}x floor")

same = {}
for r in fused:
    if r["op"] == "separable" and r["pass"] == "forward":
        same.setdefault((r["shape"], r["dtype"]), {})[r["impl"]] = r["median_ms"]
spread = sorted(max(t.values()) / min(t.values()) for t in same.values() if len(t) == 2)
if spread:
    print(f"\nnoise gauge: the same forward kernel timed twice (cpu, cpu-qkv) differs by a "
          f"median {statistics.median(spread):.2f}x, at worst {spread[-1]:.2f}x, over "
          f"{len(spread)} shapes")
