"""``mvit2-bench``: what the fused kernels buy on this machine.

    mvit2-bench [ops] [--quick] [--op ...] [--backend ...] [--dtype ...] [--shape ...] [--pass ...]
    mvit2-bench layer [--quick] [--shape ...] [--dtype ...] [--pass ...] [--impl ...]
    mvit2-bench model [--quick] [--model ...] [--width ...] [--mode ...] [--impl ...]
    mvit2-bench report RESULT.json ... [--plot PATH]

The first (the default) times the kernels of both ops (MobileViTv2's separable attention,
SwiftFormer's additive attention) against the eager reference, ``torch.compile(reference)`` and
the memory-copy floor; ``layer`` MobileViTv2's whole attention layer; ``model`` whole models;
``report`` prints the tables of result files and charts one.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import textwrap
from collections.abc import Sequence

import torch

from ..backends import resolve_backend
from ..models.mobilevitv2 import WIDTHS
from ..models.swiftformer import CONFIGS as SWIFTFORMER
from . import kernels, layer, models, results
from .timing import QUICK, Budget, Kind, measure, timer_name

COMMANDS = ("ops", "layer", "model", "report")
PASS_ALIASES = {"fwd": "forward", "forward": "forward", "fwd+bwd": "forward+backward",
                "forward+backward": "forward+backward", "bwd": "forward+backward"}
EPILOG = ("Filters take comma-separated lists and may repeat. Shapes are globs over names such as "
          "w1.0-256px-L3-B32 (MobileViTv2 width, image size, stage, batch; the layer's D is the "
          "stage's C) and sf-xs-224px-s1-B32 (SwiftFormer variant, image size, stage, batch), or "
          "custom BxCxPxN (separable, layer) and BxNxD (additive).")
DESCRIPTION = {"ops": __doc__, "layer": layer.__doc__, "model": models.__doc__, "report":
               "Print the tables of mvit2-bench result files (--json); --plot charts one."}


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
    if args.plot and not importlib.util.find_spec("matplotlib"):  # said before the run, not after
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
        description=DESCRIPTION[command],
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
        add("--backend", default="auto", help="backend of the fused impls (default auto)")
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
    return p


def _choose(parser, option: str, values: list[str] | None, allowed: Sequence | None,
            default: Sequence = (), why: str = "") -> list:
    """Repeated, comma-separated ``values`` (else ``default``), each one of ``allowed`` if any."""
    values = list(dict.fromkeys(v.strip() for value in values or () for v in value.split(",")
                                if v.strip())) or list(default)
    for v in values:
        if allowed is not None and v not in allowed:
            parser.error(f"{option} {v!r}{why}: choose from {', '.join(allowed) or 'none'}")
    return values


def _selection(parser, args, device: str, ops: list[str], default_shapes, default_dtypes):
    """The (shape, dtype, pass) groups of ``ops`` and ``layer``, and their settings."""
    batch = args.train_batch or kernels.TRAIN_BATCH[device]
    try:
        chosen = (kernels.select_shapes(_choose(parser, "--shape", args.shape, None), batch, ops)
                  if args.shape else default_shapes(batch))
    except ValueError as e:
        parser.error(str(e))
    dtypes = _choose(parser, "--dtype", args.dtype, kernels.DEVICE_DTYPES[device], default_dtypes,
                     f" is not benchmarked on {device}")
    passes = _choose(parser, "--pass", args.passes, PASS_ALIASES, ["fwd", "fwd+bwd"])
    passes = list(dict.fromkeys(PASS_ALIASES[p] for p in passes))
    # Groups of one table (op, dtype, pass) run one after another, so it prints when done.
    groups = [(s, d, p) for op in ops for d in dtypes for p in passes for s in chosen if s.op == op]
    return groups, {"train_batch": batch, "dtypes": dtypes, "passes": passes,
                    "shapes": [s.name for s in chosen]}


def _ops_plan(parser, args, device: str):
    ops = _choose(parser, "--op", args.op, kernels.OPS, kernels.OPS)
    pick = kernels.quick_shapes if args.quick else kernels.design_shapes
    groups, settings = _selection(parser, args, device, ops, lambda b: pick(b, ops),
                                  kernels.DEVICE_DTYPES[device])
    present = kernels.kernel_backends(device)
    backends = _choose(parser, "--backend", args.backend, present, present,
                       f" is not available on {device}")
    ops = [op for op in kernels.OPS if any(g[0].op == op for g in groups)]  # the ops that run
    impls = ["copy", "eager", *([] if args.no_compile else ["compile"]),
             *kernels.fused_impls(backends, ops)]
    settings = {"ops": ops, "additive_variant": kernels.ADDITIVE_VARIANT,
                "grad_paths": {op: kernels.OPS[op].grad_paths for op in ops},
                "grad_rounds": kernels.GRAD_ROUNDS, **settings}
    return groups, impls, kernels.KIND, {}, settings


def _layer_plan(parser, args, device: str):
    groups, settings = _selection(parser, args, device, ["separable"],
                                  lambda b: layer.default_shapes(b, args.quick),
                                  layer.DEFAULT_DTYPES[device])
    impls = _choose(parser, "--impl", args.impl, list(layer.IMPLS), layer.IMPLS)
    try:
        resolved = resolve_backend(args.backend, torch.device(device))
    except (ValueError, RuntimeError) as e:
        parser.error(f"--backend {args.backend!r}: {e}")
    settings = {"backend": args.backend, "resolved_backend": resolved, **settings}
    return groups, impls, layer.KIND, {"backend": args.backend}, settings


def _model_plan(parser, args, device: str):
    if args.dtype not in (dtypes := kernels.DEVICE_DTYPES[device]):  # one dtype, not a list
        parser.error(f"--dtype {args.dtype!r}: choose from {', '.join(dtypes)}")
    impls = _choose(parser, "--impl", args.impl, models.IMPLS, models.IMPLS)
    families = _choose(parser, "--model", args.model, kernels.RESOLUTION, kernels.RESOLUTION)
    batch = args.batch or ((32 if device == "cuda" else 8) if args.quick
                           else kernels.TRAIN_BATCH[device])
    amp = args.dtype == "fp32"  # training+amp runs an fp32 model under autocast
    modes = _choose(parser, "--mode", args.mode, models.MODES, models.MODES[:3 if amp else 2])
    if "training+amp" in modes and not amp:
        parser.error("--mode training+amp runs an fp32 model under autocast: use --dtype fp32")
    variants = {"mobilevitv2": _choose(parser, "--width", args.width, [str(w) for w in WIDTHS],
                                       ["0.5" if args.quick else "1.0"]),
                "swiftformer": _choose(parser, "--variant", args.variant, list(SWIFTFORMER),
                                       ["xs"])}
    cases = [models.ModelCase(family, variant, args.resolution or kernels.RESOLUTION[family], b,
                              mode, args.dtype)
             for family in families for variant in variants[family] for mode in modes
             # --quick times inference at B=1 only: the deployment case
             for b in (((1,) if args.quick else (1, batch)) if mode == "inference" else (batch,))]
    if not importlib.util.find_spec("transformers"):
        parser.error("mvit2-bench model needs transformers: pip install transformers")
    if "swiftformer" in families and args.impl and "fused-kernel" in impls:
        print("mvit2-bench model: fused-kernel is not available for SwiftFormer", file=sys.stderr)
    settings = {"dtype": args.dtype, "backend": args.backend,
                "cases": [c._asdict() for c in cases]}
    return list(dict.fromkeys(cases)), impls, models.KIND, {"backend": args.backend}, settings


def _run(name: str, argv, args, device: str, groups: list, impls: list[str], kind: Kind,
         options: dict, settings: dict) -> int:
    """Time every group's jobs ``--repeat`` times, round-robin over the groups (a burst of other
    work on the machine then spoils one round of a group, not all of them); print each table
    when its groups are done; write ``--json`` and ``--plot``. A job that raises (a missing
    backend, a failed compile, out of memory) is reported and skipped, not fatal."""
    from tqdm import tqdm

    env, budget = results.describe(device), QUICK if args.quick else Budget()
    print(f"mvit2-bench {name}: {env['device_name']} ({device}, {env['threads']} threads), "
          f"torch {env['torch']}; {len(groups)} groups × {len(impls)} impls "
          f"({', '.join(impls)})", flush=True)
    jobs = {group: kind.jobs(group, impls) for group in groups}
    bar = tqdm(total=args.repeat * sum(map(len, jobs.values())), file=sys.stderr, unit="timing",
               leave=False, dynamic_ncols=True, disable=True if args.no_progress else None)
    timed: dict = {group: {} for group in groups}
    rows, printed, skipped = [], 0, {}
    tables = [results.labels(name, kind.fields(group))[0] for group in groups]  # each adjacent
    torch.manual_seed(0)
    for round_ in range(args.repeat):
        for i, group in enumerate(groups):
            build, todo = kind.prepare(group, device, budget, **options), jobs[group]
            # Gradient paths alternating in rounds share the budget of one measurement.
            n = todo.count(todo[0]) if todo else 1
            share = budget._replace(warmup_s=budget.warmup_s / n,
                                    min_run_time_s=budget.min_run_time_s / n)
            for impl, path in todo:
                try:
                    fn, metadata = build(impl, path)
                    got = measure(fn, device, share, **metadata)
                    timed[group].setdefault((impl, path), []).append(got)
                except Exception as e:
                    if (group, impl, path) not in skipped:
                        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                        fields = {**kind.fields(group), **({"grads": path} if path else {})}
                        skipped[group, impl, path] = {**fields, "impl": impl, "reason": reason}
                        where = ", ".join(map(str, fields.values()))
                        bar.write(f"skipped {impl} at {where}: {reason}", file=sys.stderr)
                fn = got = None
                gc.collect()  # this job's buffers, graphs and saved activations go before the next
                if device == "cuda":
                    torch.cuda.empty_cache()
                bar.update()
            if round_ == args.repeat - 1:
                done = results.summarize(kind.fields(group), timed[group], kind.ratios)
                kind.finish(group, done, timed[group])
                rows += done
                if tables[i + 1 : i + 2] != tables[i : i + 1] and rows[printed:]:  # table done
                    bar.write(results.render(rows[printed:], name, env["threads"]), file=sys.stdout)
                    printed = len(rows)
    bar.close()
    settings = {"quick": args.quick, "repeat": args.repeat, "impls": impls, **settings,
                "timer": timer_name(device), **budget._asdict()}
    doc = results.document(name, argv, env, settings, rows, list(skipped.values()))
    if args.json:
        results.write_json(args.json, doc)
        print(f"wrote {args.json}")
    return _plot(args, doc)


def _plot(args, doc: dict) -> int:
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
    return _plot(args, docs[0])
