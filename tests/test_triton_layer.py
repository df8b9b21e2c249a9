"""The Triton kernels of the whole-layer fusion, each held to its reference contract
(``separable_layer_{context,epilogue}_{forward,backward}_reference``).

Without a GPU this runs through Triton's interpreter with fixed tiles: BLOCK_D = 8, BLOCK_N = 16
for the context kernels, BLOCK_R = 4 rows by BLOCK_N = 16 for the epilogue. The shapes sit on and
across those tile edges while keeping the grids small. The layer as a whole is specified by
test_separable_layer.py.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import device_of
from fixtures.optional import importorskip

from mvit2_kernels import available_backends
from mvit2_kernels.reference import (
    separable_layer_context_backward_reference,
    separable_layer_context_forward_reference,
    separable_layer_epilogue_backward_reference,
    separable_layer_epilogue_forward_reference,
)

if "triton" not in available_backends():
    pytest.skip("triton cannot launch here", allow_module_level=True)

from test_triton import assert_close_in

from mvit2_kernels.kernels import kernel
from mvit2_kernels.triton.separable_layer import (
    separable_layer_context_backward,
    separable_layer_context_forward,
    separable_layer_epilogue_backward,
    separable_layer_epilogue_forward,
)

DEVICE = device_of("triton")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (B, D, P, N): N = 1; D = 1 with N over two tiles; D one past a tile with N one short of one;
# both exactly one tile; both ragged over three tiles.
CONTEXT_SHAPES = [(2, 3, 2, 1), (1, 1, 3, 20), (1, 9, 2, 15), (2, 8, 1, 16), (1, 17, 2, 33)]
# (B, C, P, N): rows B·C·P of 12, 1, 15 and 6 (ragged row tiles), N = 1, one tile, over three.
EPILOGUE_SHAPES = [(2, 3, 2, 1), (1, 1, 1, 17), (1, 5, 3, 16), (2, 3, 1, 33)]
EMPTY_SHAPES = [(0, 3, 2, 5), (2, 0, 2, 5), (2, 3, 0, 5), (2, 3, 2, 0)]


def randn(*size, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def context_inputs(shape, dtype):
    """x, w_q, and the forward's (s, x̄) from the reference, made contiguous as the op's are.
    w_q is scaled so that the softmax is neither flat nor one-hot."""
    B, D, P, N = shape
    x = randn(B, D, P, N, dtype=dtype)
    w_q = randn(D, dtype=dtype, seed=1, scale=2 * max(D, 1) ** -0.5)
    s, xbar = (t.contiguous() for t in separable_layer_context_forward_reference(x, w_q))
    return x, w_q, s, xbar


def epilogue_inputs(shape, dtype):
    """v, ctx (acc dtype) and grad_y, with v and grad_y in the input dtype."""
    B, C, P, _ = shape
    return (randn(*shape, dtype=dtype), randn(B, C, P, dtype=acc_of(dtype), seed=1),
            randn(*shape, dtype=dtype, seed=2))


def assert_acc_close(ours, ref, **kwargs):
    """A float32/float64 result: same dtype and shape, contiguous, close."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape and ours.is_contiguous()
    torch.testing.assert_close(ours, ref, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CONTEXT_SHAPES)
def test_context_forward_matches_the_reference(shape, dtype, poison_empty):
    # Under poison_empty, an element of s or x̄ the kernel forgot is NaN and fails.
    x, w_q, s_ref, xbar_ref = context_inputs(shape, dtype)
    s, xbar = separable_layer_context_forward(x, w_q)
    assert_acc_close(s, s_ref)
    assert_acc_close(xbar, xbar_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CONTEXT_SHAPES)
