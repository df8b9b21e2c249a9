"""What every layer of the package shares: argument checks (docs/design.md §5), the dtypes,
and the autocast boundary. It imports nothing from the package, so the ops, the layer and every
backend (Triton's host code included) import it without cycles."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "ADDITIVE_VARIANTS",
    "FLOAT_DTYPES",
    "acc_dtype",
    "as_matrix",
    "autocast_inputs",
    "autocast_off",
    "check_additive_inputs",
    "check_float_like",
    "check_layer_inputs",
    "check_separable_inputs",
    "check_separable_qkv_input",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ADDITIVE_VARIANTS = ("normalize", "softmax")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp16/bf16/fp32 (what the kernels accumulate in), float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float_like(tensors: dict[str, Tensor], like: str) -> None:
    """Every tensor is a float tensor with the dtype and device of ``tensors[like]``."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    ref = tensors[like]
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like} has {ref.dtype}: one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {like} is on {ref.device}: one device")


def check_separable_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """docs/design.md §5: errors name the argument and the expected shape."""
    check_float_like({"q": q, "k": k, "v": v}, like="k")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            want = "[B, 1, P, N]" if name == "q" else "[B, C, P, N]"
            raise ValueError(f"{name} must be a 4-D tensor {want}, got shape {tuple(t.shape)}")
    B, _C, P, N = k.shape
    if tuple(q.shape) != (B, 1, P, N):
        raise ValueError(
            f"q must have shape [B, 1, P, N] = {[B, 1, P, N]} to match "
            f"k [B, C, P, N] = {list(k.shape)}, got {list(q.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(
            f"v must have shape [B, C, P, N] = {list(k.shape)} like k, got {list(v.shape)}"
        )


