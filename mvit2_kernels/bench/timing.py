"""Timing with the established tools: ``torch.utils.benchmark.Timer`` on a CPU,
``triton.testing.do_bench`` on a GPU, both returning a ``torch.utils.benchmark.Measurement``.

What is ours is the input rotation: a measured callable cycles through several input sets
(:func:`rotating`) whose total outgrows the last-level cache (:func:`rotation_count`), so that a
memory-bound kernel is not flattered by inputs left hot by its previous call.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable, Sequence
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
    """The cache a rotated working set must outgrow: the GPU's L2, or the CPU's largest cache as
    sysfs reports it (32 MiB when unknown)."""
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    sizes = [32 << 20]
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        if text[:-1].isdigit() and text[-1] in "KMG":
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]])
    return max(sizes) if len(sizes) == 1 else max(sizes[1:])


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


def _do_bench():
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
    measurement, with ``peak_mib`` added: on a GPU the memory one call allocates beyond what
    existed before it (Liger-Kernel's memory figure), on a CPU ``None``."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < budget.warmup_s:
        last = time.perf_counter()
        fn()
        sync()
        calls += 1
    per_call = time.perf_counter() - last
    # A slow call still gets min_repeats samples (blocks on a CPU, calls on a GPU).
    run_time = max(budget.min_run_time_s, budget.min_repeats * per_call * 1.05)
    threads = torch.get_num_threads()
    do_bench = _do_bench() if device == "cuda" else None
    if do_bench is not None:  # do_bench also flushes the L2 before every call
        times = do_bench(fn, warmup=1, rep=run_time * 1e3, return_mode="all")
        task = TaskSpec("fn()", "pass", num_threads=threads)
        m = Measurement(1, [t * 1e-3 for t in times], task)
    else:  # the Timer defaults to one thread: time with the threads the user's code gets
        timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
        m = timer.blocked_autorange(min_run_time=run_time)
    m.metadata = {**metadata, "peak_mib": _peak_mib(fn) if device == "cuda" else None}
    return m


def _peak_mib(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def time_each(
    impls: Sequence[str], build: Callable[[str], tuple[Callable[[], Any], dict]], device: str,
    budget: Budget, tick: Callable[[], Any],
) -> dict[str, Measurement | Exception]:
    """Measure, impl after impl, the callable ``build(impl)`` returns with its metadata; an impl
    that fails (a missing backend, a failed compile, out of memory) gives its exception instead,
    reported rather than fatal. ``tick()`` after each."""
    out: dict[str, Measurement | Exception] = {}
    for impl in impls:
        try:
            fn, metadata = build(impl)
            out[impl] = measure(fn, device, budget, **metadata)
        except Exception as e:
            out[impl] = e
        fn = None
        gc.collect()  # this impl's buffers, graphs and saved activations go before the next
        if device == "cuda":
            torch.cuda.empty_cache()
        tick()
    return out
