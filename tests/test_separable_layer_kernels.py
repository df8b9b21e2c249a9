"""The four kernels of the whole-layer fusion (context and epilogue, forward and backward) on
every backend that has them, each held to its reference contract
``separable_layer_{context,epilogue}_{forward,backward}_reference``.

C++ backends are the ``torch.ops.mvit2`` ops on CPU or CUDA tensors; Triton is
``mvit2_kernels.triton.separable_layer``. A backend without a kernel is skipped. The layer as a
whole is specified by test_separable_layer.py; Triton's tiles by test_triton_layer.py.
"""

import importlib
import math
import os

import pytest
import torch
from conftest import BACKENDS, device_of

from mvit2_kernels import reference

KERNELS = (
    "separable_layer_context_forward",
    "separable_layer_context_backward",
    "separable_layer_epilogue_forward",
    "separable_layer_epilogue_backward",
)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (B, D or C, P, N): N = 1; D = 1; odd N and D; D a multiple of 4 with N one past a vector;
# B = 1 with N = 1000 (many vectors and a ragged one) and rows of x over 128 KiB in fp32 (the CPU
# kernels then take fewer than P rows at a time).
SHAPES = [(2, 3, 2, 1), (1, 1, 3, 20), (2, 5, 4, 7), (3, 8, 2, 17), (1, 70, 3, 1000)]
EMPTY_SHAPES = [(0, 3, 2, 5), (2, 0, 2, 5), (2, 3, 0, 5), (2, 3, 2, 0)]
# Triton without a GPU runs in its interpreter, one program at a time: small shapes only there.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernel(backend: str, name: str):
    """The backend's kernel `name`, or a skip when the backend does not have it (yet)."""
    if backend == "triton":
        try:
            module = importlib.import_module("mvit2_kernels.triton.separable_layer")
        except ImportError as e:
            pytest.skip(f"no Triton module for the layer kernels: {e}")
        fn = getattr(module, name, None)
    else:
        key = "CUDA" if backend == "cuda" else "CPU"
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"mvit2::{name}", key)
        fn = getattr(torch.ops.mvit2, name) if has else None
    if fn is None:
        pytest.skip(f"{backend} has no {name}")
    return fn


