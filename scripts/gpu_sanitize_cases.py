"""One small case of each CUDA kernel, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/gpu_sanitize_cases.py
    python scripts/gpu_sanitize_cases.py --dry-run     # no GPU: the ops exist, the cases run on CPU

Every op of csrc/cuda (``torch.ops.mvit2.*``) is called directly, forward then backward, at small
shapes that still reach each kernel's paths: odd N in float32 (scalar loads), N a multiple of 8 in
bfloat16 (16-byte vectors), several channel tiles per row (few rows) and one tile per row (B·P of
512), q/k/v as views of one qkv tensor; for the layer's context kernels also their fused path with
several d slots (B·P = 512, D = 70) and their split path (B·P = 4, D = 128), in both dtypes.
Inputs are made on the CPU and copied over, so the only kernels on the device are ours (and the
fills and copies inside the ops). Each result is checked against the float64 reference
(``mvit2_kernels.reference``) loosely: the sanitizer looks for bad memory accesses and races; the
test suite judges the numbers.

Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (scripts/gpu_check.sh does): every tensor is then
its own allocation, so memcheck sees an access past a tensor's end instead of inside the
caching allocator's larger block. ``--dry-run`` (or no CUDA device) checks that every op's schema
is registered, says whether CUDA kernels are, and runs the same cases on the CPU kernels.
Exit status 0 when every case ran and matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import mvit2_kernels  # noqa: F401  (registers torch.ops.mvit2.*)
from mvit2_kernels import reference as ref
from mvit2_kernels.backends import compiled_cuda

OPS = (
    "separable_attention_forward", "separable_attention_backward",
    "additive_attention_forward", "additive_attention_backward",
    "separable_layer_context_forward", "separable_layer_context_backward",
    "separable_layer_epilogue_forward", "separable_layer_epilogue_backward",
)
# (dtype, shape): float32 with odd sizes (scalar loads, few rows: many channel tiles), bfloat16
# with N a multiple of 8 (16-byte vectors), and one with B·P = 512 rows (one tile per row).
SEPARABLE = [(torch.float32, (2, 40, 4, 37)), (torch.bfloat16, (1, 24, 2, 64)),
             (torch.float32, (128, 3, 4, 5))]
ADDITIVE = [(torch.float32, (2, 37, 20)), (torch.bfloat16, (2, 64, 48))]  # (B, N, D)
# (B, D = C, P, N). The last four: the context kernels' fused path with several d slots per lane
# group (B·P = 512 rows, D = 70) and their split path (B·P = 4: each row's channels over several
# blocks; W = 8 in bfloat16), which the shapes above do not reach.
LAYER = [(torch.float32, (2, 12, 4, 37)), (torch.bfloat16, (1, 24, 2, 64)),
         (torch.float32, (128, 3, 4, 5)),
         (torch.float32, (128, 70, 4, 64)), (torch.bfloat16, (128, 70, 4, 64)),
         (torch.float32, (1, 128, 4, 256)), (torch.bfloat16, (1, 128, 4, 256))]
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def op(name: str) -> Callable:
    return getattr(torch.ops.mvit2, name)


def randn(*shape: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """Made on the CPU in ``dtype``, then copied: no random-number kernel on the device."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def check(label: str, got, want, dtype: torch.dtype) -> list[str]:
    """Loose closeness of each output to its float64 reference; the failures' descriptions."""
    bad = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        if g.shape != w.shape:
            bad.append(f"{label} output {i}: shape {tuple(g.shape)} != {tuple(w.shape)}")
            continue
        if not g.isfinite().all():
            bad.append(f"{label} output {i}: non-finite values")
            continue
        err = (g - w).abs().max().item() if g.numel() else 0.0
        bound = TOL[dtype] * max(1.0, w.abs().max().item() if w.numel() else 0.0)
        if err > bound:
            bad.append(f"{label} output {i}: max error {err:.3g} > {bound:.3g}")
    return bad


def f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().cpu() for t in tensors]


def separable_case(dtype, shape, device, gen) -> list[str]:
    B, C, P, N = shape
    qkv = randn(B, 1 + 2 * C, P, N, dtype=dtype, device=device, gen=gen)
    q, k, v = qkv.split([1, C, C], dim=1)  # views of one tensor, as qkv_proj's output
    grad_y = randn(B, C, P, N, dtype=dtype, device=device, gen=gen)
    y, ctx = op("separable_attention_forward")(q, k, v)
    grads = op("separable_attention_backward")(grad_y, q, k, v, ctx)
    r = f64(q, k, v)
    y_ref, ctx_ref = ref.separable_attention_forward_reference(*r)
    grads_ref = ref.separable_attention_backward_reference(*f64(grad_y), *r, ctx_ref)
    return check(f"separable_attention {dtype} {shape}", (y, ctx, *grads),
                 (y_ref, ctx_ref, *grads_ref), dtype)


