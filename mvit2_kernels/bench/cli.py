"""``mvit2-bench``: what the fused kernels buy on this machine.

    mvit2-bench [ops] [--quick] [--op ...] [--backend ...] [--dtype ...] [--shape ...]
                [--json P] [--plot P]
    mvit2-bench layer [--quick] [--shape ...] [--dtype ...] [--impl ...] [--json P] [--plot P]
    mvit2-bench model [--quick] [--width ...] [--json P] [--plot P]
    mvit2-bench report RESULT.json ... [--update docs/performance.md]

The first (the default) times the kernels of both ops (MobileViTv2's separable attention,
SwiftFormer's additive attention) against the eager reference, ``torch.compile(reference)`` and
the memory-copy floor; ``layer`` times MobileViTv2's whole attention layer (fused with and
without the keys, against the standard layer eager and compiled); ``model`` times whole models;
``report`` turns result files into Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import cases, environment, report, runner, shapes
from .progress import progress_bar
from .table import op_table, op_values
from .timing import Budget, timer_name

__all__ = ["main"]

SUBCOMMANDS = ("ops", "layer", "model", "report")
PASS_ALIASES = {
    "fwd": "forward",
    "forward": "forward",
    "fwd+bwd": "forward+backward",
    "forward+backward": "forward+backward",
    "bwd": "forward+backward",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mvit2-bench`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "ops"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    if command in ("layer", "model"):
        from . import layer_cli, model_cli

        sub = layer_cli if command == "layer" else model_cli
        parser = sub.build_parser()
        return sub.run(parser, parser.parse_args(rest), argv)
    if command == "report":
        parser = _report_parser()
        return _run_report(parser, parser.parse_args(rest))
    parser = _ops_parser()
    return _run_ops(parser, parser.parse_args(rest), argv)


def listed(values: list[str] | None, default: list[str] | None = None) -> list[str]:
    """Repeated and comma-separated values as one list (``--dtype fp32,bf16 --dtype fp16``);
    ``default`` (or ``[]``) when the option was not given."""
    if not values:
        return list(default or [])
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every timing subcommand shares."""
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device to time on (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes and repetitions: under a minute on 2 CPU cores",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice, all cores)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--plot", metavar="PATH", help="write a chart to this PNG file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    device = args.device or environment.best_device()
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device is visible to torch "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})"
        )
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # say so before the run rather than after it
            parser.error("--plot needs matplotlib: pip install matplotlib")
    return device


def write_outputs(doc: dict, args: argparse.Namespace, echo) -> None:
    """The ``--json`` and ``--plot`` files of a run."""
    if args.json:
        report.write_json(args.json, doc)
        echo(f"wrote {args.json}")
    if args.plot:
        from .plot import plot

        plot(doc, args.plot)
        echo(f"wrote {args.plot}")


def write_skip(bar, skip: runner.Skip) -> None:
    """One line on stderr, above the progress bar, for an implementation that raised."""
    bar.write(
        f"skipped {skip.impl} at {skip.shape} {skip.dtype} {skip.pass_}: {skip.reason}",
        file=sys.stderr,
    )


def timing_settings(device: str, budget: Budget) -> dict:
    """The JSON settings that say how a run timed: the tool and its budget."""
    return {
        "timer": timer_name(device),
        "warmup_s": budget.warmup_s,
        "min_run_time_s": budget.min_run_time_s,
        "min_repeats": budget.min_repeats,
    }


def _ops_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvit2-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog="Filters take comma-separated lists and may repeat. Shapes are globs over names "
        "such as w1.0-256px-L3-B32 (MobileViTv2 width, image size, stage, batch) and "
        "sf-xs-224px-s1-B32 (SwiftFormer variant, image size, stage, batch), or custom "
        "BxCxPxN (separable) and BxNxD (additive).",
    )
    add_common(parser)
    parser.add_argument(
        "--op",
        dest="ops",
        action="append",
        help="separable (MobileViTv2), additive (SwiftFormer) (default: both)",
    )
    parser.add_argument(
        "--backend",
        action="append",
        help="kernel backends to time (default: every one available on the "
        "device; the eager and compile baselines and the copy floor always "
        "run)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        help="fp32, bf16 (CPU and GPU), fp16 (GPU) (default: all of the device)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        help="glob over shape names, or BxCxPxN / BxNxD (default: the DESIGN §3 shapes; "
        "--quick: w1.0-256px-L3-*, sf-xs-224px-s1-*)",
    )
    parser.add_argument(
        "--pass", dest="passes", action="append", help="fwd, fwd+bwd (default: both)"
    )
    parser.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="the batch timed beside B=1 (default: 32 on CPU, 256 on GPU)",
    )
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the torch.compile baseline (compiling takes seconds per shape)",
    )
    return parser


