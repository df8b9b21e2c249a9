"""The fused ops as differentiable functions: input checks, backend choice, autograd, fake kernels.

Every backend implements the same two ops (schemas in ``csrc/ops.cpp``):

    separable_attention_forward(q, k, v) -> (y, ctx)
    separable_attention_backward(grad_y, q, k, v, ctx) -> (dq, dk, dv)

The C++ kernels are ``torch.ops.mvit2.*`` (CPU and CUDA dispatch keys); Triton's are
``torch.ops.mvit2.*_triton`` (``mvit2_kernels/triton``). Both carry fake kernels, so
``torch.compile(fullgraph=True)`` and ``torch.export`` trace them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .reference import additive_attention_reference, separable_attention_reference

__all__ = ["additive_attention", "separable_attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def separable_attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto") -> Tensor:
    """MobileViTv2 separable self-attention, fused: ``relu(v) * sum_n softmax_N(q) * k``.

    Args:
        q: ``Tensor[B, 1, P, N]`` context scores (the first channel of ``qkv_proj``'s output).
        k: ``Tensor[B, C, P, N]`` keys.
        v: ``Tensor[B, C, P, N]`` values. Views of one ``qkv`` tensor are read in place.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``
            (see :func:`mvit2_kernels.available_backends`).

    Returns:
        ``Tensor[B, C, P, N]`` in the input dtype (fp16/bf16 are accumulated in float32).

    Differentiable once with respect to q, k and v; double backward raises.
    """
    q, k, v = autocast_inputs(q, k, v)
    _check_inputs(q, k, v)
    backend = backends.resolve_backend(backend, q.device)
    with autocast_off(q.device):
        if backend == "reference":
            return separable_attention_reference(q, k, v)
        return SeparableAttentionFunction.apply(q, k, v, backend)


class SeparableAttentionFunction(torch.autograd.Function):
    """Autograd over one backend's forward/backward ops. Saves q, k, v (no copies) and ctx."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
        y, attn_ctx = _op("separable_attention", "forward", backend)(q, k, v)
        ctx.save_for_backward(q, k, v, attn_ctx)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        q, k, v, attn_ctx = ctx.saved_tensors
        with autocast_off(q.device):
            grads = _op("separable_attention", "backward", ctx.backend)(grad_y, q, k, v, attn_ctx)
        if torch.is_grad_enabled():  # create_graph=True: make a second backward fail loudly
            grads = _NoDoubleBackward.apply("separable_attention", grad_y, q, k, v, *grads)
        return *grads, None


class _NoDoubleBackward(torch.autograd.Function):
    """Passes gradients through, tied to the inputs they depend on, so that differentiating them
    raises instead of silently treating them as constants."""

    @staticmethod
    def forward(ctx, op: str, *tensors: Tensor):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[4:])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.op} is differentiable once: double backward (differentiating "
            "its gradients, e.g. after create_graph=True) is not supported"
        )


