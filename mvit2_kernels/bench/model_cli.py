"""``mvit2-bench model``: throughput in images/s of ours fused and unfused against transformers'
implementation (and transformers after ``mvit2_kernels.fuse_`` when it exists), for inference and
a training step, with the share of the time spent in the attention modules."""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import asdict

import torch

from . import environment, report
from .cases import DEVICE_DTYPES
from .models import IMPLS, MODES, SWIFTFORMER, ModelCase, model_builders, our_factory, time_model
from .progress import progress_bar
from .table import model_table, model_values
from .timing import Budget, timer_name

__all__ = ["build_parser", "run"]

WIDTHS = ("0.5", "0.75", "1.0", "1.25", "1.5", "1.75", "2.0")


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_common

    parser = argparse.ArgumentParser(
        prog="mvit2-bench model",
        description="Model throughput (images/s): ours fused and unfused, transformers' "
        "implementation, inference and a training step (SGD), with the share of the "
        "time spent in the attention modules.",
    )
    add_common(parser)
    parser.add_argument(
        "--model",
        action="append",
        help="mobilevitv2, swiftformer (default: mobilevitv2, plus swiftformer "
        "when mvit2_kernels.models has it)",
    )
    parser.add_argument(
        "--width", action="append", help="MobileViTv2 widths (default 1.0; --quick 0.5)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        help=f"SwiftFormer variants: {', '.join(SWIFTFORMER)} (default xs)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="training batch, also timed in inference beside B=1 "
        "(default: 32 on CPU, 256 on GPU; --quick: 8 and 32, inference at B=1 only)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side (default: 256 for MobileViTv2, 224 for SwiftFormer)",
    )
    parser.add_argument(
        "--mode",
        action="append",
        help="inference, training, training+amp (the training step under bf16 autocast; "
        "default: all three, training+amp only for --dtype fp32)",
    )
    parser.add_argument(
        "--impl", action="append", help=f"{', '.join(IMPLS)} (default: all present)"
    )
    parser.add_argument("--dtype", default="fp32", help="model dtype (default fp32)")
    parser.add_argument("--backend", default="auto", help="backend of the fused models")
    return parser


def _choose(parser, option: str, values: list[str], allowed) -> list[str]:
    for v in values:
        if v not in allowed:
            parser.error(f"{option} {v!r}: choose from {', '.join(allowed)}")
    return values


def _cases(parser, args, device: str) -> list[ModelCase]:
    from .cli import listed

    has_swiftformer = our_factory("swiftformer_xs") is not None
    families = listed(args.model, ["mobilevitv2"] + (["swiftformer"] if has_swiftformer else []))
    _choose(parser, "--model", families, ("mobilevitv2", "swiftformer"))
    batch = args.batch or (
        (32 if device == "cuda" else 8) if args.quick else (256 if device == "cuda" else 32)
    )
    if batch < 1:
        parser.error(f"--batch must be >= 1, got {batch}")
    default_modes = [m for m in MODES if args.dtype == "fp32" or m != "training+amp"]
    modes = _choose(parser, "--mode", listed(args.mode, default_modes), MODES)
    if "training+amp" in modes and args.dtype != "fp32":
        parser.error("--mode training+amp runs an fp32 model under autocast: use --dtype fp32")
    cases = []
    for family in families:
        if family == "mobilevitv2":
            variants = _choose(
                parser, "--width", listed(args.width, ["0.5" if args.quick else "1.0"]), WIDTHS
            )
        else:
            variants = _choose(parser, "--variant", listed(args.variant, ["xs"]), SWIFTFORMER)
        res = args.resolution or (256 if family == "mobilevitv2" else 224)
        for variant in variants:
            for mode in modes:
                # --quick times inference at B=1 only: the deployment case.
                infer = (1,) if args.quick else (1, batch)
                for b in infer if mode == "inference" else (batch,):
                    cases.append(ModelCase(family, variant, res, b, mode))
    return list(dict.fromkeys(cases))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    """Time every case × implementation, printing rows as they arrive; ``--json``/``--plot``."""
    from .cli import listed, resolve_device, write_outputs

    device = resolve_device(parser, args)
    _choose(parser, "--dtype", [args.dtype], DEVICE_DTYPES[device])
    impls = _choose(parser, "--impl", listed(args.impl, []), IMPLS)
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("mvit2-bench model needs transformers: pip install transformers")
    cases = _cases(parser, args, device)
    budget = Budget.of(args.quick)
    plan = []
    for case in cases:
        builders = model_builders(case.family, case.variant)
        for impl in impls or list(builders):
            if impl in builders:
                plan.append((case, impl, builders[impl]))
            else:
                print(
                    f"mvit2-bench model: {impl} is not available for {case.name}", file=sys.stderr
                )
    env = environment.describe(device)
    print(
        f"mvit2-bench model: {env['device_name']} ({device}, {env['threads']} threads), "
        f"torch {env['torch']}, transformers {env['transformers']}",
        flush=True,
    )
    table = model_table([c.name for c in cases])
    bar = progress_bar(len(plan), args.no_progress)
    bar.write(table.header(), file=sys.stdout)
    rows, skipped = [], []
    for case, impl, build in plan:
        try:
            row = time_model(build, impl, case, args.dtype, device, budget, args.backend)
        except Exception as e:  # e.g. out of memory at a large batch: reported, not fatal
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            where = {"model": case.name, "batch": case.batch, "mode": case.mode, "impl": impl}
            skipped.append({**where, "reason": reason})
            bar.write(
                f"skipped {impl} {case.name} {case.mode} B={case.batch}: {reason}", file=sys.stderr
            )
        else:
            rows.append(asdict(row))
            bar.write(table.line(model_values(row)), file=sys.stdout)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()  # the next model starts from an empty cache, e.g. after OOM
        bar.update()
    bar.close()
    settings = {
        "quick": args.quick,
        "dtype": args.dtype,
        "backend": args.backend,
        "timer": timer_name(device),
        "warmup_s": budget.warmup_s,
        "min_run_time_s": budget.min_run_time_s,
        "min_repeats": budget.min_repeats,
        "cases": [asdict(c) for c in cases],
    }
    doc = report.document("model", argv, env, settings, rows, skipped)
    write_outputs(doc, args, print)
    return 0
