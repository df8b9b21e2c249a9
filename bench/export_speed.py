"""Times a fused model in the runtimes it deploys to, on CPU: eager PyTorch (fused, and the
unfused reference layer for scale), ``torch.compile``, ONNX Runtime (the ONNX export of
``mvit2_kernels.export.to_onnx``) and, with ``--aoti``, an AOTInductor package. Each runtime's
output is held against the fused eager model first (``max |diff| / max |eager|``).

    python bench/export_speed.py          # MobileViTv2-0.5, 256 px, B=1 and 32
    python bench/export_speed.py --model swiftformer-xs --size 224 --batches 1 32 --aoti

Medians of ``--repeat`` timed calls after two warm-ups, one process, ``torch.get_num_threads()``
threads for every runtime (ONNX Runtime's intra-op pool included). The kernels are memory-bound
and the machine may be shared: say so next to any number you keep (docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mvit2_kernels.export import check_parity, export_program, to_onnx
from mvit2_kernels.models import mobilevitv2, swiftformer_xs

MODELS: dict[str, Callable[[bool], torch.nn.Module]] = {
    "mobilevitv2-0.5": lambda fused: mobilevitv2(0.5, fused=fused),
    "mobilevitv2-1.0": lambda fused: mobilevitv2(1.0, fused=fused),
    "swiftformer-xs": lambda fused: swiftformer_xs(variant="normalize", fused=fused),
}


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def runtimes(name: str, size: int, aoti: bool, workdir: Path) -> dict[str, Callable]:
    """name -> a callable on one input; each built once (batch dynamic) from the same weights."""
    import onnxruntime as ort

    torch.manual_seed(0)
    fused = MODELS[name](True).eval()
    unfused = MODELS[name](False).eval()
    unfused.load_state_dict(fused.state_dict())
    example = torch.randn(2, 3, size, size)
    to_onnx(fused, (example,), workdir / "model.onnx", check=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(workdir / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    compiled = torch.compile(fused)
    found = {
        "eager, fused": fused,
        "eager, unfused": unfused,
        "torch.compile, fused": compiled,
        "onnxruntime": lambda t: torch.from_numpy(session.run(None, {feed: t.numpy()})[0]),
    }
    if aoti:
        package = torch._inductor.aoti_compile_and_package(
            export_program(fused, (example,)), package_path=str(workdir / "model.pt2"))
        found["AOTInductor, fused"] = torch._inductor.aoti_load_package(package)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="mobilevitv2-0.5")
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--aoti", action="store_true", help="also an AOTInductor package")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    rows = []
    print(f"{args.model}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| runtime | B | ms / batch | images/s | max rel error vs eager |\n"
          "|---|---|---|---|---|")
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        found = runtimes(args.model, args.size, args.aoti, Path(tmp))
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            expected = found["eager, fused"](x)
            for runtime, fn in found.items():
                err = check_parity(fn(x), expected, rtol=float("inf"))
                ms = median_ms(lambda fn=fn, x=x: fn(x), args.repeat)
                rows.append({"model": args.model, "size": args.size, "runtime": runtime,
                             "batch": batch, "ms": ms, "images_per_s": 1e3 * batch / ms,
                             "max_rel_error": err, "threads": torch.get_num_threads()})
                print(f"| {runtime} | {batch} | {ms:.1f} | {1e3 * batch / ms:.1f} | {err:.1e} |",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