def _select(parser, args, device: str):
    """The ops, shapes, dtypes, passes and backends to time, or a parser error naming the bad
    value."""
    batch = args.train_batch or shapes.train_batch(device)
    if batch < 1:
        parser.error(f"--train-batch must be >= 1, got {batch}")
    ops = listed(args.ops) or list(shapes.OPS)
    for op in ops:
        if op not in shapes.OPS:
            parser.error(f"--op {op!r}: choose from {', '.join(shapes.OPS)}")
    try:
        if args.shape:
            chosen = shapes.select_shapes(listed(args.shape), batch, ops)
        else:
            chosen = (shapes.quick_shapes if args.quick else shapes.design_shapes)(batch, ops)
    except ValueError as e:
        parser.error(str(e))
    supported = cases.DEVICE_DTYPES[device]
    dtypes = listed(args.dtype) or list(supported)
    for d in dtypes:
        if d not in supported:
            parser.error(
                f"--dtype {d!r} is not benchmarked on {device}; choose from {', '.join(supported)}"
            )
    passes = []
    for p in listed(args.passes) or list(cases.PASSES):
        if p not in PASS_ALIASES:
            parser.error(f"--pass {p!r}: choose from fwd, fwd+bwd")
        passes.append(PASS_ALIASES[p])
    present = cases.kernel_backends(device)
    backends = listed(args.backend) or present
    for b in backends:
        if b not in present:
            parser.error(
                f"--backend {b!r} is not available on {device}; available: "
                f"{', '.join(present) or 'none (the C++ extension is not built)'}"
            )
    impls = ["copy", "eager", *([] if args.no_compile else ["compile"]), *dict.fromkeys(backends)]
    ops = [op for op in shapes.OPS if any(s.op == op for s in chosen)]  # the ops that run
    return ops, chosen, list(dict.fromkeys(dtypes)), list(dict.fromkeys(passes)), impls, batch


def _run_ops(parser, args, argv: list[str]) -> int:
    device = resolve_device(parser, args)
    ops, chosen, dtypes, passes, impls, batch = _select(parser, args, device)
    budget = Budget.of(args.quick)
    env = environment.describe(device)
    groups = runner.plan(chosen, dtypes, passes)
    print(
        f"mvit2-bench: {env['device_name']} ({device}, {env['threads']} threads), "
        f"torch {env['torch']}, triton {env['triton']}; {len(groups)} groups × "
        f"{len(impls)} impls ({', '.join(impls)})",
        flush=True,
    )
    tables = {op: op_table([s.name for s in chosen if s.op == op], op) for op in ops}
    rows, skipped = [], []
    bar = progress_bar(len(groups) * len(impls), args.no_progress)
    op = None
    for group, (group_rows, group_skips) in zip(
        groups,
        runner.iter_groups(groups, impls, device, budget, tick=lambda impl: bar.update()),
        strict=True,
    ):
        if group.shape.op != op:  # a table per op: its channel column means C or D
            op, table = group.shape.op, tables[group.shape.op]
            bar.write(f"\n{cases.OP_TITLES[op]}\n{table.header()}", file=sys.stdout)
        for skip in group_skips:
            write_skip(bar, skip)
        for row in group_rows:
            bar.write(table.line(op_values(row)), file=sys.stdout)
        sys.stdout.flush()
        rows += [r.to_json() for r in group_rows]
        skipped += [s.to_json() for s in group_skips]
    bar.close()
    settings = {
        "quick": args.quick,
        "ops": ops,
        "additive_variant": cases.ADDITIVE_VARIANT,
        "train_batch": batch,
        "impls": impls,
        "dtypes": dtypes,
        "passes": passes,
        "shapes": [s.name for s in chosen],
        **timing_settings(device, budget),
    }
    doc = report.document("ops", argv, env, settings, rows, skipped)
    write_outputs(doc, args, print)
    return 0


def _report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvit2-bench report",
        description="Markdown tables from result files (mvit2-bench --json ...).",
    )
    parser.add_argument("files", nargs="+", metavar="RESULT.json")
    parser.add_argument(
        "--update",
        metavar="DOC.md",
        help="replace the results section of this Markdown file (between "
        f"{report.BEGIN} and {report.END}) instead of printing",
    )
    return parser


def _run_report(parser, args) -> int:
    try:
        docs = [report.load(f) for f in args.files]
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if args.update:
        from pathlib import Path

        text = report.markdown(docs, relative_to=Path(args.update).resolve().parent)
        try:
            report.update_section(args.update, text)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        print(f"updated {args.update} from {len(docs)} result file(s)")
    else:
        print(report.markdown(docs))
    return 0