def test_context_backward_matches_the_reference(shape, dtype, poison_empty):
    x, w_q, s, xbar = context_inputs(shape, dtype)
    grad_xbar = randn(*xbar.shape, dtype=xbar.dtype, seed=3)
    dx, dw_q = separable_layer_context_backward(grad_xbar, x, w_q, s, xbar)
    dx_ref, dw_ref = separable_layer_context_backward_reference(grad_xbar, x, w_q, s, xbar)
    assert_close_in(dtype, dx, dx_ref)
    assert_acc_close(dw_q, dw_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
def test_epilogue_forward_and_backward_match_the_reference(shape, dtype, poison_empty):
    v, ctx, grad_y = epilogue_inputs(shape, dtype)
    y = separable_layer_epilogue_forward(v, ctx)
    assert_close_in(dtype, y, separable_layer_epilogue_forward_reference(v, ctx))
    dv, dctx = separable_layer_epilogue_backward(grad_y, v, ctx)
    dv_ref, dctx_ref = separable_layer_epilogue_backward_reference(grad_y, v, ctx)
    assert_close_in(dtype, dv, dv_ref)
    assert_acc_close(dctx, dctx_ref)


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_dims_give_the_reference_results(shape, poison_empty):
    """N = 0: x̄, dw_q and dctx are empty sums, 0; D = 0: the scores are 0, s = 1/N; the rest
    is empty. Poisoned allocations make a result left unwritten fail."""
    x, w_q, s_ref, xbar_ref = context_inputs(shape, torch.float32)
    s, xbar = separable_layer_context_forward(x, w_q)
    assert_acc_close(s, s_ref)
    assert_acc_close(xbar, xbar_ref)
    grad_xbar = torch.ones_like(xbar)
    dx, dw_q = separable_layer_context_backward(grad_xbar, x, w_q, s, xbar)
    dx_ref, dw_ref = separable_layer_context_backward_reference(grad_xbar, x, w_q, s, xbar)
    assert dx.shape == dx_ref.shape
    assert_acc_close(dw_q, dw_ref)
    v, ctx, grad_y = epilogue_inputs(shape, torch.float32)
    assert separable_layer_epilogue_forward(v, ctx).shape == v.shape
    dv, dctx = separable_layer_epilogue_backward(grad_y, v, ctx)
    assert dv.shape == v.shape
    assert_acc_close(dctx, separable_layer_epilogue_backward_reference(grad_y, v, ctx)[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
def test_context_non_finite_values_propagate_like_the_reference():
    x, w_q, _, _ = context_inputs((1, 4, 3, 40), torch.float32)
    w_q = w_q.abs()
    x[0, 0, 0, :16] = float("-inf")  # row 0: a whole tile of -inf scores before finite ones
    x[0, 2, 1, 35] = float("nan")  # row 1: NaN in the last tile poisons the whole softmax
    x[0, 1, 2, 5] = float("inf")  # row 2: a score of +inf
    s, xbar = separable_layer_context_forward(x, w_q)
    s_ref, xbar_ref = separable_layer_context_forward_reference(x, w_q)
    assert torch.isfinite(s_ref[0, 0]).all() and s_ref[0, 1].isnan().all()  # the cases hold
    torch.testing.assert_close(s, s_ref, equal_nan=True)
    torch.testing.assert_close(xbar, xbar_ref, equal_nan=True)
    grad_xbar = randn(*xbar.shape, seed=3)
    grads = separable_layer_context_backward(grad_xbar, x, w_q, s, xbar)
    grads_ref = separable_layer_context_backward_reference(grad_xbar, x, w_q, s, xbar)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_epilogue_non_finite_values_follow_relu_and_its_backward():
    """relu(NaN) = NaN and passes the gradient; v <= 0 stops it even where g * ctx is inf."""
    v, ctx, grad_y = epilogue_inputs((1, 2, 2, 20), torch.float32)
    v[0, 0, 0, 3], v[0, 0, 0, 4], v[0, 1, 1, 7] = float("nan"), float("-inf"), float("inf")
    ctx[0, 1, 1] = 0.0  # inf * 0
    ctx[0, 1, 0] = float("inf")
    v[0, 1, 0, :10] = 0.0  # relu(0) * inf, and a select, not 0 * inf, in the backward
    y = separable_layer_epilogue_forward(v, ctx)
    torch.testing.assert_close(y, separable_layer_epilogue_forward_reference(v, ctx),
                               equal_nan=True)
    grads = separable_layer_epilogue_backward(grad_y, v, ctx)
    grads_ref = separable_layer_epilogue_backward_reference(grad_y, v, ctx)
    assert grads_ref[0][0, 1, 0, :10].eq(0).all()  # the case holds
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, equal_nan=True)


def test_context_backward_is_deterministic():
    """dw_q sums partials over every row: in a fixed order, so two runs agree bit for bit."""
    x, w_q, s, xbar = context_inputs((2, 17, 3, 33), torch.float32)
    grad_xbar = randn(*xbar.shape, seed=3)
    runs = [separable_layer_context_backward(grad_xbar, x, w_q, s, xbar) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_ops_are_what_the_layer_looks_up():
    for name, direction, fn in (
        ("separable_layer_context", "forward", separable_layer_context_forward),
        ("separable_layer_context", "backward", separable_layer_context_backward),
        ("separable_layer_epilogue", "forward", separable_layer_epilogue_forward),
        ("separable_layer_epilogue", "backward", separable_layer_epilogue_backward),
    ):
        assert kernel(f"{name}_{direction}", "triton") is fn
        assert getattr(torch.ops.mvit2, f"{name}_{direction}_triton") is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x, w_q, s, xbar = context_inputs((2, 9, 2, 17), dtype)
    v, ctx, grad_y = epilogue_inputs((2, 3, 2, 17), dtype)
    ops = torch.ops.mvit2
    torch.library.opcheck(ops.separable_layer_context_forward_triton, (x, w_q))
    torch.library.opcheck(ops.separable_layer_context_backward_triton,
                          (torch.randn_like(xbar), x, w_q, s, xbar))
    torch.library.opcheck(ops.separable_layer_epilogue_forward_triton, (v, ctx))
    torch.library.opcheck(ops.separable_layer_epilogue_backward_triton, (grad_y, v, ctx))


def _context(dtype=torch.float32, N=5):
    x, w_q, s, xbar = context_inputs((2, 4, 3, N), dtype)
    return {"grad_xbar": torch.ones_like(xbar), "x": x, "w_q": w_q, "s": s, "xbar": xbar}


def _epilogue(dtype=torch.float32):
    v, ctx, grad_y = epilogue_inputs((2, 4, 3, 5), dtype)
    return {"grad_y": grad_y, "v": v, "ctx": ctx}


def _with(make, **changes):
    """The valid arguments ``make()`` gives, with some replaced by functions of them."""
    def args():
        a = make()
        a.update({k: f(a) for k, f in changes.items()})
        return a
    return args


CONTEXT_FWD = separable_layer_context_forward, ("x", "w_q")
CONTEXT_BWD = separable_layer_context_backward, ("grad_xbar", "x", "w_q", "s", "xbar")
EPILOGUE_FWD = separable_layer_epilogue_forward, ("v", "ctx")
EPILOGUE_BWD = separable_layer_epilogue_backward, ("grad_y", "v", "ctx")


@pytest.mark.parametrize(
    ("op", "args", "error", "match"),
    [
        (CONTEXT_FWD, _with(_context, x=lambda a: a["x"][0]), ValueError, "x must be a 4-D"),
        (CONTEXT_FWD, _with(_context, x=lambda a: a["x"].int()), TypeError,
         "x must be float16, bfloat16"),
        (CONTEXT_FWD, _with(_context, w_q=lambda a: a["w_q"].double()), TypeError,
         "w_q has dtype torch.float64 but x has torch.float32"),
        (CONTEXT_FWD, _with(_context, w_q=lambda a: a["w_q"][:3]), ValueError,
         r"w_q must have shape \[4\], got \[3\]"),
        (CONTEXT_FWD, _with(_context, x=lambda a: a["x"].transpose(2, 3)), ValueError,
         "x must be contiguous"),
        (CONTEXT_BWD, _with(_context, s=lambda a: a["s"].half(), x=lambda a: a["x"].half(),
                            w_q=lambda a: a["w_q"].half()), TypeError,
         r"s must have dtype torch.float32 \(the accumulation dtype of x\), got torch.float16"),
        (CONTEXT_BWD, _with(_context, xbar=lambda a: a["xbar"].double()), TypeError,
         "xbar must have dtype torch.float32"),
        (CONTEXT_BWD, _with(_context, grad_xbar=lambda a: a["grad_xbar"][:, :3]), ValueError,
         r"grad_xbar must have shape \[2, 4, 3\], got \[2, 3, 3\]"),
        (CONTEXT_BWD, _with(_context, s=lambda a: _context(N=6)["s"]), ValueError,
         r"s must have shape \[2, 3, 5\]"),
        (CONTEXT_BWD, _with(_context, xbar=lambda a: a["xbar"].mT.contiguous().mT), ValueError,
         "xbar must be contiguous"),
        (EPILOGUE_FWD, _with(_epilogue, v=lambda a: a["v"][0]), ValueError, "v must be a 4-D"),
        (EPILOGUE_FWD, _with(_epilogue, ctx=lambda a: a["ctx"][..., None]), ValueError,
         r"ctx must have shape \[2, 4, 3\], got \[2, 4, 3, 1\]"),
        (EPILOGUE_FWD, _with(_epilogue, ctx=lambda a: a["ctx"].double()), TypeError,
         "ctx must have dtype torch.float32"),
        (EPILOGUE_FWD, _with(_epilogue, v=lambda a: a["v"].mT.contiguous().mT), ValueError,
         "v must be contiguous"),
        (EPILOGUE_BWD, _with(_epilogue, grad_y=lambda a: a["grad_y"].double()), TypeError,
         "grad_y has dtype torch.float64 but v has torch.float32"),
        (EPILOGUE_BWD, _with(_epilogue, grad_y=lambda a: a["grad_y"][:, :2]), ValueError,
         r"grad_y must have shape \[2, 4, 3, 5\]"),
        (EPILOGUE_BWD, _with(_epilogue, grad_y=lambda a: a["grad_y"].mT.contiguous().mT),
         ValueError, "grad_y must be contiguous"),
    ],
)
def test_bad_arguments_raise_and_name_the_argument(op, args, error, match):
    fn, names = op
    a = args()
    with pytest.raises(error, match=match):
        fn(*(a[n] for n in names))


# Compiles every kernel for sm_90 (Hopper) without a GPU, through the whole pipeline down to a
# cubin (Triton bundles ptxas): in every dtype with the first autotuning config, and with every
# config in float32. What the interpreter accepts need not compile (layouts, fp64 maths).
_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mvit2_kernels.triton import separable_layer as L

ACC = {"s_ptr", "xbar_ptr", "gx_ptr", "dq_ptr", "dwp_ptr", "ctx_ptr", "dctx_ptr"}
for name in ("context_forward", "context_backward", "epilogue_forward", "epilogue_backward"):
    tuner = getattr(L, f"_separable_layer_{name}_kernel")
    for dtype in ("fp64", "fp32", "fp16", "bf16"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for config in tuner.configs if dtype == "fp32" else tuner.configs[:1]:
            sig = {a: "constexpr" if a in config.kwargs else
                   ("*" + (acc if a in ACC else dtype)) if a.endswith("_ptr") else "i32"
                   for a in tuner.fn.arg_names}
            kernel = triton.compile(ASTSource(tuner.fn, sig, config.kwargs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": config.num_warps})
            assert kernel.asm["cubin"], (name, dtype, config)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90():
    importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
