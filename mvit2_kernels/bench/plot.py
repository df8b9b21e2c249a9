"""PNG charts of a run (matplotlib, without pyplot's global state so no display is needed)."""

from __future__ import annotations

import os

from .report import DEFAULT_OP

__all__ = ["plot"]

BASELINES = ("eager", "compile")


def plot(doc: dict, path: str | os.PathLike) -> None:
    """Write the chart of one result document (see :func:`mvit2_kernels.bench.report.document`):
    for kernels, the fraction of the copy floor per shape; for models, images per second."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    env = doc["environment"]
    title = (
        f"mvit2-bench {doc['kind']}: {env['device_name']} ({env['device']}), torch {env['torch']}"
    )
    if doc["kind"] == "ops":
        fig = _ops_figure(Figure, doc["rows"])
    else:
        fig = _model_figure(Figure, doc["rows"])
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _ops_figure(Figure, rows: list[dict]):
    """A panel per op, pass and dtype: the fraction of the copy floor of each impl per shape."""
    op_of = {r["shape"]: r.get("op", DEFAULT_OP) for r in rows}  # old files: separable only
    ops = list(dict.fromkeys(op_of.values())) or ["-"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows)) or ["-"]
    passes = list(dict.fromkeys(r["pass"] for r in rows)) or ["-"]
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "copy"]
    most = max((sum(1 for o in op_of.values() if o == op) for op in ops), default=1)
    width = max(8.0, 0.45 * most * len(dtypes) + 3)
    panels = [(op, pass_) for op in ops for pass_ in passes]
    fig = Figure(figsize=(width, 4.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), len(dtypes), squeeze=False)
    bar = 0.8 / max(len(impls), 1)
    for i, (op, pass_) in enumerate(panels):
        shapes = [s for s, o in op_of.items() if o == op]
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for k, impl in enumerate(impls):
                got = {
                    r["shape"]: r["floor_fraction"]
                    for r in rows
                    if r["dtype"] == dtype and r["pass"] == pass_ and r["impl"] == impl
                }
                xs = [
                    x + (k - (len(impls) - 1) / 2) * bar for x, s in enumerate(shapes) if got.get(s)
                ]
                ax.bar(xs, [got[s] for s in shapes if got.get(s)], bar, label=impl)
            ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="copy floor")
            ax.set_yscale("log")
            ax.set_title(f"{op}, {dtype}, {pass_}")
            ax.set_ylabel("fraction of copy floor (higher is better)")
            ax.set_xticks(range(len(shapes)), shapes, rotation=60, ha="right", fontsize=7)
            ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return fig


def _model_figure(Figure, rows: list[dict]):
    cases = list(dict.fromkeys((r["model"], r["mode"], r["batch"], r["dtype"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig = Figure(figsize=(9, 1.0 + 0.5 * len(cases) * max(len(impls), 1)), layout="constrained")
    ax = fig.subplots()
    bar = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        got = {
            (r["model"], r["mode"], r["batch"], r["dtype"]): r["images_per_s"]
            for r in rows
            if r["impl"] == impl
        }
        ys = [y + k * bar for y, c in enumerate(cases) if c in got]
        ax.barh(ys, [got[c] for c in cases if c in got], bar, label=impl)
    ax.set_yticks(
        [y + (len(impls) - 1) * bar / 2 for y in range(len(cases))],
        [f"{m} {mode} B={b} {d}" for m, mode, b, d in cases],
        fontsize=8,
    )
    ax.invert_yaxis()
    ax.set_xlabel("images/s (higher is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return fig
