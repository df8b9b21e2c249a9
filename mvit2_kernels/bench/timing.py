"""Timing with the established tools: ``torch.utils.benchmark.Timer`` on a CPU,
``triton.testing.do_bench`` on a GPU, both giving a ``torch.utils.benchmark.Measurement``.

What is ours is the input rotation: a measured callable cycles through input sets whose total
outgrows the last-level cache, so that a memory-bound kernel is not flattered by inputs left hot
by its previous call.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.benchmark import Measurement, Timer
from torch.utils.benchmark.utils.common import TaskSpec


class Budget(NamedTuple):
    """How long to warm up and time one callable (``--quick``: :data:`QUICK`)."""

    warmup_s: float = 0.2
    min_run_time_s: float = 0.5
    min_repeats: int = 7  # least number of samples, even for a slow call


QUICK = Budget(0.02, 0.05, 3)


class Kind(NamedTuple):
    """What the runner (``cli._run``) needs of a kind of benchmark: a group (shape, dtype, pass;
    a model case) is timed as its ``jobs``, each by the ``build(impl, path)`` that ``prepare``
    returns, and gives rows of its ``fields``, the ``ratios`` and what ``finish`` adds."""

    fields: Callable[[Any], dict]
    prepare: Callable[..., Callable]  # (group, device, budget, **options) -> build
    ratios: dict[str, str]  # name -> baseline impl
    jobs: Callable[[Any, list[str]], list[tuple]] = lambda _, impls: [(i, None) for i in impls]
    finish: Callable[[Any, list[dict], dict], None] = lambda *_: None  # (group, rows, timed)


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


def _do_bench(device: str) -> Callable | None:
    with contextlib.suppress(ImportError):  # no Triton: the Timer
        if device == "cuda":
            from triton.testing import do_bench

            return do_bench
    return None


def timer_name(device: str) -> str:
    """The tool :func:`measure` times with on ``device`` (recorded in the JSON settings)."""
    return ("triton.testing.do_bench" if _do_bench(device)
            else "torch.utils.benchmark.Timer.blocked_autorange")


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
    threads, do_bench = torch.get_num_threads(), _do_bench(device)
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
