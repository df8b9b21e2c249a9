"""Results as files: the JSON document (schema in docs/performance.md) and the Markdown tables
generated from such documents for docs/performance.md."""

from __future__ import annotations

import datetime
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .table import CHANNELS_TITLE, PASS_SHORT, fmt

__all__ = ["SCHEMA_VERSION", "document", "load", "markdown", "update_section", "write_json"]

# Bump on any change that renames, retypes or removes a field; adding a field keeps the version.
SCHEMA_VERSION = 1
KINDS = ("ops", "layer", "model")
# The baselines of a layer table, given first; every other impl gets its speed-ups beside it.
LAYER_BASELINES = ("eager", "compile")
# Rows written before the additive op was timed have no "op": they are all separable.
DEFAULT_OP = "separable"
OP_HEADINGS = {
    "separable": "Separable attention (MobileViTv2)",
    "additive": "Additive attention (SwiftFormer)",
}
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"


def document(
    kind: str,
    argv: Sequence[str],
    environment: dict,
    settings: dict,
    rows: list[dict],
    skipped: list[dict],
) -> dict[str, Any]:
    """The top-level JSON object of one run."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["mvit2-bench", *argv]),
        "environment": environment,
        "settings": settings,
        "rows": rows,
        "skipped": skipped,
    }


def write_json(path: str | os.PathLike, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load(path: str | os.PathLike) -> dict:
    """A result document; ``ValueError`` if it is not one of this schema version."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not an mvit2-bench result of schema_version {SCHEMA_VERSION}")
    if doc.get("kind") not in KINDS:
        raise ValueError(f"{path}: kind must be one of {KINDS}, got {doc.get('kind')!r}")
    doc["_path"] = str(path)
    return doc


def markdown(docs: list[dict], relative_to: str | os.PathLike = ".") -> str:
    """Markdown sections for result documents: a heading naming the machine, then the tables;
    plots saved beside a JSON file (same name, ``.png``) are linked relative to ``relative_to``."""
    parts = []
    order = {kind: i for i, kind in enumerate(KINDS)}  # kernels, then the layer, then models
    for doc in sorted(
        docs, key=lambda d: (order[d["kind"]], d["environment"]["device"], d["created"])
    ):
        parts.append(_heading(doc))
        png = Path(doc["_path"]).with_suffix(".png")
        if png.exists():
            parts.append(f"![{png.stem}]({Path(os.path.relpath(png, relative_to)).as_posix()})\n")
        tables = {"ops": _op_tables, "layer": _layer_tables, "model": _model_table}
        parts.append(tables[doc["kind"]](doc))
    return "\n".join(parts)


def update_section(doc_path: str | os.PathLike, text: str) -> None:
    """Replace what lies between the results markers of ``doc_path`` with ``text``."""
    path = Path(doc_path)
    content = path.read_text()
    if BEGIN not in content or END not in content:
        raise ValueError(f"{path} lacks the markers {BEGIN} and {END} around its results section")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text.strip()}\n{END}{tail}")


def _heading(doc: dict) -> str:
    env = doc["environment"]
    what = {"ops": "Kernels", "layer": "Attention layer", "model": "Models"}[doc["kind"]]
    where = (
        f"{env['device_name']}, {env['threads']} threads"
        if env["device"] == "cpu"
        else f"{env['device_name']} (CPU: {env['cpu_name']})"
    )
    versions = (
        f"torch {env['torch']}, triton {env['triton'] or '-'}, "
        f"mvit2-kernels {env['mvit2_kernels']} ({(env.get('git_commit') or '-')[:10]})"
    )
    return f"### {what}: {where}\n\n{versions}; {doc['created']}. Command: `{doc['command']}`\n"


def _md_table(header: list[str], lines: list[list[str]], text_columns: int) -> str:
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    rows = [header, align, *lines]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def _op_tables(doc: dict) -> str:
    """Per op, a heading and then its tables."""
    by_op: dict[str, list[dict]] = {}
    for r in doc["rows"]:
        by_op.setdefault(r.get("op", DEFAULT_OP), []).append(r)
    out = []
    for op, rows in by_op.items():
        out.append(f"#### {OP_HEADINGS.get(op, op)}\n\n" + _tables_of_op(rows, op))
    return "\n".join(out)


