"""Results: the rows of a run, the JSON document (schema in docs/performance.md), the printed
tables (``torch.utils.benchmark.Compare``) and the chart (matplotlib). Both are drawn from rows
alone, so a result file of any earlier version of schema 1 prints and plots like a fresh run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Compare, Measurement
from torch.utils.benchmark.utils.common import TaskSpec

from .. import __version__, available_backends
from .timing import last_level_cache_bytes

# Bump on any change that renames, retypes or removes a field; adding a field keeps the version.
SCHEMA_VERSION = 1
# Per kind, the derived figures printed under each table, and the one each chart shows.
DERIVED = {
    "ops": {"floor_fraction": "of floor", "gbps": "GB/s", "speedup_vs_eager": "×eager",
            "speedup_vs_compile": "×compile"},
    "layer": {"speedup_vs_eager": "×eager", "speedup_vs_compile": "×compile"},
    "model": {"images_per_s": "images/s", "attention_share": "in attention"},
}
CHARTED = {
    "ops": ("floor_fraction", "fraction of the copy floor (higher is better)", "copy"),
    "layer": ("speedup_vs_compile", "× torch.compile of the standard layer", "compile"),
    "model": ("images_per_s", "images/s (higher is better)", None),
}
BASELINES = ("copy", "eager", "compile")  # given no derived line


def summarize(fields: dict, timed: dict[tuple, list[Measurement]], ratios: dict) -> list[dict]:
    """One row per ``(impl, gradient path)`` from its rounds' measurements (docs/performance.md):
    the metadata of the last round; per ``ratios`` entry ``name: baseline`` the baseline's median
    on the same path over this one (``None`` when the baseline did not run)."""
    medians = {key: statistics.median(m.median for m in ms) * 1e3 for key, ms in timed.items()}
    rows = []
    for (impl, path), ms in timed.items():
        rows.append({**fields, "impl": impl, "median_ms": medians[impl, path],
                     "iqr_ms": statistics.median(m.iqr for m in ms) * 1e3,
                     "repeats": sum(len(m.times) for m in ms),
                     "round_ms": [m.median * 1e3 for m in ms], **ms[-1].metadata})
        rows[-1].update({name: medians[base, path] / medians[impl, path]
                         if (base, path) in medians else None for name, base in ratios.items()})
    return rows


def labels(kind: str, row: dict) -> tuple[str, str]:
    """A row's table (Compare's label) and line (its sub_label); the impl is the column."""
    if kind == "model":
        return (f"{row['model']} at {row['resolution']}px, {row['dtype']}",
                f"{row['mode']}, B={row['batch']}")
    what = "attention layer" if kind == "layer" else f"{row['op']} attention"
    grads = f" ({row['grads']})" if row.get("grads") else ""
    return f"{what}, {row['dtype']}, {row['pass']}", row["shape"] + grads


def render(rows: list[dict], kind: str, threads: int) -> str:
    """Per table, the Compare of its rows' medians, then the derived figures of its other rows."""
    tables: dict[str, list[dict]] = {}
    for r in rows:
        tables.setdefault(labels(kind, r)[0], []).append(r)
    lines = []
    for table, got in tables.items():
        compare = Compare([
            Measurement(1, [r["median_ms"] * 1e-3], TaskSpec(
                "fn()", "pass", label=table, sub_label=labels(kind, r)[1],
                description=r["impl"], num_threads=threads))
            for r in got
        ])
        compare.trim_significant_figures()
        lines.append(str(compare).rstrip())
        for r in got:
            figures = [f"{r[k]:.0%} {name}" if k == "attention_share" else f"{r[k]:.3g} {name}"
                       for k, name in DERIVED[kind].items() if r.get(k) is not None]
            if figures and (kind == "model" or r["impl"] not in BASELINES):
                lines.append(f"  {labels(kind, r)[1]}  {r['impl']}: {', '.join(figures)}")
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: str | os.PathLike) -> None:
    """The chart of a result document: a panel per table, a group of bars per line, a bar per
    impl, of the kind's charted figure (log scale, with a line at its baseline's 1.0)."""
    from matplotlib.figure import Figure  # no pyplot: no display or global state needed

    kind, env = doc["kind"], doc["environment"]
    field, ylabel, baseline = CHARTED[kind]
    panels: dict[str, dict[str, dict[str, float]]] = {}
    for r in doc["rows"]:
        if r.get(field) and r["impl"] != baseline:
            table, line = labels(kind, r)
            panels.setdefault(table, {}).setdefault(line, {})[r["impl"]] = r[field]
    impls = list(dict.fromkeys(i for p in panels.values() for got in p.values() for i in got))
    n, width = max(len(panels), 1), 0.8 / max(len(impls), 1)
    widest = max((len(p) for p in panels.values()), default=1)
    fig = Figure(figsize=(max(8, 0.3 * widest * len(impls) + 3), 4 * n), layout="constrained")
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, (table, lines) in zip(axes, panels.items(), strict=False):  # no rows: one empty panel
        for k, impl in enumerate(impls):
            bars = [(x + (k - (len(impls) - 1) / 2) * width, got[impl])
                    for x, got in enumerate(lines.values()) if impl in got]
            ax.bar([x for x, _ in bars], [y for _, y in bars], width, label=impl)
        if baseline:
            ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=baseline)
            ax.set_yscale("log")
        ax.set(title=table, ylabel=ylabel)
        ax.set_xticks(range(len(lines)), list(lines), rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mvit2-bench {kind}: {env['device_name']} ({env['device']}), "
                 f"{env['threads']} threads, torch {env['torch']}")
    fig.savefig(path, dpi=110)


def _version(module: str) -> str | None:
    with contextlib.suppress(Exception):  # absent or broken: recorded as missing, never fatal
        return __import__(module).__version__
    return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit when the package runs from a git working tree (editable install)."""
    root = Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if (root / ".git").exists():
            return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                  capture_output=True, text=True, timeout=10).stdout.strip() or None
    return None


def describe(device: str) -> dict[str, Any]:
    gpu = torch.cuda.get_device_properties(0) if device == "cuda" else None
    return {
        "device": device, "device_name": gpu.name if gpu else _cpu_name(),
        "cpu_name": _cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu_multiprocessors": gpu.multi_processor_count if gpu else None,
        "gpu_memory_bytes": gpu.total_memory if gpu else None,
        "last_level_cache_bytes": last_level_cache_bytes(device),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "transformers": _version("transformers"), "mvit2_kernels": __version__,
        "git_commit": _git_commit(), "backends": available_backends(),
        "python": platform.python_version(), "platform": platform.platform(),
    }


def document(kind: str, argv: Sequence[str], env: dict, settings: dict, rows: list[dict],
             skipped: list[dict]) -> dict[str, Any]:
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "created": created,
            "command": shlex.join(["mvit2-bench", *argv]), "environment": env,
            "settings": settings, "rows": rows, "skipped": skipped}


def write_json(path: str | os.PathLike, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load(path: str | os.PathLike) -> dict:
    """A result document; ``ValueError`` if it is not one of this schema version."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not an mvit2-bench result of schema_version {SCHEMA_VERSION}")
    if doc.get("kind") not in DERIVED:
        raise ValueError(f"{path}: kind must be one of {tuple(DERIVED)}, got {doc.get('kind')!r}")
    for row in doc["rows"] if doc["kind"] == "ops" else ():
        row.setdefault("op", "separable")  # rows from before the additive op was timed
    return doc
