"""Medians of many timed calls, with the established tools: ``torch.utils.benchmark`` on a CPU,
``triton.testing.do_bench`` (CUDA events when Triton is missing) on a GPU.

Callers rotate several input sets through one callable (:func:`rotating`) so that the rotated
working set outgrows the last-level cache and a kernel is not flattered by inputs left hot by the
previous call.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Budget", "Timing", "measure", "rotating", "rotation_count", "timer_name"]


@dataclass(frozen=True)
class Budget:
    """How long to warm up and measure one callable."""

    warmup_s: float  # CPU: warm-up time before timing; GPU: do_bench's ``warmup`` (in seconds)
    min_run_time_s: float  # least total time spent timing
    min_repeats: int  # least number of timed blocks (CPU) / calls (GPU), even for slow calls

    @classmethod
    def of(cls, quick: bool) -> Budget:
        return cls(0.02, 0.05, 3) if quick else cls(0.2, 0.5, 7)


@dataclass(frozen=True)
class Timing:
    """A measurement: the median and interquartile range of one call, in milliseconds."""

    median_ms: float
    iqr_ms: float
    repeats: int  # how many timed samples the median is taken over


def rotation_count(
    set_bytes: int, cache_bytes: int, *, budget_bytes: int = 1 << 30, max_sets: int = 512
) -> int:
    """How many input sets of ``set_bytes`` to cycle so that together they are at least twice the
    last-level cache, bounded by ``budget_bytes`` of memory and ``max_sets`` (at least one)."""
    per_set = max(set_bytes, 1)
    wanted = math.ceil(2 * cache_bytes / per_set)
    return max(1, min(wanted, budget_bytes // per_set, max_sets))


def rotating(fn: Callable[..., Any], sets: Sequence[tuple]) -> Callable[[], Any]:
    """A no-argument callable that calls ``fn(*sets[i])`` with the next set at every call."""
    cycle = itertools.cycle(sets)
    return lambda: fn(*next(cycle))


def measure(fn: Callable[[], Any], device: str, budget: Budget) -> Timing:
    """Warm ``fn`` up, then time it; ``fn`` must finish its work on ``device`` before returning
    on a CPU (it may return with kernels in flight on a GPU)."""
    if device == "cuda":
        return _measure_cuda(fn, budget)
    return _measure_cpu(fn, budget)


def timer_name(device: str) -> str:
    """The tool :func:`measure` times with on ``device`` (recorded in the JSON settings)."""
    if device != "cuda":
        return "torch.utils.benchmark.Timer.blocked_autorange"
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        return "torch.cuda.Event"
    return "triton.testing.do_bench"


def _measure_cpu(fn: Callable[[], Any], budget: Budget) -> Timing:
    from torch.utils.benchmark import Timer

    start = time.perf_counter()
    calls = 0
    while calls < 2 or time.perf_counter() - start < budget.warmup_s:
        last = time.perf_counter()
        fn()
        calls += 1
    per_call = time.perf_counter() - last
    # The Timer defaults to one thread; time with the threads the user's code would get.
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    # blocked_autorange sizes blocks to >= 10 ms; a slow call still gets min_repeats blocks.
    run_time = max(budget.min_run_time_s, budget.min_repeats * per_call * 1.05)
    m = timer.blocked_autorange(min_run_time=run_time)
    return Timing(m.median * 1e3, m.iqr * 1e3, len(m.times))


def _measure_cuda(fn: Callable[[], Any], budget: Budget) -> Timing:
    # Estimate first: do_bench takes times in ms and fits its repetitions to its own estimate,
    # which would leave a slow kernel with one sample.
    fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    per_call_ms = max(begin.elapsed_time(end) / 3, 1e-3)
    warmup_ms = max(budget.warmup_s * 1e3, per_call_ms)
    rep_ms = max(budget.min_run_time_s * 1e3, budget.min_repeats * per_call_ms * 1.05)
    try:
        from triton.testing import do_bench
    except ImportError:
        times = _cuda_events(
            fn, math.ceil(warmup_ms / per_call_ms), math.ceil(rep_ms / per_call_ms)
        )
    else:
        # do_bench clears the L2 cache before every call and brackets each call with events.
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return Timing(statistics.median(times), q3 - q1, len(times))


def _cuda_events(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    pairs = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeats)
    ]
    for begin, end in pairs:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in pairs]
