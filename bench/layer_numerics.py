"""How far the fused layer (no keys) and the standard layer each are from exact arithmetic.

Both compute MobileViTv2's attention layer in the given dtype from the same inputs, rounded to
that dtype; the target is the standard layer in float64 on those rounded inputs. Prints the
relative (Frobenius) error of the output and of the gradients of x and both weights as a Markdown
table (docs/layer_fusion.md, "Numerics"). Run: ``python bench/layer_numerics.py [--shape BxDxPxN]``.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from mvit2_kernels import separable_attention_layer
from mvit2_kernels.reference import separable_layer_reference

NAMES = ("out", "dx", "d qkv_weight", "d out_weight")


def layer_inputs(B: int, D: int, P: int, N: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        return torch.randn(size, generator=g, dtype=torch.float64) * scale

    C = D
    return [randn(B, D, P, N), randn(1 + 2 * C, D, 1, 1, scale=D**-0.5),
            randn(1 + 2 * C, scale=0.1), randn(D, C, 1, 1, scale=C**-0.5), randn(D, scale=0.1)]


def output_and_grads(fn, inputs: list[Tensor], grad_out: Tensor) -> list[Tensor]:
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out, [leaves[0], leaves[1], leaves[3]], grad_out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4x128x4x256", help="BxDxPxN (default: %(default)s)")
    parser.add_argument("--backend", default="auto", help="the fused layer's backend")
    args = parser.parse_args()
    B, D, P, N = (int(s) for s in args.shape.split("x"))
    exact = layer_inputs(B, D, P, N)
    grad64 = torch.randn(B, D, P, N, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    print(f"Relative error against float64, shape B, D, P, N = {B}, {D}, {P}, {N}\n")
    print("| dtype | tensor | standard layer | fused layer |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        low, grad = [t.to(dtype) for t in exact], grad64.to(dtype)
        target = output_and_grads(separable_layer_reference, [t.double() for t in low],
                                  grad.double())
        standard = output_and_grads(separable_layer_reference, low, grad)
        fused = output_and_grads(
            lambda *t: separable_attention_layer(*t, backend=args.backend), low, grad)
        for name, t, s, f in zip(NAMES, target, standard, fused, strict=True):
            def err(a: Tensor, t: Tensor = t) -> float:
                return ((a.double() - t).norm() / t.norm()).item()

            print(f"| {str(dtype).removeprefix('torch.')} | {name} | {err(s):.1e} | {err(f):.1e} |")


if __name__ == "__main__":
    main()
