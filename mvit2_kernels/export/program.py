"""``torch.export`` of fused models: the checks before, the batch dimension, the checks after.

    ep = export_program(model, (x,))        # x: Tensor[B, 3, H, W], B dynamic
    fused_ops(ep)                           # ['mvit2.separable_layer_context_forward', ...]
    torch._inductor.aoti_compile_and_package(ep, package_path="model.pt2")

The exported graph holds the fused ops as they are (``torch.ops.mvit2.*``); AOTInductor keeps
calling them, and :func:`~mvit2_kernels.export.decompositions` turns them into aten ops for
any other toolchain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ..nn import SeparableAttention

__all__ = [
    "ParityError",
    "batch_dynamic_shapes",
    "check_exportable",
    "check_parity",
    "export_program",
    "fused_ops",
]


class ParityError(AssertionError):
    """An exported model's outputs differ from the eager model's beyond the tolerance."""


def check_exportable(model: nn.Module) -> None:
    """Raises ``ValueError`` naming the first module whose settings cannot be exported.

    ``SeparableAttention`` with ``attn_dropout > 0`` in training mode runs the unfused reference
    with random dropout on the softmax weights (docs/design.md §1): an exported graph would not
    be the fused model, and a deployed one would drop attention at random.
    """
    for name, module in model.named_modules():
        if isinstance(module, SeparableAttention) and module.training and module.attn_dropout > 0:
            raise ValueError(
                f"cannot export {type(module).__name__} '{name or type(model).__name__}': "
                f"attn_dropout={module.attn_dropout} in training mode is not fused (it runs the "
                "reference with random dropout); call model.eval() before exporting, or build "
                "the model with attn_dropout=0")


def batch_dynamic_shapes(args: Sequence[Any]) -> tuple:
    """``dynamic_shapes`` for ``torch.export``/``torch.onnx.export`` with dim 0 of every tensor
    argument one dynamic batch size (``Dim("batch")``) and every other dim static."""
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(a, Tensor) and a.dim() > 0 else None for a in args)


def export_program(
    model: nn.Module, args: Sequence[Any] | Tensor, *, dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args)`` after :func:`check_exportable`, with a dynamic batch
    dimension when ``dynamic_batch`` (the example batch must then be at least 2: torch.export
    specialises a size of 1)."""
    args = (args,) if isinstance(args, Tensor) else tuple(args)
    check_exportable(model)
    shapes = batch_dynamic_shapes(args) if dynamic_batch else None
    return torch.export.export(model, args, dynamic_shapes=shapes)


def fused_ops(program: torch.export.ExportedProgram | torch.fx.GraphModule) -> list[str]:
    """The ``mvit2`` ops a graph calls, in graph order (``"mvit2.<op>"``), e.g. to show that an
    exported program keeps the fused kernels or that a decomposed one has none left."""
    graph = program.graph
    return [f"mvit2.{node.target._opname}" for node in graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "mvit2"]


def max_rel_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|``: the error relative to the output's scale
    (elementwise relative errors are meaningless where an output crosses 0)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else err


def check_parity(actual: Any, expected: Any, *, rtol: float = 1e-4, what: str = "exported"
                 ) -> float:
    """The largest :func:`max_rel_error` over the tensors of two outputs (any pytree: a tensor,
    a tuple, a transformers ``ModelOutput``; numpy arrays are accepted as ``actual``).

    Raises :class:`ParityError` on a different number or shape of outputs, or an error above
    ``rtol``, naming the output."""
    got = [torch.as_tensor(a) for a in pytree.tree_leaves(actual)
           if isinstance(a, Tensor) or hasattr(a, "__array__")]
    want = [t for t in pytree.tree_leaves(expected) if isinstance(t, Tensor)]
    if len(got) != len(want):
        raise ParityError(f"{what}: {len(got)} outputs, the eager model returns {len(want)}")
    worst = 0.0
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        if tuple(a.shape) != tuple(e.shape):
            raise ParityError(f"{what}: output {i} has shape {list(a.shape)}, eager "
                              f"{list(e.shape)}")
        err = max_rel_error(a, e)
        if not err <= rtol:  # NaN fails too
            raise ParityError(f"{what}: output {i} {list(e.shape)} differs from eager by "
                              f"{err:.3g} (max |diff| / max |eager|), above rtol={rtol:g}")
        worst = max(worst, err)
    return worst
