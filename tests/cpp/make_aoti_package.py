"""Writes what tests/cpp/aoti_run.cpp runs: an AOTInductor package of a small fused model
(``model.pt2``, batch dimension dynamic), an input of another batch size (``input.pt``) and the
eager model's output on it (``expected.pt``).

    python tests/cpp/make_aoti_package.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

import mvit2_kernels
from mvit2_kernels.export import export_program, fused_ops


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = mvit2_kernels.SeparableAttention(16).eval()  # x: [B, C, P, N]
    program = export_program(model, (torch.randn(2, 16, 4, 9),))
    print("exported graph calls", fused_ops(program))
    torch._inductor.aoti_compile_and_package(program, package_path=str(out / "model.pt2"))
    x = torch.randn(3, 16, 4, 9)  # another batch size than the example's
    with torch.no_grad():
        torch.save(x, out / "input.pt")
        torch.save(model(x), out / "expected.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