def _op(name: str, direction: str, backend: str):
    """The ``forward`` or ``backward`` op of ``name`` on a backend: the Triton module's
    (imported lazily: it imports triton), or the C++ op behind ``torch.ops.mvit2``."""
    if backend == "triton":
        from .triton import additive_attention, separable_attention, separable_layer

        module = {
            "separable_attention": separable_attention,
            "additive_attention": additive_attention,
            "separable_layer_context": separable_layer,
            "separable_layer_epilogue": separable_layer,
        }[name]
        return getattr(module, f"{name}_{direction}")
    return getattr(torch.ops.mvit2, f"{name}_{direction}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """docs/design.md §5: errors name the argument and the expected shape."""
    _check_float_like({"q": q, "k": k, "v": v}, like="k")
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )


def autocast_off(device: torch.device) -> torch.autocast:
    """A context that runs an op's body (forward or backward) with autocast off on ``device``."""
    return torch.autocast(device.type, enabled=False)


if backends.compiled():  # the schemas exist: give them fake kernels

    @torch.library.register_fake("mvit2::separable_attention_forward")
    def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, C, P, _ = k.shape
        return k.new_empty(k.shape), k.new_empty((B, C, P, 1), dtype=_acc_dtype(k.dtype))

    @torch.library.register_fake("mvit2::separable_attention_backward")
    def _(grad_y: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: Tensor):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# --- Efficient additive attention (SwiftFormer), docs/design.md §2 --------------------------------
#
#     additive_attention_forward(q, k, w_g, variant) -> (out, qn, g, a_norm)
#     additive_attention_backward(grad_out, grad_qn, q, k, w_g, g, a_norm, variant)
#         -> (dq, dk, dw_g)
#
# g = G [B, D] and a_norm = ||a|| over N [B] are float32 (float64 for float64 inputs).

_ADDITIVE_VARIANTS = ("normalize", "softmax")


def additive_attention(
    q: Tensor, k: Tensor, w_g: Tensor, *, variant: str = "normalize", backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """SwiftFormer's efficient additive attention, fused, up to its ``proj`` Linear.

    ``qn, kn = normalize(q), normalize(k)`` over D; token weights ``a = (qn @ w_g) * D**-0.5``,
    turned into ``alpha`` over the N tokens; global query ``G = sum_n alpha[n] qn[n]``. The layer
    then computes ``final(proj(G * kn) + qn)``.

    Args:
        q: ``Tensor[B, N, D]``, the output of ``to_query``.
        k: ``Tensor[B, N, D]``, the output of ``to_key``. Rows are read in place with their
            strides; only a strided D axis is copied.
        w_g: ``Tensor[D, 1]``, the learned weight vector, in the dtype of q and k.
        variant: ``"normalize"``: ``alpha = a / ||a||`` over N (the fixed SwiftFormer code, timm);
            ``"softmax"``: softmax over the size-1 last axis (the original release,
            transformers), so every ``alpha`` is 1 and ``G = sum_n qn[n]``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``(G * kn, qn)``, both ``Tensor[B, N, D]`` in the input dtype (fp16/bf16 accumulated in
        float32). Differentiable once with respect to q, k and w_g.
    """
    q, k, w_g = autocast_inputs(q, k, w_g)
    _check_additive_inputs(q, k, w_g, variant)
    backend = backends.resolve_backend(backend, q.device)
    with autocast_off(q.device):
        if backend == "reference":
            return additive_attention_reference(q, k, w_g, variant)
        return AdditiveAttentionFunction.apply(q, k, w_g, variant, backend)


class AdditiveAttentionFunction(torch.autograd.Function):
    """Autograd over one backend's additive-attention ops. Saves q, k, w_g (no copies), G and
    ||a||; the per-token norms are recomputed from the rows the backward reads anyway."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, w_g: Tensor, variant: str, backend: str):
        out, qn, g, a_norm = _op("additive_attention", "forward", backend)(q, k, w_g, variant)
        ctx.save_for_backward(q, k, w_g, g, a_norm)
        ctx.variant, ctx.backend = variant, backend
        return out, qn

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_qn: Tensor):
        q, k, w_g, g, a_norm = ctx.saved_tensors
        with autocast_off(q.device):
            grads = _op("additive_attention", "backward", ctx.backend)(
                grad_out, grad_qn, q, k, w_g, g, a_norm, ctx.variant
            )
        if torch.is_grad_enabled():  # create_graph=True: make a second backward fail loudly
            # _NoDoubleBackward ties its outputs to its first four tensors; w_g rides along as a
            # fifth so that it is a dependency too, and its pass-through view is dropped.
            grads = _NoDoubleBackward.apply(
                "additive_attention", grad_out, grad_qn, q, k, w_g, *grads
            )[1:]
        return *grads, None, None


def _check_additive_inputs(q: Tensor, k: Tensor, w_g: Tensor, variant: str) -> None:
    """docs/design.md §5: errors name the argument and the expected shape."""
    if variant not in _ADDITIVE_VARIANTS:
        raise ValueError(f"variant must be one of {_ADDITIVE_VARIANTS}, got {variant!r}")
    _check_float_like({"q": q, "k": k, "w_g": w_g}, like="k")
    if k.dim() != 3:
        raise ValueError(f"k must be a 3-D tensor [B, N, D], got shape {list(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(
            f"q must have shape [B, N, D] = {list(k.shape)} like k, got {list(q.shape)}"
        )
    D = k.shape[-1]
    if tuple(w_g.shape) != (D, 1):
        raise ValueError(f"w_g must have shape [D, 1] = {[D, 1]}, got {list(w_g.shape)}")


def _check_float_like(tensors: dict[str, Tensor], like: str) -> None:
    """Every tensor is a float tensor with the dtype and device of ``tensors[like]``."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    ref = tensors[like]
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like} has {ref.dtype}: one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {like} is on {ref.device}: one device")


if backends.compiled():  # the schemas exist: give them fake kernels

    @torch.library.register_fake("mvit2::additive_attention_forward")
    def _(q: Tensor, k: Tensor, w_g: Tensor, variant: str):
        B, _N, D = k.shape
        acc = _acc_dtype(k.dtype)
        return (
            k.new_empty(k.shape),
            q.new_empty(q.shape),
            k.new_empty((B, D), dtype=acc),
            k.new_empty((B,), dtype=acc),
        )

    @torch.library.register_fake("mvit2::additive_attention_backward")
    def _(grad_out, grad_qn, q, k, w_g, g, a_norm, variant: str):
        return q.new_empty(q.shape), k.new_empty(k.shape), w_g.new_empty(w_g.shape)
