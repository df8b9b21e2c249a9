"""The kernel benchmark: for each shape, dtype and pass, time the copy floor, the two baselines
and every kernel backend back to back, and derive GB/s, fraction of the floor and speed-ups."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import cases
from .shapes import Shape
from .timing import Budget, measure, rotating, rotation_count

__all__ = ["Group", "OpRow", "Skip", "iter_groups", "plan", "run_group"]


@dataclass(frozen=True)
class Group:
    """Measurements that share inputs and are compared with each other."""

    shape: Shape
    dtype: str
    pass_: str


@dataclass
class OpRow:
    """One row of the table and of ``rows`` in the JSON (schema in docs/performance.md)."""

    op: str
    shape: str
    batch: int
    channels: int
    pixels: int
    patches: int
    dtype: str
    pass_: str
    impl: str
    median_ms: float
    iqr_ms: float
    repeats: int
    rotated_sets: int
    bytes: int
    gbps: float
    floor_ms: float | None = None
    floor_fraction: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None

    def to_json(self) -> dict:
        return {("pass" if k == "pass_" else k): v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Skip:
    """An implementation that could not be timed for a group, and why."""

    op: str
    shape: str
    dtype: str
    pass_: str
    impl: str
    reason: str

    def to_json(self) -> dict:
        return {
            "op": self.op,
            "shape": self.shape,
            "dtype": self.dtype,
            "pass": self.pass_,
            "impl": self.impl,
            "reason": self.reason,
        }


def plan(shapes: list[Shape], dtypes: list[str], passes: list[str]) -> list[Group]:
    """Groups in the order they run: shape, then dtype, then pass."""
    return [Group(s, d, p) for s in shapes for d in dtypes for p in passes]


def run_group(
    group: Group,
    impls: list[str],
    device: str,
    budget: Budget,
    tick: Callable[[str], None] = lambda impl: None,
) -> tuple[list[OpRow], list[Skip]]:
    """Time ``impls`` (``copy`` first, then baselines, then kernels) on one group's inputs;
    ``tick(impl)`` is called after each, timed or skipped."""
    dtype = cases.DTYPES[group.dtype]
    nbytes = cases.op_bytes(group.shape, dtype, group.pass_)
    cache = _cache_bytes(device)
    timings, skips = {}, []
    n_sets = rotation_count(cases.set_bytes(group.shape, dtype, group.pass_), cache)
    sets = cases.input_sets(group.shape, dtype, device, group.pass_, n_sets)
    for impl in impls:
        if impl == "copy":
            count = rotation_count(nbytes, cache)
            impl_sets = cases.copy_sets(nbytes, dtype, device, count)
        else:
            count, impl_sets = n_sets, sets
        try:
            fn = rotating(cases.impl_callable(impl, group.pass_, group.shape.op), impl_sets)
            timings[impl] = (measure(fn, device, budget), count)
            del fn
        except Exception as e:  # a broken or missing backend is reported, not fatal to the run
            skips.append(
                Skip(
                    group.shape.op,
                    group.shape.name,
                    group.dtype,
                    group.pass_,
                    impl,
                    f"{type(e).__name__}: {e}".splitlines()[0][:300],
                )
            )
        del impl_sets
        gc.collect()  # the copy buffers and autograd graphs of this impl go before the next
        tick(impl)
    return _rows(group, nbytes, timings), skips


def _cache_bytes(device: str) -> int:
    from .environment import last_level_cache_bytes

    return last_level_cache_bytes(device)


def _rows(group: Group, nbytes: int, timings: dict) -> list[OpRow]:
    def ms(impl: str) -> float | None:
        return timings[impl][0].median_ms if impl in timings else None

    floor, eager, compiled = ms("copy"), ms("eager"), ms("compile")
    rows = []
    for impl, (t, count) in timings.items():
        s = group.shape
        rows.append(
            OpRow(
                op=s.op,
                shape=s.name,
                batch=s.batch,
                channels=s.channels,
                pixels=s.pixels,
                patches=s.patches,
                dtype=group.dtype,
                pass_=group.pass_,
                impl=impl,
                median_ms=t.median_ms,
                iqr_ms=t.iqr_ms,
                repeats=t.repeats,
                rotated_sets=count,
                bytes=nbytes,
                gbps=nbytes / (t.median_ms * 1e-3) / 1e9,
                floor_ms=floor,
                floor_fraction=_ratio(floor, t.median_ms),
                speedup_vs_eager=_ratio(eager, t.median_ms),
                speedup_vs_compile=_ratio(compiled, t.median_ms),
            )
        )
    return rows


def _ratio(numerator: float | None, denominator: float) -> float | None:
    return None if numerator is None or denominator <= 0 else numerator / denominator


def iter_groups(
    groups: list[Group], impls: list[str], device: str, budget: Budget, tick: Callable[[str], None]
) -> Iterator[tuple[list[OpRow], list[Skip]]]:
    """Run the groups one after another, seeded, yielding each group's rows as they arrive."""
    torch.manual_seed(0)
    for group in groups:
        yield run_group(group, impls, device, budget, tick)
