"""``mvit2-bench layer``: MobileViTv2's whole attention layer, fused (with and without the keys)
against the standard layer in eager and under ``torch.compile``, forward and training step."""

from __future__ import annotations

import argparse
import sys

import torch

from .. import backends
from . import environment, layer, report, runner, shapes
from .cases import DEVICE_DTYPES
from .progress import progress_bar
from .table import layer_table, layer_values
from .timing import Budget

__all__ = ["build_parser", "run"]


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_common

    parser = argparse.ArgumentParser(
        prog="mvit2-bench layer",
        description="MobileViTv2's attention layer (qkv_proj, separable attention, out_proj) as "
        "SeparableAttention runs it: fused-layer (no keys), fused-kernel (convolutions around "
        "the fused op), eager and compile (the standard layer), fused-layer+compile; forward "
        "under no_grad and a training step (forward + backward for x and the parameters).",
        epilog="Filters take comma-separated lists and may repeat. Shapes are globs over the "
        "names of the separable op (w1.0-256px-L3-B32: width, image size, stage, batch; the "
        "layer's D is the stage's C) or custom BxDxPxN.",
    )
    add_common(parser)
    parser.add_argument(
        "--shape",
        action="append",
        help="glob over shape names, or BxDxPxN (default: MobileViTv2-1.0's stages, "
        "w1.0-256px-L3-*, -L4-*, -L5-*; --quick: w1.0-256px-L3-*)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        help="fp32, bf16 (CPU and GPU), fp16 (GPU) (default: fp32 on CPU, bf16 on GPU)",
    )
    parser.add_argument(
        "--pass", dest="passes", action="append", help="fwd, fwd+bwd (default: both)"
    )
    parser.add_argument("--impl", action="append", help=f"{', '.join(layer.IMPLS)} (default: all)")
    parser.add_argument(
        "--train-batch",
        type=int,
        default=None,
        help="the batch timed beside B=1 (default: 32 on CPU, 256 on GPU)",
    )
    parser.add_argument(
        "--backend", default="auto", help="backend of the fused impls (default auto)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time every group this many times, round-robin over the groups, and report the "
        "median of the rounds' medians (for a machine that other work shares; default 1)",
    )
    return parser


def _select(parser, args, device: str):
    """The shapes, dtypes, passes and impls to time, or a parser error naming the bad value."""
    from .cli import PASS_ALIASES, listed

    batch = shapes.train_batch(device) if args.train_batch is None else args.train_batch
    if batch < 1:
        parser.error(f"--train-batch must be >= 1, got {batch}")
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    try:
        if args.shape:
            chosen = shapes.select_shapes(listed(args.shape), batch, ["separable"])
        else:
            chosen = layer.default_shapes(batch, args.quick)
    except ValueError as e:
        parser.error(str(e))
    dtypes = listed(args.dtype, list(layer.DEFAULT_DTYPES[device]))
    for d in dtypes:
        if d not in DEVICE_DTYPES[device]:
            parser.error(
                f"--dtype {d!r} is not benchmarked on {device}; "
                f"choose from {', '.join(DEVICE_DTYPES[device])}"
            )
    passes = []
    for p in listed(args.passes, ["fwd", "fwd+bwd"]):
        if p not in PASS_ALIASES:
            parser.error(f"--pass {p!r}: choose from fwd, fwd+bwd")
        passes.append(PASS_ALIASES[p])
    impls = listed(args.impl, list(layer.IMPLS))
    for i in impls:
        if i not in layer.IMPLS:
            parser.error(f"--impl {i!r}: choose from {', '.join(layer.IMPLS)}")
    try:
        resolved = backends.resolve_backend(args.backend, torch.device(device))
    except (ValueError, RuntimeError) as e:
        parser.error(f"--backend {args.backend!r}: {e}")
    unique = (list(dict.fromkeys(x)) for x in (dtypes, passes, impls))
    return chosen, *unique, batch, resolved


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Time every shape × dtype × pass × impl, printing rows as they arrive; --json, --plot."""
    from .cli import resolve_device, timing_settings, write_outputs, write_skip

    device = resolve_device(parser, args)
    chosen, dtypes, passes, impls, batch, resolved = _select(parser, args, device)
    budget = Budget.of(args.quick)
    env = environment.describe(device)
    groups = runner.plan(chosen, dtypes, passes)
    print(
        f"mvit2-bench layer: {env['device_name']} ({device}, {env['threads']} threads), "
        f"torch {env['torch']}, backend {resolved}; {len(groups)} groups × {len(impls)} impls "
        f"({', '.join(impls)})",
        flush=True,
    )
    table = layer_table([s.name for s in chosen])
    bar = progress_bar(args.repeat * len(groups) * len(impls), args.no_progress)
    bar.write(table.header(), file=sys.stdout)
    cache = environment.last_level_cache_bytes(device)
    rows = []
    torch.manual_seed(0)
    timed: dict[runner.Group, list[dict]] = {g: [] for g in groups}
    failed: dict[tuple[runner.Group, str], runner.Skip] = {}
    for round_ in range(args.repeat):
        # Round-robin over the groups: a burst of other work on the machine spoils one round of
        # a group rather than every round of it.
        for group in groups:
            timings, skips, count = layer.time_group(
                group, impls, device, budget, args.backend, cache, tick=lambda impl: bar.update()
            )
            timed[group].append(timings)
            for skip in skips:
                if (group, skip.impl) not in failed:
                    failed[group, skip.impl] = skip
                    write_skip(bar, skip)
            if round_ == args.repeat - 1:
                group_rows = layer.group_rows(group, timed[group], count)
                for row in group_rows:
                    bar.write(table.line(layer_values(row)), file=sys.stdout)
                rows += [r.to_json() for r in group_rows]
    skipped = [s.to_json() for s in failed.values()]
    bar.close()
    settings = {
        "quick": args.quick,
        "repeat": args.repeat,
        "train_batch": batch,
        "backend": args.backend,
        "resolved_backend": resolved,
        "impls": impls,
        "dtypes": dtypes,
        "passes": passes,
        "shapes": [s.name for s in chosen],
        **timing_settings(device, budget),
    }
    doc = report.document("layer", argv, env, settings, rows, skipped)
    write_outputs(doc, args, print)
    return 0
