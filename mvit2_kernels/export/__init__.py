"""Deployment: fused models exported to ONNX and AOTInductor (docs/export.md).

- ``to_onnx(model, (x,), "model.onnx")``: ONNX with standard operators, a dynamic batch, checked
  in ONNX Runtime. A plain ``torch.onnx.export(model, (x,), dynamo=True)`` works too inside
  ``with onnx_decompositions():``, which lends it the decompositions for that block only.
- ``export_program(model, (x,))``: ``torch.export`` with a dynamic batch, the fused ops kept, for
  ``torch._inductor.aoti_compile_and_package``; ``fused_ops(ep)`` lists them.
- ``decompositions()``: every fused op in aten ops, for ``ep.run_decompositions`` (ExecuTorch,
  Core ML, any toolchain that does not know ``torch.ops.mvit2``).
- ``check_exportable(model)``, ``check_parity(actual, expected)``, ``check_onnx(...)``: the checks,
  which raise (``ValueError``, ``ParityError``) rather than warn.

Importing this registers nothing anywhere; nothing here imports onnx or onnxruntime until an ONNX
function is called.
"""

from .decompositions import decompositions, onnx_decompositions
from .onnx_program import check_onnx, check_standard_onnx, to_onnx
from .program import (
    ParityError,
    batch_dynamic_shapes,
    check_exportable,
    check_parity,
    export_program,
    fused_ops,
    max_rel_error,
)

__all__ = [
    "ParityError",
    "batch_dynamic_shapes",
    "check_exportable",
    "check_onnx",
    "check_parity",
    "check_standard_onnx",
    "decompositions",
    "export_program",
    "fused_ops",
    "max_rel_error",
    "onnx_decompositions",
    "to_onnx",
]