def check_separable_out(out: Tensor, q: Tensor, k: Tensor, v: Tensor, name: str = "out") -> None:
    """The preallocated output of the separable forward: contiguous ``[B, C, P, N]`` in k's dtype
    and device, sharing no memory with q, k or v (the inputs already checked)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != k.dtype:
        raise TypeError(f"{name} must have dtype {k.dtype} like k, got {out.dtype}")
    if out.device != k.device:
        raise ValueError(f"{name} must be on {k.device} like k, got {out.device}")
    if out.shape != k.shape:
        raise ValueError(f"{name} must have shape [B, C, P, N] = {list(k.shape)} like k, got "
                         f"{list(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels write it row by row)")
    for input_name, t in (("q", q), ("k", k), ("v", v)):
        if _byte_ranges_meet(out, t):
            raise ValueError(f"{name} shares memory with {input_name}: the kernels read the "
                             "inputs while they write it")


def _byte_ranges_meet(a: Tensor, b: Tensor) -> bool:
    """Whether the spans of memory a and b address meet (conservative for strided tensors);
    False for tensors without memory (meta, fake: traced, where no kernel writes) and while
    torch.compile traces (the C++ op checks the same at run time)."""
    if a.numel() == 0 or b.numel() == 0 or torch.compiler.is_compiling():
        return False

    def span(t: Tensor) -> tuple[int, int]:
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    try:
        (a0, a1), (b0, b1) = span(a), span(b)
    except RuntimeError:  # "Cannot access data pointer" of a functional tensor
        return False
    return a0 != 0 and b0 != 0 and a0 < b1 and b0 < a1  # fake tensors' pointers are null


def check_separable_qkv_input(qkv: Tensor) -> int:
    """docs/design.md §5 for the packed input ``qkv: [B, 1 + 2C, P, N]``; returns C."""
    check_float_like({"qkv": qkv}, like="qkv")
    if qkv.dim() != 4 or qkv.shape[1] < 3 or qkv.shape[1] % 2 == 0:
        raise ValueError(
            "qkv must be a 4-D tensor [B, 1 + 2C, P, N] with an odd channel count >= 3 "
            f"(q, k, v = qkv.split([1, C, C], dim=1)), got shape {list(qkv.shape)}"
        )
    return (qkv.shape[1] - 1) // 2


def check_additive_inputs(q: Tensor, k: Tensor, w_g: Tensor, variant: str) -> None:
    """docs/design.md §5: errors name the argument and the expected shape."""
    if variant not in ADDITIVE_VARIANTS:
        raise ValueError(f"variant must be one of {ADDITIVE_VARIANTS}, got {variant!r}")
    check_float_like({"q": q, "k": k, "w_g": w_g}, like="k")
    if k.dim() != 3:
        raise ValueError(f"k must be a 3-D tensor [B, N, D], got shape {list(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(
            f"q must have shape [B, N, D] = {list(k.shape)} like k, got {list(q.shape)}"
        )
    D = k.shape[-1]
    if tuple(w_g.shape) != (D, 1):
        raise ValueError(f"w_g must have shape [D, 1] = {[D, 1]}, got {list(w_g.shape)}")


def check_layer_inputs(x, qkv_weight, qkv_bias, out_weight, out_bias) -> tuple[Tensor, Tensor]:
    """docs/design.md §5 for the layer; returns the weights as 2-D ``[1 + 2C, D]`` and
    ``[D_out, C]``."""
    tensors = {"x": x, "qkv_weight": qkv_weight, "out_weight": out_weight}
    if qkv_bias is not None:
        tensors["qkv_bias"] = qkv_bias
    if out_bias is not None:
        tensors["out_bias"] = out_bias
    check_float_like(tensors, like="x")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [B, D, P, N], got shape {list(x.shape)}")
    D = x.shape[1]
    w_qkv = as_matrix(qkv_weight, "qkv_weight", "[1 + 2C, D, 1, 1]")
    w_out = as_matrix(out_weight, "out_weight", "[D_out, C, 1, 1]")
    rows = w_qkv.shape[0]
    if rows % 2 == 0 or w_qkv.shape[1] != D:
        raise ValueError(
            f"qkv_weight must have shape [1 + 2C, D, 1, 1] with D = {D} (x's channels), "
            f"got {list(qkv_weight.shape)}")
    C = (rows - 1) // 2
    if w_out.shape[1] != C:
        raise ValueError(
            f"out_weight must have shape [D_out, C, 1, 1] with C = {C} (from qkv_weight), "
            f"got {list(out_weight.shape)}")
    for name, b, n in (("qkv_bias", qkv_bias, rows), ("out_bias", out_bias, w_out.shape[0])):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must have shape [{n}], got {list(b.shape)}")
    return w_qkv, w_out


def as_matrix(w: Tensor, name: str, want: str) -> Tensor:
    if w.dim() == 4 and w.shape[2:] == (1, 1):
        w = w.flatten(1)
    if w.dim() != 2:
        raise ValueError(f"{name} must have shape {want} (a 1×1 convolution's weight), "
                         f"got {list(w.shape)}")
    return w.contiguous()


# --- Autocast ----------------------------------------------------------------------------------
#
# Every op is a contraction (a weighted sum over N, or the layer's 1x1 convolutions), so under
# torch.autocast it casts like a convolution or matmul: floating inputs go to the autocast dtype
# once, at the boundary (float64 stays float64, as autocast leaves it), and the op then runs with
# autocast off. Inside, fp16/bf16 accumulate in float32 anyway; autocast left on would recast the
# float32 glue (the layer's small GEMMs, the saved context) to fp16/bf16 and lose that.


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` as a convolution under the current autocast would take them: float16/32 and
    bfloat16 tensors cast to the autocast dtype of their device; anything else unchanged."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or not _autocast_enabled(first.device):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that runs an op's body (forward or backward) with autocast off on ``device``;
    a no-op where autocast is off already, so that ``torch.export`` and ``torch.compile`` of
    code without autocast see the bare ops (not a ``wrap_with_autocast`` around them)."""
    if _autocast_enabled(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_enabled(device: torch.device) -> bool:
    # Devices without autocast (meta, ...) raise in torch.is_autocast_enabled.
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
