"""PNG charts of a run (matplotlib, without pyplot's global state so no display is needed)."""

from __future__ import annotations

import os

from .report import DEFAULT_OP

__all__ = ["plot"]

BASELINES = ("eager", "compile")


def plot(doc: dict, path: str | os.PathLike) -> None:
    """Write the chart of one result document (see :func:`mvit2_kernels.bench.report.document`):
    for kernels, the fraction of the copy floor per shape; for the layer, the speed-up over the
    compiled standard layer per shape; for models, images per second."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    env = doc["environment"]
    title = (
        f"mvit2-bench {doc['kind']}: {env['device_name']} ({env['device']}), torch {env['torch']}"
    )
    figures = {"ops": _ops_figure, "layer": _layer_figure, "model": _model_figure}
    fig = figures[doc["kind"]](Figure, doc["rows"])
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def _panel(ax, rows, field: str, shapes, impls, dtype: str, pass_: str, labels) -> None:
    """Side-by-side bars of ``field`` per shape on a log scale, one colour per impl, for one
    dtype and pass (a missing or null value leaves its bar out), and a dashed line at 1.0;
    ``labels``: the title, the y axis's label and the line's."""
    bar = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        got = {
            r["shape"]: r[field]
            for r in rows
            if r["dtype"] == dtype and r["pass"] == pass_ and r["impl"] == impl
        }
        offset = (k - (len(impls) - 1) / 2) * bar
        xs = [x + offset for x, s in enumerate(shapes) if got.get(s)]
        ax.bar(xs, [got[s] for s in shapes if got.get(s)], bar, label=impl)
    title, ylabel, line = labels
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=line)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(shapes)), shapes, rotation=60, ha="right", fontsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)


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
    for i, (op, pass_) in enumerate(panels):
        shapes = [s for s, o in op_of.items() if o == op]
        for j, dtype in enumerate(dtypes):
            labels = (
                f"{op}, {dtype}, {pass_}",
                "fraction of copy floor (higher is better)",
                "copy floor",
            )
            _panel(axes[i][j], rows, "floor_fraction", shapes, impls, dtype, pass_, labels)
    axes[0][0].legend(fontsize=8)
    return fig


def _layer_figure(Figure, rows: list[dict]):
    """A panel per pass and dtype: each impl's speed-up over ``compile`` per shape."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows)) or ["-"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows)) or ["-"]
    passes = list(dict.fromkeys(r["pass"] for r in rows)) or ["-"]
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "compile"]
    width = max(8.0, 0.6 * len(shapes) * len(dtypes) + 3)
    fig = Figure(figsize=(width, 4.2 * len(passes)), layout="constrained")
    axes = fig.subplots(len(passes), len(dtypes), squeeze=False)
    for i, pass_ in enumerate(passes):
        for j, dtype in enumerate(dtypes):
            labels = (
                f"attention layer, {dtype}, {pass_}",
                "× torch.compile of the standard layer (higher is better)",
                "compile",
            )
            _panel(axes[i][j], rows, "speedup_vs_compile", shapes, impls, dtype, pass_, labels)
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
