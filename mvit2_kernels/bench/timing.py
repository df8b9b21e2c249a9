"""Timing with the established tools: ``torch.utils.benchmark.Timer`` on a CPU,
``triton.testing.do_bench`` on a GPU, both giving a ``torch.utils.benchmark.Measurement``.

What is ours is the input rotation: a measured callable cycles through several input sets
(:func:`rotating`) whose total outgrows the last-level cache (:func:`rotation_count`), so that a
memory-bound kernel is not flattered by inputs left hot by its previous call.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer
from torch.utils.benchmark.utils.common import TaskSpec

__all__ = ["Budget", "last_level_cache_bytes", "measure", "rotating", "rotation_count",
           "time_each", "timer_name"]


@dataclass(frozen=True)
class Budget:
    """How long to warm up and time one callable."""

    warmup_s: float
    min_run_time_s: float
    min_repeats: int  # least number of samples, even for a slow call

    @classmethod
    def of(cls, quick: bool) -> Budget:
        return cls(0.02, 0.05, 3) if quick else cls(0.2, 0.5, 7)


def last_level_cache_bytes(device: str) -> int:
    """The GPU's L2, or the CPU's largest cache as sysfs reports it (32 MiB when unknown)."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    sizes = [int(t[:-1]) << {"K": 10, "M": 20, "G": 30}[t[-1]]
             for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")
             if (t := f.read_text().strip())[:-1].isdigit() and t[-1] in "KMG"]
    return max(sizes, default=32 << 20)


def rotation_count(set_bytes: int, cache_bytes: int, *, budget_bytes: int = 1 << 30,
                   max_sets: int = 512) -> int:
    """How many input sets of ``set_bytes`` to cycle so that together they are at least twice the
    last-level cache, bounded by ``budget_bytes`` of memory and ``max_sets`` (at least one)."""
    per_set = max(set_bytes, 1)
    return max(1, min(math.ceil(2 * cache_bytes / per_set), budget_bytes // per_set, max_sets))


def rotating(fn: Callable[..., Any], sets: Sequence[tuple]) -> Callable[[], Any]:
    """A no-argument callable that calls ``fn(*sets[i])`` with the next set at every call."""
    cycle = itertools.cycle(sets)
    return lambda: fn(*next(cycle))


def _do_bench() -> Callable | None:
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def timer_name(device: str) -> str:
    """The tool :func:`measure` times with on ``device`` (recorded in the JSON settings)."""
    if device == "cuda" and _do_bench() is not None:
        return "triton.testing.do_bench"
    return "torch.utils.benchmark.Timer.blocked_autorange"


def measure(fn: Callable[[], Any], device: str, budget: Budget, **metadata: Any) -> Measurement:
    """Warm ``fn`` up (compiles happen here), then time it; ``metadata`` is kept on the
    measurement, with ``peak_mib``: on a GPU the memory one call allocates beyond what existed
    before it (Liger-Kernel's memory figure), on a CPU ``None``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < budget.warmup_s:
        last = time.perf_counter()
        fn()
        sync()
        calls += 1
    # A slow call still gets min_repeats samples (blocks on a CPU, calls on a GPU).
    run_time = max(budget.min_run_time_s, budget.min_repeats * (time.perf_counter() - last) * 1.05)
    threads, do_bench = torch.get_num_threads(), _do_bench() if device == "cuda" else None
    if do_bench is not None:  # do_bench also flushes the L2 before every call
        times = do_bench(fn, warmup=1, rep=run_time * 1e3, return_mode="all")
        m = Measurement(1, [t * 1e-3 for t in times], TaskSpec("fn()", "pass", num_threads=threads))
    else:  # the Timer defaults to one thread: time with the threads the user's code gets
        m = Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(
            min_run_time=run_time)
    peak = None
    if device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    m.metadata = {**metadata, "peak_mib": peak}
    return m


def time_each(jobs: Sequence[tuple[Hashable, Callable[[], tuple[Callable, dict]]]], device: str,
              budget: Budget, tick: Callable[[], Any]) -> dict[Hashable, list]:
    """Per job ``(key, build)``, in order, measure the callable ``build()`` returns with its
    metadata. A job that fails (a missing backend, a failed compile, out of memory) gives its
    exception instead, reported rather than fatal. Returns ``key -> [result, ...]`` (a key may
    come back in several rounds); ``tick()`` after each job."""
    out: dict[Hashable, list] = {}
    for key, build in jobs:
        try:
            fn, metadata = build()
            got = measure(fn, device, budget, **metadata)
        except Exception as e:
            got = e
        out.setdefault(key, []).append(got)
        fn = None
        gc.collect()  # this job's buffers, graphs and saved activations go before the next
        if device == "cuda":
            torch.cuda.empty_cache()
        tick()
    return out
