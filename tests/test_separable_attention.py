"""Specification of ``separable_attention``: every backend matches the reference
(docs/design.md §1).

Parametrized over the backends usable here (conftest.BACKENDS); the reference is the oracle.
"""

import math
import os

import pytest
import torch
from conftest import BACKENDS, device_of
from utils import assert_close, make_qkv, randn

from mvit2_kernels import available_backends, separable_attention
from mvit2_kernels.kernels import kernel
from mvit2_kernels.reference import (
    separable_attention_backward_reference,
    separable_attention_forward_reference,
    separable_attention_reference,
)

# (B, C, P, N): odd N, N = 1, C = 1, B = 1, N beyond one tile, N in the thousands, and B large
# enough that the CPU kernel keeps all channels of a batch in one task.
SHAPES = [(2, 3, 4, 37), (1, 1, 1, 1), (1, 8, 4, 1), (3, 5, 2, 130), (1, 2, 1, 3000), (64, 3, 2, 5)]
# Triton's tiles (the interpreter's: 16 channels by 64 patches): N = 1; odd N; N one short of,
# equal to and one past a tile; N over 3 tiles with C over 2 channel tiles; C = 1; C = 17 and 40
# (channel tiles with a ragged last one).
TILE_SHAPES = [(2, 3, 2, 1), (1, 5, 3, 37), (1, 4, 2, 63), (1, 1, 2, 64), (2, 17, 1, 65),
               (1, 20, 2, 150), (1, 40, 1, 9)]
