"""``mvit2-bench``: what the fused kernels buy on this machine.

    mvit2-bench [ops] [--quick] [--op ...] [--backend ...] [--dtype ...] [--shape ...] [--pass ...]
    mvit2-bench layer [--quick] [--shape ...] [--dtype ...] [--pass ...] [--impl ...]
    mvit2-bench model [--quick] [--model ...] [--width ...] [--mode ...] [--impl ...]
    mvit2-bench report RESULT.json ... [--plot PATH]

The first (the default) times the kernels of both ops (MobileViTv2's separable attention,
SwiftFormer's additive attention) against the eager reference, ``torch.compile(reference)`` and
the memory-copy floor, the backward along both gradient paths (set_to_none, accumulate);
``layer`` times MobileViTv2's whole attention layer (fused with and without the keys, against
the standard layer eager and compiled); ``model`` times whole models (images/s and the share of
attention); ``report`` prints the tables of result files and charts one. Every timing command
takes --quick, --repeat, --json PATH and --plot PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Sequence

import torch

from ..backends import resolve_backend
from ..models.mobilevitv2 import WIDTHS
from ..models.swiftformer import CONFIGS as SWIFTFORMER
from . import kernels, layer, models, results, shapes
from .timing import Budget, timer_name

__all__ = ["main"]

COMMANDS = ("ops", "layer", "model", "report")
PASS_ALIASES = {"fwd": "forward", "forward": "forward", "fwd+bwd": "forward+backward",
                "forward+backward": "forward+backward", "bwd": "forward+backward"}
EPILOG = ("Filters take comma-separated lists and may repeat. Shapes are globs over names such as "
          "w1.0-256px-L3-B32 (MobileViTv2 width, image size, stage, batch; the layer's D is the "
          "stage's C) and sf-xs-224px-s1-B32 (SwiftFormer variant, image size, stage, batch), or "
          "custom BxCxPxN (separable, layer) and BxNxD (additive).")
DESCRIPTION = {
    "layer": "MobileViTv2's attention layer as SeparableAttention runs it: "
    f"{', '.join(layer.IMPLS)}; forward under no_grad and a training step (forward and backward "
    "for x and the parameters).",
    "model": "Model throughput (images/s) in inference and training steps (SGD; training+amp: "
    "under bf16 autocast), ours fused and unfused against transformers', with the share of the "
    "time spent in the attention modules.",
    "report": "Print the tables of mvit2-bench result files (--json); --plot charts one.",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mvit2-bench`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "ops"
    parser = _parser(command)
    args = parser.parse_args(argv[1:] if argv and argv[0] == command else argv)
    if command == "report":
        return _report(parser, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device is visible to torch {torch.__version__}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # said before the run rather than after it
            parser.error("--plot needs matplotlib: pip install matplotlib")
    plan = {"ops": _ops_plan, "layer": _layer_plan, "model": _model_plan}[command]
    return _run(command, argv, args, device, *plan(parser, args, device))


def _positive(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return int(text)


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mvit2-bench" + ("" if command == "ops" else f" {command}"),
        description=__doc__ if command == "ops" else textwrap.fill(DESCRIPTION[command], 79),
        epilog=textwrap.fill(EPILOG, 79) if command in ("ops", "layer") else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    if command == "report":
        add("files", nargs="+", metavar="RESULT.json")
        add("--plot", metavar="PATH", help="write the chart of the (one) file to this PNG")
        return p
    add("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    add("--quick", action="store_true", help="fewer cases and repetitions: about a minute")
    add("--threads", type=_positive, help="CPU threads for torch (default: torch's choice)")
    add("--repeat", type=_positive, default=1, help="time every group this many times, "
        "round-robin over the groups, and report the median of the rounds' medians (default 1)")
    add("--json", metavar="PATH", help="write every figure and the machine to this JSON file")
    add("--plot", metavar="PATH", help="write a chart to this PNG file (needs matplotlib)")
    add("--no-progress", action="store_true", help="no progress bar on stderr")
    if command != "ops":
        impls = layer.IMPLS if command == "layer" else models.IMPLS
        add("--impl", action="append", help=f"{', '.join(impls)} (default: all)")
    if command == "model":
        add("--model", action="append", help="mobilevitv2, swiftformer (default: both)")
        add("--width", action="append", help="MobileViTv2 widths (default 1.0; --quick 0.5)")
        add("--variant", action="append",
            help=f"SwiftFormer variants: {', '.join(SWIFTFORMER)} (default xs)")
        add("--batch", type=_positive, help="training batch, also timed in inference beside B=1 "
            "(default: 32 on CPU, 256 on GPU; --quick: 8 and 32, inference at B=1 only)")
        add("--resolution", type=_positive, help="default: 256 MobileViTv2, 224 SwiftFormer")
        add("--mode", action="append", help=f"{', '.join(models.MODES)} (default: all; "
            "training+amp only for --dtype fp32)")
        add("--dtype", default="fp32", help="model dtype (default fp32)")
        add("--backend", default="auto", help="backend of the fused models (default auto)")
        return p
    add("--shape", action="append", help="glob over shape names, or a custom shape "
        "(--quick: w1.0-256px-L3-*" + (", sf-xs-224px-s1-*)" if command == "ops" else ")"))
    add("--dtype", action="append", help="fp32, bf16 (CPU and GPU), fp16 (GPU) (default: "
        + ("all of the device)" if command == "ops" else "fp32 on CPU, bf16 on GPU)"))
    add("--pass", dest="passes", action="append", help="fwd, fwd+bwd (default: both)")
    add("--train-batch", type=_positive,
        help="the batch timed beside B=1 (default: 32 CPU, 256 GPU)")
    if command == "ops":
        add("--op", action="append", help="separable (MobileViTv2), additive (SwiftFormer)")
        add("--backend", action="append", help="kernel backends (default: all on the device)")
        add("--no-compile", action="store_true", help="skip the torch.compile baseline")
    else:
        add("--backend", default="auto", help="backend of the fused impls (default auto)")
    return p


def _listed(values: list[str] | None, default: Sequence[str] = ()) -> list[str]:
    """Repeated and comma-separated values as one list without repeats, or ``default``."""
    if not values:
        return list(default)
    return list(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


def _choose(parser, option: str, values: list[str], allowed: Sequence, why: str = "") -> list:
    for v in values:
        if v not in allowed:
            parser.error(f"{option} {v!r}{why}: choose from {', '.join(allowed) or 'none'}")
    return values


def _selection(parser, args, device: str, ops: list[str], default_shapes, default_dtypes):
    """The (shape, dtype, pass) groups of ``ops`` and ``layer``, and their settings."""
    batch = args.train_batch or shapes.train_batch(device)
    try:
        chosen = (shapes.select_shapes(_listed(args.shape), batch, ops) if args.shape
                  else default_shapes(batch))
    except ValueError as e:
        parser.error(str(e))
    dtypes = _choose(parser, "--dtype", _listed(args.dtype, default_dtypes),
                     kernels.DEVICE_DTYPES[device], f" is not benchmarked on {device}")
    passes = _choose(parser, "--pass", _listed(args.passes, ["fwd", "fwd+bwd"]), PASS_ALIASES)
    passes = list(dict.fromkeys(PASS_ALIASES[p] for p in passes))
    # Groups of one table (op, dtype, pass) run one after another, so it prints when done.
    groups = [(s, d, p) for op in ops for d in dtypes for p in passes for s in chosen if s.op == op]
    return groups, {"train_batch": batch, "dtypes": dtypes, "passes": passes,
                    "shapes": [s.name for s in chosen]}


def _ops_plan(parser, args, device: str):
    ops = _choose(parser, "--op", _listed(args.op, shapes.OPS), shapes.OPS)
    pick = shapes.quick_shapes if args.quick else shapes.design_shapes
    groups, settings = _selection(parser, args, device, ops, lambda b: pick(b, ops),
                                  kernels.DEVICE_DTYPES[device])
    present = kernels.kernel_backends(device)
    backends = _choose(parser, "--backend", _listed(args.backend, present), present,
                       f" is not available on {device}")
    impls = ["copy", "eager", *([] if args.no_compile else ["compile"]), *backends]
    ops = [op for op in shapes.OPS if any(g[0].op == op for g in groups)]  # the ops that run
    settings = {"ops": ops, "additive_variant": kernels.ADDITIVE_VARIANT,
                "grad_paths": {op: kernels.OPS[op].grad_paths for op in ops},
                "grad_rounds": kernels.GRAD_ROUNDS, **settings}
    return groups, impls, kernels, {}, settings


def _layer_plan(parser, args, device: str):
    groups, settings = _selection(parser, args, device, ["separable"],
                                  lambda b: layer.default_shapes(b, args.quick),
                                  layer.DEFAULT_DTYPES[device])
    impls = _choose(parser, "--impl", _listed(args.impl, layer.IMPLS), list(layer.IMPLS))
    try:
        resolved = resolve_backend(args.backend, torch.device(device))
    except (ValueError, RuntimeError) as e:
        parser.error(f"--backend {args.backend!r}: {e}")
    settings = {"backend": args.backend, "resolved_backend": resolved, **settings}
    return groups, impls, layer, {"backend": args.backend}, settings


def _model_plan(parser, args, device: str):
    _choose(parser, "--dtype", [args.dtype], kernels.DEVICE_DTYPES[device])
    impls = _choose(parser, "--impl", _listed(args.impl, models.IMPLS), models.IMPLS)
    families = _choose(parser, "--model", _listed(args.model, shapes.RESOLUTION), shapes.RESOLUTION)
    batch = args.batch or ((32 if device == "cuda" else 8) if args.quick
                           else shapes.train_batch(device))
    modes = _choose(parser, "--mode", _listed(args.mode, [
        m for m in models.MODES if args.dtype == "fp32" or m != "training+amp"]), models.MODES)
    if "training+amp" in modes and args.dtype != "fp32":
        parser.error("--mode training+amp runs an fp32 model under autocast: use --dtype fp32")
    variants = {
        "mobilevitv2": _choose(parser, "--width", _listed(args.width, ["0.5" if args.quick
                                                                      else "1.0"]),
                               [str(w) for w in WIDTHS]),
        "swiftformer": _choose(parser, "--variant", _listed(args.variant, ["xs"]),
                               list(SWIFTFORMER)),
    }
    cases = [models.ModelCase(family, variant, args.resolution or shapes.RESOLUTION[family], b,
                              mode, args.dtype)
             for family in families for variant in variants[family] for mode in modes
             # --quick times inference at B=1 only: the deployment case
             for b in (((1,) if args.quick else (1, batch)) if mode == "inference" else (batch,))]
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("mvit2-bench model needs transformers: pip install transformers")
    if "swiftformer" in families and args.impl and "fused-kernel" in impls:
        print("mvit2-bench model: fused-kernel is not available for SwiftFormer", file=sys.stderr)
    settings = {"dtype": args.dtype, "backend": args.backend,
                "cases": [dataclasses.asdict(c) for c in cases]}
    return list(dict.fromkeys(cases)), impls, models, {"backend": args.backend}, settings


def _run(kind, argv, args, device, groups, impls, module, options, settings) -> int:
    """Time every group's jobs ``--repeat`` times, round-robin over the groups (a burst of other
    work on the machine then spoils one round of a group, not all of them); print each table
    when its groups are done; write ``--json`` and ``--plot``."""
    from tqdm import tqdm

    env, budget = results.describe(device), Budget.of(args.quick)
    print(f"mvit2-bench {kind}: {env['device_name']} ({device}, {env['threads']} threads), "
          f"torch {env['torch']}; {len(groups)} groups × {len(impls)} impls "
          f"({', '.join(impls)})", flush=True)
    total = args.repeat * sum(len(module.jobs(g, impls)) for g in groups)
    bar = tqdm(total=total, file=sys.stderr, unit="timing", leave=False, dynamic_ncols=True,
               disable=True if args.no_progress else None)
    timed: dict = {g: {} for g in groups}
    rows, pending, skipped = [], [], {}

    def flush():
        bar.write(results.render(pending, kind, env["threads"]), file=sys.stdout)
        pending.clear()

    torch.manual_seed(0)
    for round_ in range(args.repeat):
        for group in groups:
            got = module.time_group(group, impls, device=device, budget=budget, tick=bar.update,
                                    **options)
            for (impl, path), measured in got.items():
                for m in measured:
                    if not isinstance(m, Exception):
                        timed[group].setdefault((impl, path), []).append(m)
                    elif (group, impl, path) not in skipped:
                        reason = f"{type(m).__name__}: {m}".splitlines()[0][:300]
                        fields = {**module.fields(group), **({"grads": path} if path else {})}
                        skipped[group, impl, path] = {**fields, "impl": impl, "reason": reason}
                        where = ", ".join(map(str, fields.values()))
                        bar.write(f"skipped {impl} at {where}: {reason}", file=sys.stderr)
            if round_ == args.repeat - 1:
                for row in module.rows(group, timed[group]):
                    if pending and results.labels(kind, row)[0] != results.labels(
                            kind, pending[0])[0]:
                        flush()
                    pending.append(row)
                    rows.append(row)
    if pending:
        flush()
    bar.close()
    settings = {"quick": args.quick, "repeat": args.repeat, "impls": impls, **settings,
                "timer": timer_name(device), **dataclasses.asdict(budget)}
    doc = results.document(kind, argv, env, settings, rows, list(skipped.values()))
    if args.json:
        results.write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.plot:
        results.plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _report(parser, args) -> int:
    if args.plot and len(args.files) != 1:
        parser.error("--plot charts one result file")
    try:
        docs = [results.load(f) for f in args.files]
    except (OSError, ValueError) as e:
        parser.error(str(e))
    for path, doc in zip(args.files, docs, strict=True):
        env = doc["environment"]
        print(f"{path}: {doc['kind']} on {env['device_name']} ({env['device']}, {env['threads']} "
              f"threads), torch {env['torch']}, {doc['created']}\n  {doc['command']}\n")
        print(results.render(doc["rows"], doc["kind"], env["threads"]))
    if args.plot:
        results.plot(docs[0], args.plot)
        print(f"wrote {args.plot}")
    return 0
