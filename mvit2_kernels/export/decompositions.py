"""Each fused op written in aten ops, from the maths of ``mvit2_kernels/reference.py``.

A toolchain that does not know ``torch.ops.mvit2.*`` (ONNX, ExecuTorch, Core ML, another
compiler) sees standard ops instead: softmax, matmul, sum, relu, mul, convolution, norms.
Each function returns what its op's schema returns, statistics included (``ctx``, ``s``,
``xbar``, ``g``, ``a_norm``), in the op's dtypes and contiguous like the kernels' outputs, so
that a graph stays valid whichever outputs it reads.

    ep.run_decompositions(decompositions())                 # only our ops, aten left as it is
    table = torch.export.default_decompositions()           # or down to core aten as well
    table.update(decompositions()); ep.run_decompositions(table)

    with onnx_decompositions():                             # for a plain torch.onnx.export
        torch.onnx.export(model, (x,), dynamo=True)

Nothing is registered globally at import. :func:`onnx_decompositions` puts the forward ops'
entries into ``torch._decomp.decomposition_table`` (the table ``torch.onnx.export(...,
dynamo=True)`` decomposes with) for the ``with`` block only, because that table is read
elsewhere too: FakeTensor consults it before our ``register_fake`` kernels whenever shapes are
symbolic (dynamic ``torch.compile``, ``torch.export`` with a dynamic batch, AOTInductor
tracing), which would run this reference maths as the fake kernel on every op call, and
DTensor's ``has_decomp`` reads it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..checks import acc_dtype
from ..reference import (
    additive_attention_backward_reference,
    additive_attention_forward_reference,
    separable_attention_backward_reference,
    separable_attention_forward_reference,
    separable_layer_context_backward_reference,
    separable_layer_context_forward_reference,
    separable_layer_epilogue_backward_reference,
    separable_layer_epilogue_forward_reference,
)

__all__ = ["decompositions", "onnx_decompositions"]


def _contiguous(*outputs: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in outputs)


def separable_attention_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, ctx)``: docs/design.md §1, ctx ``[B, C, P, 1]`` in the accumulation dtype."""
    return _contiguous(*separable_attention_forward_reference(q, k, v))


def separable_attention_qkv_forward(qkv: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, ctx)`` of the q, k, v channel views of ``qkv: [B, 1 + 2C, P, N]``."""
    C = (qkv.shape[1] - 1) // 2
    return separable_attention_forward(*qkv.split([1, C, C], dim=1))


def separable_layer_context_forward(x: Tensor, w_q: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, xbar)``: ``s = softmax_N(w_q · x)`` ``[B, P, N]``, ``xbar = Σ_n s x`` ``[B, D, P]``."""
    return _contiguous(*separable_layer_context_forward_reference(x, w_q))


def separable_layer_epilogue_forward(v: Tensor, ctx: Tensor) -> Tensor:
    """``y = relu(v) * ctx`` in v's dtype."""
    return separable_layer_epilogue_forward_reference(v, ctx).contiguous()