def _by_dtype_and_pass(rows: list[dict]):
    """``(dtype, pass, {shape: {impl: row}})`` for each dtype and pass that has rows, in the
    order they first appear: one table each."""
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for pass_ in dict.fromkeys(r["pass"] for r in rows):
            by_shape: dict[str, dict[str, dict]] = {}
            for r in rows:
                if r["dtype"] == dtype and r["pass"] == pass_:
                    by_shape.setdefault(r["shape"], {})[r["impl"]] = r
            if by_shape:
                yield dtype, pass_, by_shape


def _titled_table(dtype: str, pass_: str, header: list[str], lines: list[list[str]]) -> str:
    """A table of shapes under a bold ``dtype, pass`` title; only the shape column is text."""
    title = f"**{dtype}, {PASS_SHORT.get(pass_, pass_)}**\n\n"
    return title + _md_table(header, lines, text_columns=1)


def _tables_of_op(rows: list[dict], op: str) -> str:
    """One table per dtype and pass: a line per shape, the baselines in ms, and for every kernel
    backend its time, bandwidth, fraction of the floor and speed-ups."""
    kernels = list(
        dict.fromkeys(r["impl"] for r in rows if r["impl"] not in ("copy", "eager", "compile"))
    )
    out = []
    for dtype, pass_, by_shape in _by_dtype_and_pass(rows):
        header = ["shape", CHANNELS_TITLE.get(op, "C"), "N"]
        header += ["copy floor ms", "eager ms", "compile ms"]
        for b in kernels:
            header += [f"{b} ms", f"{b} GB/s", f"{b} of floor", f"{b} ×eager", f"{b} ×compile"]
        lines = []
        for shape, impls in by_shape.items():
            any_row = next(iter(impls.values()))
            line = [
                shape,
                str(any_row["channels"]),
                str(any_row["patches"]),
                *(fmt(impls.get(i, {}).get("median_ms")) for i in ("copy", "eager", "compile")),
            ]
            for b in kernels:
                r = impls.get(b, {})
                line += [
                    fmt(r.get("median_ms")),
                    fmt(r.get("gbps"), 3),
                    fmt(r.get("floor_fraction"), 2),
                    fmt(r.get("speedup_vs_eager"), 3),
                    fmt(r.get("speedup_vs_compile"), 3),
                ]
            lines.append(line)
        out.append(_titled_table(dtype, pass_, header, lines))
    return "\n".join(out)


def _layer_tables(doc: dict) -> str:
    """One table per dtype and pass: a line per shape, the baselines in ms, and for every other
    impl its time and speed-ups over eager and over compile (the standard layer's)."""
    rows = doc["rows"]
    others = [i for i in dict.fromkeys(r["impl"] for r in rows) if i not in LAYER_BASELINES]
    out = []
    for dtype, pass_, by_shape in _by_dtype_and_pass(rows):
        header = ["shape", "D", "N", *(f"{b} ms" for b in LAYER_BASELINES)]
        for i in others:
            header += [f"{i} ms", f"{i} ×eager", f"{i} ×compile"]
        lines = []
        for shape, impls in by_shape.items():
            any_row = next(iter(impls.values()))
            line = [shape, str(any_row["channels"]), str(any_row["patches"])]
            line += [fmt(impls.get(b, {}).get("median_ms")) for b in LAYER_BASELINES]
            for i in others:
                r = impls.get(i, {})
                line += [
                    fmt(r.get("median_ms")),
                    fmt(r.get("speedup_vs_eager"), 3),
                    fmt(r.get("speedup_vs_compile"), 3),
                ]
            lines.append(line)
        out.append(_titled_table(dtype, pass_, header, lines))
    return "\n".join(out)


def _model_table(doc: dict) -> str:
    header = [
        "model",
        "mode",
        "dtype",
        "impl",
        "res",
        "B",
        "ms",
        "images/s",
        "attention ms",
        "attention share",
    ]
    lines = [
        [
            r["model"],
            r["mode"],
            r["dtype"],
            r["impl"],
            str(r["resolution"]),
            str(r["batch"]),
            fmt(r["median_ms"]),
            fmt(r["images_per_s"], 3),
            fmt(r["attention_ms"]),
            "-" if r["attention_share"] is None else f"{100 * r['attention_share']:.0f}%",
        ]
        for r in doc["rows"]
    ]
    return _md_table(header, lines, text_columns=4)
