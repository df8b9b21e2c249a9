"""ONNX export of fused models, checked in ONNX Runtime.

:func:`to_onnx` runs ``torch.export``, decomposes the fused ops into aten ops
(``ep.run_decompositions(decompositions())``, no global table touched) and hands that program to
``torch.onnx.export``, with what a deployment wants around it: a dynamic batch dimension, a graph
that ``onnx.checker`` accepts with no custom domain left, and outputs held against the eager
model in ONNX Runtime. A plain ``torch.onnx.export(model, (x,), dynamo=True)`` works inside
``with onnx_decompositions():``. Needs ``onnx``, ``onnxscript`` and (to check) ``onnxruntime``:
``pip install "mvit2-kernels[export]"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .decompositions import decompositions
from .program import batch_dynamic_shapes, check_exportable, check_parity

__all__ = ["check_onnx", "check_standard_onnx", "to_onnx"]

# The operator sets of the ONNX standard: anything else is a custom domain no other runtime has.
_STANDARD_DOMAINS = {"", "ai.onnx"}


def to_onnx(
    model: nn.Module,
    args: Sequence[Any] | Tensor,
    path: str | os.PathLike | None = None,
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    **export_kwargs,
) -> torch.onnx.ONNXProgram:
    """Exports ``model(*args)`` to ONNX with standard operators only, and checks it.

    Args:
        model: a fused model (ours, or a transformers/timm model after ``fuse_``), in eval mode.
        args: its positional inputs, e.g. ``(x,)`` with ``x: Tensor[B, 3, H, W]``; with
            ``dynamic_batch`` the batch B is dynamic and the example must have ``B >= 2``.
        path: where to save the ``.onnx`` file (weights inside), or None.
        check: run :func:`check_onnx` (ONNX Runtime against the eager model, within ``rtol``).
        export_kwargs: passed to ``torch.onnx.export`` (``opset_version``, ``optimize``, ...);
            ``dynamic_shapes`` goes to ``torch.export`` instead of the batch one.

    Returns:
        The ``torch.onnx.ONNXProgram`` (``.model_proto``, ``.save(path)``).

    Raises:
        ValueError: a module cannot be exported (:func:`check_exportable`), or the graph is not
            standard ONNX. ``ParityError``: ONNX Runtime disagrees with the eager model.
    """
    args = (args,) if isinstance(args, Tensor) else tuple(args)
    check_exportable(model)
    export_kwargs.setdefault("verbose", False)
    shapes = export_kwargs.pop("dynamic_shapes",
                               batch_dynamic_shapes(args) if dynamic_batch else None)
    ep = torch.export.export(model, args, dynamic_shapes=shapes)
    ep = ep.run_decompositions(decompositions())  # our ops -> aten; the exporter does the rest
    program = torch.onnx.export(ep, args, dynamo=True, **export_kwargs)
    check_standard_onnx(program.model_proto)
    if check:
        check_onnx(program, model, args, rtol=rtol)
    if path is not None:
        program.save(os.fspath(path))
    return program


def check_standard_onnx(model_proto) -> None:
    """``onnx.checker`` (full check, shapes included) passes and every node is a standard ONNX
    operator: no custom domain, no local function (what a fused op left unlowered would be)."""
    import onnx

    onnx.checker.check_model(model_proto, full_check=True)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model_proto.graph.node
                     if n.domain not in _STANDARD_DOMAINS})
    custom += [f"function {f.domain}::{f.name}" for f in model_proto.functions]
    if custom:
        raise ValueError(f"the ONNX graph is not standard ONNX: it holds {', '.join(custom)}")


def check_onnx(
    onnx_model: Any, model: nn.Module, args: Sequence[Any] | Tensor, *, rtol: float = 1e-4,
) -> float:
    """Runs ``onnx_model`` (an ``ONNXProgram``, a ``ModelProto`` or a path) in ONNX Runtime on
    CPU and compares it with ``model(*args)`` run eagerly.

    Returns:
        The largest relative error ``max |ort - eager| / max |eager|`` over the outputs.

    Raises:
        ParityError: an output differs by more than ``rtol``, or the outputs do not match up.
    """
    import onnxruntime as ort

    args = (args,) if isinstance(args, Tensor) else tuple(args)
    if isinstance(onnx_model, torch.onnx.ONNXProgram):
        onnx_model = onnx_model.model_proto
    source = os.fspath(onnx_model) if isinstance(onnx_model, (str, os.PathLike)) else (
        onnx_model.SerializeToString())
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, Tensor)]
    feeds = {i.name: t.detach().cpu().numpy()
             for i, t in zip(session.get_inputs(), tensors, strict=False)}
    actual = session.run(None, feeds)
    with torch.no_grad():
        expected = model(*args)
    return check_parity(actual, expected, rtol=rtol, what="onnxruntime")