def additive_case(variant, dtype, shape, device, gen) -> list[str]:
    B, N, D = shape
    q, k = (randn(B, N, D, dtype=dtype, device=device, gen=gen) for _ in range(2))
    w_g = randn(D, 1, dtype=dtype, device=device, gen=gen)
    grad_out, grad_qn = (randn(B, N, D, dtype=dtype, device=device, gen=gen) for _ in range(2))
    out, qn, g, a_norm = op("additive_attention_forward")(q, k, w_g, variant)
    grads = op("additive_attention_backward")(grad_out, grad_qn, q, k, w_g, g, a_norm, variant)
    r = f64(q, k, w_g)
    fwd_ref = ref.additive_attention_forward_reference(*r, variant)
    grads_ref = ref.additive_attention_backward_reference(
        *f64(grad_out, grad_qn), *r, fwd_ref[2], fwd_ref[3], variant)
    return check(f"additive_attention[{variant}] {dtype} {shape}", (out, qn, g, a_norm, *grads),
                 (*fwd_ref, *grads_ref), dtype)


def layer_case(dtype, shape, device, gen) -> list[str]:
    B, D, P, N = shape
    acc = torch.float32
    x = randn(B, D, P, N, dtype=dtype, device=device, gen=gen)
    w_q = randn(D, dtype=dtype, device=device, gen=gen)
    s, xbar = op("separable_layer_context_forward")(x, w_q)
    grad_xbar = randn(B, D, P, dtype=acc, device=device, gen=gen)
    dx, dw_q = op("separable_layer_context_backward")(grad_xbar, x, w_q, s, xbar)
    r = f64(x, w_q)
    s_ref, xbar_ref = ref.separable_layer_context_forward_reference(*r)
    ctx_grads_ref = ref.separable_layer_context_backward_reference(
        *f64(grad_xbar), *r, s_ref, xbar_ref)
    bad = check(f"separable_layer_context {dtype} {shape}", (s, xbar, dx, dw_q),
                (s_ref, xbar_ref, *ctx_grads_ref), dtype)

    v = randn(B, D, P, N, dtype=dtype, device=device, gen=gen)
    ctx = randn(B, D, P, dtype=acc, device=device, gen=gen)
    grad_y = randn(B, D, P, N, dtype=dtype, device=device, gen=gen)
    y = op("separable_layer_epilogue_forward")(v, ctx)
    dv, dctx = op("separable_layer_epilogue_backward")(grad_y, v, ctx)
    r = f64(v, ctx)
    y_ref = ref.separable_layer_epilogue_forward_reference(*r)
    epi_grads_ref = ref.separable_layer_epilogue_backward_reference(*f64(grad_y), *r)
    return bad + check(f"separable_layer_epilogue {dtype} {shape}", (y, dv, dctx),
                       (y_ref, *epi_grads_ref), dtype)


def cases():
    for dtype, shape in SEPARABLE:
        yield f"separable_attention fwd/bwd {dtype} {shape}", separable_case, (dtype, shape)
    for variant in ref.ADDITIVE_VARIANTS:
        for dtype, shape in ADDITIVE:
            yield (f"additive_attention[{variant}] fwd/bwd {dtype} {shape}", additive_case,
                   (variant, dtype, shape))
    for dtype, shape in LAYER:
        yield (f"separable_layer context+epilogue fwd/bwd {dtype} {shape}", layer_case,
               (dtype, shape))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: check the ops exist and run the cases on the CPU kernels")
    args = p.parse_args(argv)
    missing = [name for name in OPS if not hasattr(torch.ops.mvit2, name)]
    if missing:
        print(f"gpu_sanitize_cases: ops not registered: {', '.join(missing)}", flush=True)
        return 1
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    has_cuda_kernel = {name: has_kernel(f"mvit2::{name}", "CUDA") for name in OPS}
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print("gpu_sanitize_cases: no CUDA device visible to torch", flush=True)
            return 1
        device = "cpu"
        print(f"gpu_sanitize_cases --dry-run: {len(OPS)} ops registered; CUDA kernels registered "
              f"for {sum(has_cuda_kernel.values())} of them (compiled_cuda={compiled_cuda()}); "
              "running the cases on the CPU kernels", flush=True)
    else:
        device = "cuda"
        absent = [name for name, has in has_cuda_kernel.items() if not has]
        if absent:
            print(f"gpu_sanitize_cases: no CUDA kernel registered for {', '.join(absent)} "
                  f"(compiled_cuda={compiled_cuda()}: build with FORCE_CUDA=1)", flush=True)
            return 1
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for label, fn, case_args in cases():
        t0 = time.perf_counter()
        try:
            bad = fn(*case_args, device, gen)
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # a launch error names the kernel; report it and go on
            bad = [f"{type(e).__name__}: {e}".splitlines()[0][:300]]
        failures += bool(bad)
        print(f"{'FAIL' if bad else 'ok  '} {label} ({time.perf_counter() - t0:.1f} s)", flush=True)
        for line in bad:
            print(f"     {line}", flush=True)
    print(f"gpu_sanitize_cases: {failures} of {sum(1 for _ in cases())} cases failed on {device}",
          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