def separable_layer_project_forward(
    x: Tensor, w_v: Tensor, b_v: Tensor | None, ctx: Tensor, w_out: Tensor,
    b_out: Tensor | None, keep: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, v, y)``: ``v = W_v x + b_v``, ``y = relu(v) * ctx``, ``out = W_out y + b_out``;
    v and y are empty ``[0]`` unless ``keep`` (the CPU kernel's contract). The projections are
    the 1×1 convolutions of the standard layer."""
    v = F.conv2d(x, w_v[:, :, None, None], b_v)
    y = separable_layer_epilogue_forward_reference(v, ctx)
    out = F.conv2d(y, w_out[:, :, None, None], b_out).contiguous()
    if not keep:
        return out, x.new_empty((0,)), x.new_empty((0,))
    return out, v.contiguous(), y.contiguous()


def additive_attention_forward(
    q: Tensor, k: Tensor, w_g: Tensor, variant: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(G * kn, qn, g, a_norm)``: docs/design.md §2, g and a_norm in the accumulation dtype."""
    return _contiguous(*additive_attention_forward_reference(q, k, w_g, variant))


# --- Backward ops: for training graphs (a joint graph, or export of a training step) ----------


def separable_attention_backward(grad_y, q, k, v, ctx) -> tuple[Tensor, Tensor, Tensor]:
    return _contiguous(*separable_attention_backward_reference(grad_y, q, k, v, ctx))


def separable_attention_qkv_backward(grad_y, qkv, ctx) -> Tensor:
    """``dqkv``: dq, dk, dv in one tensor shaped like qkv."""
    C = (qkv.shape[1] - 1) // 2
    grads = separable_attention_backward_reference(grad_y, *qkv.split([1, C, C], dim=1), ctx)
    return torch.cat(grads, dim=1).contiguous()


def separable_layer_context_backward(grad_xbar, x, w_q, s, xbar) -> tuple[Tensor, Tensor]:
    return _contiguous(*separable_layer_context_backward_reference(grad_xbar, x, w_q, s, xbar))


def separable_layer_epilogue_backward(grad_y, v, ctx) -> tuple[Tensor, Tensor]:
    return _contiguous(*separable_layer_epilogue_backward_reference(grad_y, v, ctx))


def separable_layer_project_backward(grad_out, v, ctx, w_out) -> tuple[Tensor, Tensor]:
    """``(dv, dctx)`` with ``dy = W_out^T grad_out`` (in the accumulation dtype, as the kernel)."""
    dy = F.conv2d(grad_out.to(ctx.dtype), w_out.t().to(ctx.dtype)[:, :, None, None])
    return _contiguous(*separable_layer_epilogue_backward_reference(dy, v, ctx))


def separable_layer_project_weight_backward(grad: Tensor, input: Tensor) -> Tensor:
    """``Σ_{b,p,n} grad ⊗ input``: ``[O, I]`` in the accumulation dtype."""
    acc = acc_dtype(grad.dtype)
    return torch.einsum("bopn,bipn->oi", grad.to(acc), input.to(acc)).contiguous()


def additive_attention_backward(
    grad_out, grad_qn, q, k, w_g, g, a_norm, variant: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _contiguous(*additive_attention_backward_reference(
        grad_out, grad_qn, q, k, w_g, g, a_norm, variant))


_FORWARD: dict[str, Callable] = {
    "separable_attention_forward": separable_attention_forward,
    "separable_attention_qkv_forward": separable_attention_qkv_forward,
    "separable_layer_context_forward": separable_layer_context_forward,
    "separable_layer_epilogue_forward": separable_layer_epilogue_forward,
    "separable_layer_project_forward": separable_layer_project_forward,
    "additive_attention_forward": additive_attention_forward,
}
# separable_layer_project_input_backward writes its input in place (dx += W_v^T dv), and
# separable_attention_forward_out its y: a graph holds them functionalised, which a
# decomposition table cannot name; they have none.
_BACKWARD: dict[str, Callable] = {
    "separable_attention_backward": separable_attention_backward,
    "separable_attention_qkv_backward": separable_attention_qkv_backward,
    "separable_layer_context_backward": separable_layer_context_backward,
    "separable_layer_epilogue_backward": separable_layer_epilogue_backward,
    "separable_layer_project_backward": separable_layer_project_backward,
    "separable_layer_project_weight_backward": separable_layer_project_weight_backward,
    "additive_attention_backward": additive_attention_backward,
}


def decompositions(*, backward: bool = False) -> dict[torch._ops.OpOverload, Callable]:
    """``{torch.ops.mvit2.<op>.default: fn}`` for every fused op registered in this process (the
    C++ ops, and the Triton ops ``<op>_triton`` once imported), for
    ``ExportedProgram.run_decompositions``. ``backward=True`` adds the backward ops."""
    names = {**_FORWARD, **(_BACKWARD if backward else {})}
    table = {}
    if not backends.compiled():
        return table
    for name, fn in names.items():
        for suffix in ("", "_triton"):
            packet = getattr(torch.ops.mvit2, name + suffix, None)
            if packet is not None:
                table[packet.default] = fn
    return table


@contextlib.contextmanager
def onnx_decompositions() -> Iterator[dict[torch._ops.OpOverload, Callable]]:
    """Within the ``with`` block, the forward ops' decompositions are in
    ``torch._decomp.decomposition_table``, which ``torch.onnx.export(..., dynamo=True)`` (and
    exporters built on it, such as transformers' ``OnnxExporter``) decompose with; on exit the
    entries it added are removed. Entries already there are left alone, so blocks nest. The
    table is process-global: do not trace or compile in another thread meanwhile.

    Yields the entries it added."""
    table = torch._decomp.decomposition_table
    added = {op: fn for op, fn in decompositions().items() if op not in table}
    table.update(added)
    try:
        yield added
    finally:
        for op in added:
            table.pop(op, None)