def skip_slow(backend: str, shape) -> None:
    if backend == "triton" and INTERPRETED and shape[1] * shape[3] > 500:
        pytest.skip("too slow for Triton's interpreter (test_triton_layer.py covers the tiles)")


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def randn(*size, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(device, dtype)


def context_inputs(shape, dtype, device):
    """x, w_q, and (s, x̄) from the reference. w_q is scaled so that the softmax is neither
    flat nor one-hot."""
    x = randn(*shape, dtype=dtype, device=device)
    w_q = randn(shape[1], dtype=dtype, device=device, seed=1, scale=2 * max(shape[1], 1) ** -0.5)
    s, xbar = reference.separable_layer_context_forward_reference(x, w_q)
    return x, w_q, s.contiguous(), xbar.contiguous()


def epilogue_inputs(shape, dtype, device):
    """v and grad_y in the input dtype, ctx [B, C, P] in the accumulation dtype."""
    v = randn(*shape, dtype=dtype, device=device)
    ctx = randn(*shape[:3], dtype=acc_of(dtype), device=device, seed=1)
    return v, ctx, randn(*shape, dtype=dtype, device=device, seed=2)


def assert_matches(ours, ref, dtype, equal_nan=False):
    """Same dtype, shape, contiguous. Accumulator outputs (float32/float64) and fp32/fp64 outputs
    within the usual tolerances; fp16/bf16 outputs within one unit in the last place of the
    float32 reference rounded once (the kernels round once, from float32)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape and ours.is_contiguous()
    if ref.dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(ref.dtype).eps
        torch.testing.assert_close(
            ours.float(), ref.float(), rtol=eps, atol=1e-5, equal_nan=equal_nan
        )
    elif dtype == torch.float64:
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, equal_nan=equal_nan)
    else:
        torch.testing.assert_close(ours, ref, rtol=2e-5, atol=2e-5, equal_nan=equal_nan)


def check_context(backend, x, w_q, s_ref, xbar_ref, grad_xbar, equal_nan=False):
    s, xbar = kernel(backend, KERNELS[0])(x, w_q)
    assert_matches(s, s_ref, x.dtype, equal_nan)
    assert_matches(xbar, xbar_ref, x.dtype, equal_nan)
    # The backward is given the reference's s and x̄, so it is tested on its own.
    dx, dw_q = kernel(backend, KERNELS[1])(grad_xbar, x, w_q, s_ref, xbar_ref)
    dx_ref, dw_ref = reference.separable_layer_context_backward_reference(
        grad_xbar, x, w_q, s_ref, xbar_ref
    )
    assert_matches(dx, dx_ref, x.dtype, equal_nan)
    assert_matches(dw_q, dw_ref, x.dtype, equal_nan)


def check_epilogue(backend, v, ctx, grad_y, equal_nan=False):
    y = kernel(backend, KERNELS[2])(v, ctx)
    y_ref = reference.separable_layer_epilogue_forward_reference(v, ctx)
    assert_matches(y, y_ref, v.dtype, equal_nan)
    dv, dctx = kernel(backend, KERNELS[3])(grad_y, v, ctx)
    dv_ref, dctx_ref = reference.separable_layer_epilogue_backward_reference(grad_y, v, ctx)
    assert_matches(dv, dv_ref, v.dtype, equal_nan)
    assert_matches(dctx, dctx_ref, v.dtype, equal_nan)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_context_kernels_match_the_reference(shape, dtype, backend, poison_empty):
    # Under poison_empty, an output element a kernel forgot to write is NaN and fails.
    skip_slow(backend, shape)
    x, w_q, s, xbar = context_inputs(shape, dtype, device_of(backend))
    grad_xbar = randn(*xbar.shape, dtype=xbar.dtype, device=x.device, seed=3)
    check_context(backend, x, w_q, s, xbar, grad_xbar)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_epilogue_kernels_match_the_reference(shape, dtype, backend, poison_empty):
    skip_slow(backend, shape)
    check_epilogue(backend, *epilogue_inputs(shape, dtype, device_of(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_dims_give_the_reference_results(shape, backend, poison_empty):
    """N = 0: x̄, dw_q and dctx are empty sums, 0. D = 0: every score is 0, so s = 1/N. The
    rest is empty. Poisoned allocations make a result left unwritten fail."""
    x, w_q, s, xbar = context_inputs(shape, torch.float32, device_of(backend))
    check_context(backend, x, w_q, s, xbar, torch.ones_like(xbar))
    check_epilogue(backend, *epilogue_inputs(shape, torch.float32, device_of(backend)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_non_finite_values_propagate_like_the_reference(dtype, backend):
    x, w_q, _, _ = context_inputs((1, 5, 4, 37), dtype, device_of(backend))
    w_q = w_q.abs()
    x[0, 0, 0, :20] = float("-inf")  # row 0: leading -inf scores before finite ones
    x[0, 2, 1, 35] = float("nan")  # row 1: a NaN in the ragged last vector poisons the row
    x[0, 1, 2, :] = float("-inf")  # row 2: every score -inf: torch.softmax gives NaN
    x[0, 4, 3, 6] = float("inf")  # row 3: a score of +inf
    s, xbar = reference.separable_layer_context_forward_reference(x, w_q)
    assert torch.isfinite(s[0, 0]).all() and s[0, 0, :20].eq(0).all()  # the cases hold
    assert s[0, 1].isnan().all() and s[0, 2].isnan().all()
    grad_xbar = randn(*xbar.shape, dtype=xbar.dtype, device=x.device, seed=3)
    check_context(backend, x, w_q, s, xbar, grad_xbar, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue_non_finite_values_follow_relu_and_its_backward(dtype, backend):
    """relu(NaN) = NaN and passes the gradient; v <= 0 stops it even where g * ctx is inf."""
    v, ctx, grad_y = epilogue_inputs((1, 2, 2, 37), dtype, device_of(backend))
    v[0, 0, 0, 3], v[0, 0, 0, 36], v[0, 1, 1, 7] = float("nan"), float("-inf"), float("inf")
    ctx[0, 1, 1] = 0.0  # inf * 0
    ctx[0, 1, 0] = float("inf")
    v[0, 1, 0, :10] = 0.0  # relu(0) * inf, and a select, not 0 * inf, in the backward
    grad_y[0, 0, 1, 5] = float("inf")
    dv_ref, _ = reference.separable_layer_epilogue_backward_reference(grad_y, v, ctx)
    assert dv_ref[0, 1, 0, :10].eq(0).all() and dv_ref[0, 0, 0, 3].isfinite()  # the cases hold
    check_epilogue(backend, v, ctx, grad_y, equal_nan=True)


NON_FINITE = [float("nan"), float("inf"), float("-inf")]
# The context backward takes sum_n s[n] ds[n] as dx̄ · x̄ (docs/layer_fusion.md), equal in real
# arithmetic, not once an inf in dx̄ makes ds infinite: ds[n] - dot is then inf - inf only where
# the signs agree, where autograd's sum over n of mixed-sign infs is NaN everywhere.
_DOT_IDENTITY = pytest.mark.xfail(
    strict=True, reason="dq of a row with an infinite dx̄: dx̄ · x̄ stands for sum_n s ds"
)


def _contracts(backend, kind):
    """(forward, backward) of the context or epilogue kernels, or their reference contracts."""
    names = KERNELS[:2] if kind == "context" else KERNELS[2:]
    if backend == "reference":
        return tuple(getattr(reference, f"{name}_reference") for name in names)
    return tuple(kernel(backend, name) for name in names)


def _one_non_finite_cases(inputs, infinite_dot=()):
    for where in inputs:
        for value in NON_FINITE:
            marks = [_DOT_IDENTITY] if where in infinite_dot and math.isinf(value) else []
            yield pytest.param(where, value, marks=marks, id=f"{where}-{value}")


def assert_nan_where_autograd_has_it(got, expected, names):
    for name, a, b in zip(names, got, expected, strict=True):
        differ = a.isnan() ^ b.isnan()
        assert not differ.any(), f"{name}: NaN on one side only at {differ.nonzero().tolist()}"
        torch.testing.assert_close(a, b.to(a.dtype), equal_nan=True, rtol=2e-5, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize(
    ("where", "value"), list(_one_non_finite_cases(("x", "w_q", "grad_xbar"), ("grad_xbar",)))
)
def test_context_one_non_finite_element_gives_autograds_nan_pattern(backend, where, value):
    """docs/design.md §5 for x, w_q and dx̄ in turn: s, x̄, dx and dw_q have NaN exactly where
    autograd through the forward contract has it (a max that drops a NaN score must not leave its
    softmax row finite), and equal values elsewhere. Row p = 1 only; D = 18 ends in single channels
    on CPU, in a third D tile under Triton's interpreter, N = 37 in a ragged vector or tile."""
    device = "cpu" if backend == "reference" else device_of(backend)
    x, w_q, _, xbar = context_inputs((1, 18, 2, 37), torch.float32, device)
    grad_xbar = randn(*xbar.shape, device=device, seed=3)
    tensors = {"x": x, "w_q": w_q, "grad_xbar": grad_xbar}
    tensors[where][{"x": (0, 17, 1, 35), "w_q": (17,), "grad_xbar": (0, 17, 1)}[where]] = value
    x, w_q = x.requires_grad_(), w_q.requires_grad_()
    s_ref, xbar_ref = reference.separable_layer_context_forward_reference(x, w_q)
    expected = (s_ref, xbar_ref, *torch.autograd.grad(xbar_ref, (x, w_q), grad_xbar))
    x, w_q = x.detach(), w_q.detach()
    forward, backward = _contracts(backend, "context")
    s, xbar = forward(x, w_q)
    got = (s, xbar, *backward(grad_xbar, x, w_q, s, xbar))
    assert_nan_where_autograd_has_it(got, expected, ("s", "xbar", "dx", "dw_q"))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize(("where", "value"), list(_one_non_finite_cases(("v", "ctx", "grad_y"))))
def test_epilogue_one_non_finite_element_gives_autograds_nan_pattern(backend, where, value):
    """docs/design.md §5 for v, ctx and grad_y in turn: y, dv and dctx have NaN exactly where
    autograd through relu(v) * ctx has it (relu keeps NaN, its backward passes the gradient at a NaN
    v and blocks it, 0 and not 0 * inf, where v <= 0), and equal values elsewhere."""
    device = "cpu" if backend == "reference" else device_of(backend)
    v, ctx, grad_y = epilogue_inputs((1, 3, 2, 37), torch.float32, device)
    tensors = {"v": v, "ctx": ctx, "grad_y": grad_y}
    tensors[where][{"v": (0, 2, 1, 35), "ctx": (0, 2, 1), "grad_y": (0, 2, 1, 35)}[where]] = value
    v, ctx = v.requires_grad_(), ctx.requires_grad_()
    y_ref = reference.separable_layer_epilogue_forward_reference(v, ctx)
    expected = (y_ref, *torch.autograd.grad(y_ref, (v, ctx), grad_y))
    v, ctx = v.detach(), ctx.detach()
    forward, backward = _contracts(backend, "epilogue")
    got = (forward(v, ctx), *backward(grad_y, v, ctx))
    assert_nan_where_autograd_has_it(got, expected, ("y", "dv", "dctx"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_kernels_are_deterministic(backend):
    """dw_q sums the rows' partials in a fixed order: on CPU the same bits on 1 thread and 2
    (9 rows of 3 batches: the threads' halves split a batch), elsewhere the same bits twice."""
    shape = (2, 9, 3, 33) if backend == "triton" and INTERPRETED else (3, 70, 3, 256)
    x, w_q, s, xbar = context_inputs(shape, torch.float32, device_of(backend))
    grad_xbar = randn(*xbar.shape, device=x.device, seed=3)
    forward, backward = kernel(backend, KERNELS[0]), kernel(backend, KERNELS[1])
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2) if backend == "cpu" else (threads, threads):
            torch.set_num_threads(n)
            runs.append((*forward(x, w_q), *backward(grad_xbar, x, w_q, s, xbar)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def bad_calls(device):
    """(kernel, arguments, the argument the error must name) for every kind of bad input."""
    x, w_q, s, xbar = context_inputs((2, 5, 3, 8), torch.float32, device)
    v, ctx, g = epilogue_inputs((2, 5, 3, 8), torch.float32, device)
    fwd, bwd, epi, epi_bwd = KERNELS
    return [
        (fwd, (x[0], w_q), "x"),  # 3-D
        (fwd, (x.to(torch.int32), w_q.to(torch.int32)), "x"),  # not float
        (fwd, (x.transpose(2, 3), w_q), "x"),  # not contiguous
        (fwd, (x, w_q[:4]), "w_q"),  # wrong length
        (fwd, (x, w_q.double()), "w_q"),  # not x's dtype
        (bwd, (xbar, x, w_q, s[:, :2], xbar), "s"),  # wrong shape
        (bwd, (xbar.half(), x, w_q, s, xbar), "grad_xbar"),  # not the accumulation dtype
        (bwd, (xbar, x, w_q, s, xbar.transpose(0, 2).contiguous().transpose(0, 2)), "xbar"),
        (epi, (v, ctx[..., :2]), "ctx"),
        (epi, (v, ctx.double()), "ctx"),
        (epi, (v.transpose(2, 3), ctx), "v"),
        (epi_bwd, (g[:1], v, ctx), "grad_y"),
        (epi_bwd, (g.double(), v, ctx), "grad_y"),
        (epi_bwd, (g.transpose(2, 3), v, ctx), "grad_y"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_calls("cpu"))))
def test_bad_inputs_raise_naming_the_argument(case, backend):
    name, args, arg = bad_calls(device_of(backend))[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=rf"\b{arg}\b"):
        kernel(backend, name)(*args)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, backend):
    x, w_q, s, xbar = context_inputs((2, 9, 2, 17), dtype, device_of(backend))
    v, ctx, grad_y = epilogue_inputs((2, 3, 2, 17), dtype, device_of(backend))
    for name, args in zip(
        KERNELS,
        ((x, w_q), (torch.randn_like(xbar), x, w_q, s, xbar), (v, ctx), (grad_y, v, ctx)),
        strict=True,
    ):
        torch.library.opcheck(kernel(backend, name), args)