EMPTY_SHAPES = [(0, 4, 4, 16), (2, 0, 4, 16), (2, 4, 0, 16), (2, 4, 4, 0)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["views", "separate", "transposed", "permuted", "strided_n"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run(q, k, v, leaves, backend, grad_y=None):
    """y and, given grad_y, the gradients w.r.t. the leaves (the reference when no backend)."""
    if backend is None:
        y = separable_attention_reference(q, k, v)
    else:
        y = separable_attention(q, k, v, backend=backend)
    return y, (None if grad_y is None else torch.autograd.grad(y, leaves, grad_y))


def ops(backend):
    """The forward and backward ops of a backend, or the reference's contract functions."""
    if backend == "reference":
        return separable_attention_forward_reference, separable_attention_backward_reference
    return (kernel("separable_attention_forward", backend),
            kernel("separable_attention_backward", backend))


def backend_and_reference(backend, q, k, v, grad_y):
    """(y, dq, dk, dv) from the backend and from autograd through the reference, the latter in
    float32 for fp16/bf16 inputs (the kernels' accumulation dtype)."""
    y = separable_attention(q, k, v, backend=backend)
    ours = (y, *torch.autograd.grad(y, (q, k, v), grad_y))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q32, k32, v32 = (t.detach().to(acc).requires_grad_() for t in (q, k, v))
    y_ref = separable_attention_reference(q32, k32, v32)
    ref = (y_ref, *torch.autograd.grad(y_ref, (q32, k32, v32), grad_y.to(acc)))
    return ours, tuple(r.to(q.dtype) for r in ref)


def leaf_qkv(shape, dtype, device, layout="views", seed=0):
    """q, k, v as leaves of their own (views of one storage in the ``views`` layout)."""
    q, k, v, _ = make_qkv(shape, dtype, device, layout, seed=seed)
    return tuple(t.detach().requires_grad_() for t in (q, k, v))


def test_available_backends_lists_reference_and_cpu():
    found = available_backends()
    assert found[-1] == "reference"
    assert "cpu" in found  # the extension is built in every test run (README, .ci/run)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["views", "separate", "transposed"])
def test_forward_and_backward_match_reference(backend, dtype, shape, layout):
    if (
        backend == "triton"
        and device_of(backend) == "cpu"
        and (layout != "views" or dtype == torch.float16)
    ):
        pytest.skip("interpreter: layouts and fp16 are covered on its tiles below")
    device = device_of(backend)
    q, k, v, leaves = make_qkv(shape, dtype, device, layout, requires_grad=True)
    grad_y = torch.randn(k.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y, grads = run(q, k, v, leaves, backend, grad_y)
    y_ref, grads_ref = run(*make_qkv(shape, dtype, device, layout, True), None, grad_y)
    y64, grads64 = run(*make_qkv(shape, torch.float64, device, layout, True), None, grad_y.double())
    assert y.dtype == dtype and y.shape == k.shape and y.is_contiguous()
    assert_close(y, y_ref, exact=y64, slack="separable", name="y", layout=False)
    for g, g_ref, g64 in zip(grads, grads_ref, grads64, strict=True):
        assert g.dtype == dtype
        assert_close(g, g_ref, exact=g64, slack="separable", name="grad", layout=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_past_the_tile_cap_match_reference(backend):
    """C = 1100 in bf16: past the 1024 channels one tile holds; B = 128: many rows of many
    channel tiles (one row under Triton's interpreter, where each tile is a program run alone)."""
    shape = (1, 1100, 1, 8) if backend == "triton" and INTERPRETED else (128, 1100, 4, 8)
    device = device_of(backend)
    grad_y = randn(*shape, dtype=torch.bfloat16, device=device, seed=1)
    y, grads = run(*make_qkv(shape, torch.bfloat16, device, "views", True), backend, grad_y)
    y_ref, grads_ref = run(*make_qkv(shape, torch.bfloat16, device, "views", True), None, grad_y)
    y64, grads64 = run(*make_qkv(shape, torch.float64, device, "views", True), None,
                       grad_y.double())
    assert_close(y, y_ref, exact=y64, slack="separable", name="y", layout=False)
    assert_close(grads[0], grads_ref[0], exact=grads64[0], slack="separable", name="dqkv",
                 layout=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape", [(2, 3, 2, 5), (1, 1, 1, 1), (1, 2, 1, 70), (1, 2, 1, 5), (1, 18, 2, 70)]
)
def test_gradcheck_float64(backend, shape):
    """The full Jacobian on small shapes; a random projection (fast mode) across Triton's channel
    and N tiles, where the full one would take minutes in its interpreter."""
    q, k, v, _ = make_qkv(shape, torch.float64, device_of(backend), "separate", True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: separable_attention(q, k, v, backend=backend), (q, k, v),
        fast_mode=shape[1] > 2,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_inputs_give_empty_results(backend, shape):
    q, k, v, _ = make_qkv(shape, torch.float32, device_of(backend), "separate", True)
    y = separable_attention(q, k, v, backend=backend)
    assert y.shape == k.shape
    y.sum().backward()
    torch.testing.assert_close(q.grad, torch.zeros_like(q))
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_fully_written(backend, poison_empty):
    """Every element of y, dq, dk, dv is written: with NaN-filled allocations, none stays NaN."""
    q, k, v, leaves = make_qkv((2, 5, 3, 67), torch.float32, device_of(backend), "views", True)
    y, (grad,) = run(q, k, v, leaves, backend, torch.ones(k.shape))
    assert not y.isnan().any() and not grad.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [9, 64])  # 64: the values inside full vectors
def test_non_finite_values_propagate_like_the_reference(N, backend):
    """Forward and backward give what autograd gives on the reference, NaN and inf included."""

    def inputs():
        q, k, v, _ = make_qkv((1, 3, 4, N), torch.float32, device_of(backend), "separate")
        q[0, 0, 0, 4] = float("inf")  # row 0: softmax of +inf is NaN everywhere
        k[0, 1, 1, 2] = float("nan")  # row 1: one channel's context is NaN
        v[0, 2, 2, 5] = float("nan")  # relu(NaN) is NaN, and its gradient passes
        v[0, 0, 2, 6] = float("-inf")
        k[0, 0, 3, 1] = float("inf")  # row 3: ctx = inf; where v <= 0, dv is 0, not 0 * inf
        return [t.requires_grad_() for t in (q, k, v)]

    grad_y = torch.randn(1, 3, 4, N, generator=torch.Generator().manual_seed(2)).to(
        device_of(backend)
    )
    y, grads = run(*(qkv := inputs()), qkv, backend, grad_y)
    y_ref, grads_ref = run(*(qkv := inputs()), qkv, None, grad_y)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, equal_nan=True)


NON_FINITE = [float("nan"), float("inf"), float("-inf")]
NON_FINITE_INPUTS = ["q", "k", "v", "grad_y"]
# The backward takes sum_n s[n] ds[n] as sum_c dctx[c] ctx[c] (docs/design.md §1), equal in real
# arithmetic, not once an inf in v or grad_y makes a dctx infinite: ds[n] - dot is then inf - inf
# only where the signs agree, where autograd's sum over n of mixed-sign infs is NaN everywhere.
_DOT_IDENTITY = pytest.mark.xfail(
    strict=True, reason="dq of a row with an infinite dctx: sum_c dctx ctx stands for sum_n s ds"
)


def _non_finite_cases():
    for where in NON_FINITE_INPUTS:
        for value in NON_FINITE:
            infinite_dctx = {"v": value == math.inf, "grad_y": math.isinf(value)}.get(where)
            marks = [_DOT_IDENTITY] if infinite_dctx else []
            yield pytest.param(where, value, marks=marks, id=f"{where}-{value}")


def one_non_finite(where, value, device, shape=(1, 18, 2, 70)):
    """q, k, v, grad_y in float32 with `value` at one element of `where`, in row p = 1 (row 0
    stays finite), past the CPU kernel's last full vector and in Triton's second N tile and
    second channel tile (the interpreter's tiles are 16 channels by 64)."""
    q, k, v = (t.detach().clone() for t in make_qkv(shape, torch.float32, device, "separate")[:3])
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    tensors = dict(zip(NON_FINITE_INPUTS, (q, k, v, grad_y), strict=True))
    tensors[where][0, 0 if where == "q" else 17, 1, 66] = value
    return tensors


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize(("where", "value"), list(_non_finite_cases()))
def test_one_non_finite_element_gives_autograds_nan_pattern(backend, where, value):
    """docs/design.md §5 for each input and grad_y in turn: y, the saved ctx and dq, dk, dv have NaN
    exactly where autograd through the reference has it (a NaN score makes its softmax row NaN:
    a max that drops NaN must not hide it), and equal values elsewhere."""
    t = one_non_finite(where, value, "cpu" if backend == "reference" else device_of(backend))
    q, k, v = (t[name].requires_grad_() for name in ("q", "k", "v"))
    y = separable_attention_reference(q, k, v)
    expected = (y, *torch.autograd.grad(y, (q, k, v), t["grad_y"]))
    q, k, v = (x.detach() for x in (q, k, v))
    fwd, bwd = ops(backend)
    y, ctx = fwd(q, k, v)
    got = (y, *bwd(t["grad_y"], q, k, v, ctx))
    for name, a, b in zip(("y", "dq", "dk", "dv"), got, expected, strict=True):
        differ = a.isnan() ^ b.isnan()
        assert not differ.any(), f"{name}: NaN on one side only at {differ.nonzero().tolist()}"
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    ctx_ref = separable_attention_forward_reference(q, k, v)[1]
    torch.testing.assert_close(ctx, ctx_ref, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    """Two runs agree bit for bit: many channel tiles (under Triton's interpreter 3, of 16)
    whose partial ds are summed in a fixed order."""
    shape = (1, 40, 2, 130) if backend == "triton" and INTERPRETED else (1, 64, 2, 300)
    q, k, v, leaves = make_qkv(shape, torch.float32, device_of(backend), "views", True)
    grad_y = torch.randn(k.shape, device=k.device)
    first, second = ((y, *grads) for y, grads in (run(q, k, v, leaves, backend, grad_y)
                                                  for _ in range(2)))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_cpu_results_do_not_depend_on_the_thread_count():
    q, k, v, leaves = make_qkv((1, 64, 2, 300), torch.float32, "cpu", "views", True)
    grad_y = torch.randn(k.shape)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, grads = run(q, k, v, leaves, "cpu", grad_y)
            results.append((y, *grads))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    q, k, v, _ = make_qkv((1, 2, 1, 4), torch.float64, device_of(backend), "separate", True)
    y = separable_attention(q, k, v, backend=backend)
    (dq,) = torch.autograd.grad(y.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [512, 509])  # rows aligned for streaming stores, and not
def test_cpu_outputs_beyond_the_cache_match_the_reference(dtype, N):
    """Outputs of 8 MiB and more are written with non-temporal stores on CPU."""
    shape = (32, 128, 4, N)
    q, k, v, leaves = make_qkv(shape, dtype, "cpu", "views", True)
    grad_y = torch.randn(k.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y, grads = run(q, k, v, leaves, "cpu", grad_y)
    y64, grads64 = run(*make_qkv(shape, torch.float64, "cpu", "views", True), None, grad_y.double())
    y_ref, grads_ref = run(*make_qkv(shape, dtype, "cpu", "views", True), None, grad_y)
    assert y.nbytes >= 8 << 20
    assert_close(y, y_ref, exact=y64, slack="separable", name="y", layout=False)
    for g, g_ref, g64 in zip(grads, grads_ref, grads64, strict=True):
        assert_close(g, g_ref, exact=g64, slack="separable", name="grad", layout=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TILE_SHAPES)
def test_rounds_once_from_the_float32_reference(shape, dtype, backend, poison_empty):
    """y, dq, dk, dv within one unit in the last place of the float32 reference rounded to
    fp16/bf16 (the kernels accumulate in float32 and round once), on and across the tile edges.
    Under poison_empty, an output or workspace element the kernels forgot is NaN and fails."""
    device = device_of(backend)
    q, k, v = leaf_qkv(shape, dtype, device)
    grad_y = randn(*shape, dtype=dtype, device=device, seed=1)
    ours, ref = backend_and_reference(backend, q, k, v, grad_y)
    for name, a, r in zip(("y", "dq", "dk", "dv"), ours, ref, strict=True):
        assert_close(a, r, table="rounded_once", name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs_match_the_reference(layout, backend, poison_empty):
    """Every layout the kernels read, with grad_y strided too (channels last)."""
    device = device_of(backend)
    q, k, v = leaf_qkv((2, 17, 3, 65), torch.float32, device, layout)
    grad_y = randn(*k.shape, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    ours, ref = backend_and_reference(backend, q, k, v, grad_y)
    for name, a, r in zip(("y", "dq", "dk", "dv"), ours, ref, strict=True):
        assert_close(a, r, table="rounded_once", name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ops_keep_the_reference_contract(backend):
    """(y, ctx) and (dq, dk, dv) as the reference ops give them, ctx in float32 for bf16."""
    q, k, v = (t.detach() for t in leaf_qkv((1, 20, 2, 70), torch.bfloat16, device_of(backend)))
    fwd, bwd = ops(backend)
    y, ctx = fwd(q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k, v)
    assert ctx.dtype == torch.float32 and ctx.shape == (1, 20, 2, 1) and ctx.is_contiguous()
    assert_close(ctx, ctx_ref, name="ctx")
    assert_close(y, y_ref, table="rounded_once", name="y")
    grad_y = randn(*y.shape, dtype=y.dtype, device=y.device, seed=2)
    grads = bwd(grad_y, q, k, v, ctx)
    grads_ref = separable_attention_backward_reference(grad_y, q, k, v, ctx_ref)
    for name, a, r in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert_close(a, r, table="rounded_once", name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 2, 5), (2, 3, 0, 5), (2, 3, 2, 0), (2, 0, 2, 5)])
def test_the_ops_give_the_reference_results_on_empty_inputs(shape, backend, poison_empty):
    """N = 0: ctx is an empty sum, 0; C = 0: dq = s * 0; the rest is empty."""
    q, k, v = (t.detach() for t in leaf_qkv(shape, torch.float32, device_of(backend), "separate"))
    fwd, bwd = ops(backend)
    y, ctx = fwd(q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k, v)
    assert_close(y, y_ref, name="y")
    assert_close(ctx, ctx_ref, name="ctx")
    grads = bwd(torch.ones_like(y), q, k, v, ctx)
    grads_ref = separable_attention_backward_reference(torch.ones_like(y), q, k, v, ctx_ref)
    for name, a, r in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert_close(a, r, name=name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_forward_op_propagates_non_finite_values_across_tiles(backend):
    q, k, v = (t.detach().clone() for t in leaf_qkv((1, 3, 3, 130), torch.float32,
                                                      device_of(backend), "separate"))
    q[0, 0, 0, :64] = float("-inf")  # row 0: a whole tile of -inf before finite ones
    q[0, 0, 1, 100] = float("nan")  # row 1: NaN in the last tile poisons the whole softmax
    k[0, 1, 2, 70] = float("inf")  # row 2: one channel's context is inf
    v[0, 2, 2, 5] = float("nan")  # relu(NaN) is NaN
    v[0, 0, 2, 6] = float("-inf")
    y, ctx = ops(backend)[0](q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k, v)
    assert_close(ctx, ctx_ref, equal_nan=True, name="ctx")
    assert_close(y, y_ref, equal_nan=True, name="y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_and_backward(dtype, backend):
    """The registered ops (``torch.ops.mvit2.*``, ``*_triton`` for Triton)."""
    q, k, v = (t.detach() for t in leaf_qkv((2, 17, 2, 65), dtype, device_of(backend)))
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.mvit2, "separable_attention_forward" + suffix)
    bwd = getattr(torch.ops.mvit2, "separable_attention_backward" + suffix)
    y, ctx = fwd(q, k, v)
    torch.library.opcheck(fwd, (q, k, v))
    torch.library.opcheck(bwd, (torch.randn_like(y), q, k, v, ctx))


# Triton's own errors, message by message (test_bad_inputs.py has the public API's on every
# backend; the C++ ops print dtypes in ATen's spelling).
TRITON = [b for b in BACKENDS if b == "triton"]


def _qkv(B=2, C=3, P=4, N=5, dtype=torch.float32):
    return tuple(make_qkv((B, C, P, N), dtype, device_of("triton"), "separate")[:3])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (lambda: (_qkv()[0][0], *_qkv()[1:]), ValueError, r"q must be a 4-D tensor"),
        (lambda: (*_qkv()[:2], _qkv(N=6)[2]), ValueError, r"v must have shape .* \[2, 3, 4, 6\]"),
        (lambda: (_qkv(C=2)[1], *_qkv()[1:]), ValueError, r"q must have shape \[B, 1, P, N\]"),
        (lambda: (*_qkv()[:2], _qkv(dtype=torch.float64)[2]), TypeError, "v has dtype"),
        (lambda: tuple(t.int() for t in _qkv()), TypeError, "q must be float16, bfloat16"),
    ],
)
@pytest.mark.parametrize("backend", TRITON)
def test_the_triton_forward_op_checks_its_arguments(args, error, match, backend):
    with pytest.raises(error, match=match):
        torch.ops.mvit2.separable_attention_forward_triton(*args())


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda g, ctx: (g[:, :2], ctx), ValueError, r"grad_y must have shape \[2, 3, 4, 5\]"),
        (lambda g, ctx: (g.double(), ctx), TypeError, "grad_y must have dtype torch.float32"),
        (lambda g, ctx: (g, ctx.expand(2, 3, 4, 5)), ValueError, r"ctx must have shape"),
        (lambda g, ctx: (g, ctx.double()), TypeError, "ctx must have dtype torch.float32"),
    ],
)
@pytest.mark.parametrize("backend", TRITON)
def test_the_triton_backward_op_checks_grad_y_and_ctx(change, error, match, backend):
    q, k, v = _qkv()
    y, ctx = ops(backend)[0](q, k, v)
    g, ctx = change(torch.ones_like(y), ctx)
    with pytest.raises(error, match=match):
        torch.ops.mvit2.separable_attention_backward_triton(g, q, k, v, ctx)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31 elements need a GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if device_of(b) == "cuda"])
def test_more_than_2_to_the_31_elements(backend):
    """64-bit offsets: channels past element 2**31 read and write the right memory. Channels
    are independent, so the last two are checked against the reference on their own."""
    P, N = 4, 1024
    C = 2**31 // (P * N) + 3
    q = torch.randn(1, 1, P, N, device="cuda", dtype=torch.float16)
    k = torch.randn(1, C, P, N, device="cuda", dtype=torch.float16)
    v = torch.randn(1, C, P, N, device="cuda", dtype=torch.float16)
    y, ctx = ops(backend)[0](q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k[:, -2:], v[:, -2:])
    assert_close(ctx[:, -2:], ctx_ref, name="ctx", layout=False)
    assert_close(y[:, -2:].contiguous(), y_ref, table="rounded_once", name="y")
