"""Specification of the CPU kernels ``separable_layer_project_{forward,backward}``: the fused
layer's two projections around its epilogue (and the backward's ``dy = W_out^T grad_out`` with the
epilogue's backward), held against the plain-PyTorch composition in float64."""

import pytest
import torch
from utils import acc_of, assert_close, tolerance

from mvit2_kernels import backends
from mvit2_kernels.reference import (
    separable_layer_epilogue_backward_reference,
    separable_layer_epilogue_forward_reference,
)

pytestmark = pytest.mark.skipif(not backends.compiled_cpu(), reason="C++ extension not built")


def _ops():
    return torch.ops.mvit2


# (B, D, C, D_out, P, N): D, C, D_out off the register block (8 rows) and N off the vector width
# (16 floats, 8 doubles), N = 1, N over one column block (128), B = 1, a multiple of everything,
# tiles of several rows (b, p) that cross batches and end short (20 rows of N = 5 in threes).
SHAPES = [
    (5, 6, 7, 9, 4, 5),
    (1, 1, 1, 1, 1, 1),
    (2, 3, 17, 5, 3, 1),
    (1, 17, 3, 130, 2, 37),
    (2, 130, 130, 17, 1, 33),
    (1, 16, 24, 9, 2, 300),
    (3, 8, 16, 24, 4, 16),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
def project_inputs(shape, dtype, bias=True, seed=0):
    """x, w_v, b_v, ctx, w_out, b_out, grad_out, v: random, weights scaled so values stay O(1)."""
    B, D, C, D_out, P, N = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0, dt=dtype):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(dt)

    x = randn(B, D, P, N)
    w_v, w_out = randn(C, D, scale=max(D, 1) ** -0.5), randn(D_out, C, scale=max(C, 1) ** -0.5)
    b_v = randn(C, scale=0.5) if bias else None
    b_out = randn(D_out, scale=0.5) if bias else None
    ctx = randn(B, C, P, dt=acc_of(dtype))
    return x, w_v, b_v, ctx, w_out, b_out, randn(B, D_out, P, N), randn(B, C, P, N)


def forward_reference(x, w_v, b_v, ctx, w_out, b_out):
    """``(out, v, y)`` in float64: v = W_v x + b_v, y = relu(v) * ctx (the epilogue's contract),
    out = W_out y + b_out."""
    v = torch.einsum("cd,bdpn->bcpn", w_v.double(), x.double())
    if b_v is not None:
        v = v + b_v.double()[:, None, None]
    y = separable_layer_epilogue_forward_reference(v, ctx.double())
    out = torch.einsum("oc,bcpn->bopn", w_out.double(), y)
    if b_out is not None:
        out = out + b_out.double()[:, None, None]
    return out, v, y


def backward_reference(grad_out, v, ctx, w_out):
    """``(dv, dctx)`` in float64: dy = W_out^T grad_out, then the epilogue's backward contract
    (``v <= 0`` gives 0: a NaN v passes the gradient)."""
    dy = torch.einsum("oc,bopn->bcpn", w_out.double(), grad_out.double())
    return separable_layer_epilogue_backward_reference(dy, v.double(), ctx.double())


def assert_matches(actual, expected, dtype):
    """Errors of the kernel (inputs rounded to dtype, float32 accumulation, output rounded to
    dtype) against the float64 composition of the same rounded inputs."""
    assert actual.dtype == dtype
    assert_close(actual, expected.to(dtype), table="project", equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("keep", [True, False])
def test_forward_matches_the_composition(shape, dtype, keep, poison_empty):
    x, w_v, b_v, ctx, w_out, b_out, _, _ = project_inputs(shape, dtype, bias=keep)
    out, v, y = _ops().separable_layer_project_forward(x, w_v, b_v, ctx, w_out, b_out, keep)
    ref_out, ref_v, ref_y = forward_reference(x, w_v, b_v, ctx, w_out, b_out)
    assert_matches(out, ref_out, dtype)
    if keep:
        assert_matches(v, ref_v, dtype)
        assert_matches(y, ref_y, dtype)
    else:  # never materialised
        assert v.shape == y.shape == (0,) and v.dtype == y.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_the_composition(shape, dtype, poison_empty):
    _, _, _, ctx, w_out, _, grad_out, v = project_inputs(shape, dtype)
    dv, dctx = _ops().separable_layer_project_backward(grad_out, v, ctx, w_out)
    ref_dv, ref_dctx = backward_reference(grad_out, v, ctx, w_out)
    assert_matches(dv, ref_dv, dtype)
    assert dctx.dtype == acc_of(dtype)
    # dctx sums N products of dtype-rounded inputs in float32: the float32 tolerance, over N.
    tol = tolerance(acc_of(dtype), "project")
    torch.testing.assert_close(
        dctx.double(), ref_dctx, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nonfinite_values_propagate_like_the_composition(dtype, poison_empty):
    x, w_v, b_v, ctx, w_out, b_out, grad_out, v = project_inputs((2, 9, 10, 11, 2, 40), dtype)
    x[0, 3, 1, 5] = float("nan")
    x[1, 0, 0, 17] = float("inf")
    x[1, 4, 1, 39] = -float("inf")  # the last column: inside the last, padded vector
    out, v_kept, y = _ops().separable_layer_project_forward(x, w_v, b_v, ctx, w_out, b_out, True)
    ref_out, ref_v, ref_y = forward_reference(x, w_v, b_v, ctx, w_out, b_out)
    assert out.isnan().any() and v_kept.isinf().any()
    for got, ref in ((out, ref_out), (v_kept, ref_v), (y, ref_y)):
        assert_matches(got, ref, dtype)
    # NaN v passes the gradient (and makes dctx NaN), v = -inf blocks it, inf in grad_out.
    v[0, 2, 0, 3], v[1, 5, 1, 7], grad_out[1, 3, 0, 21] = float("nan"), -float("inf"), float("inf")
    dv, dctx = _ops().separable_layer_project_backward(grad_out, v, ctx, w_out)
    ref_dv, ref_dctx = backward_reference(grad_out, v, ctx, w_out)
    assert dctx.isnan().any() and dv.isinf().any()
    assert_matches(dv, ref_dv, dtype)
    assert_matches(dctx, ref_dctx, dtype)


def test_column_padding_does_not_leak_into_dctx(poison_empty):
    # An inf weight makes dy = inf * 0 = NaN in the zero-padded columns past N = 21: dctx must
    # sum the real columns only, where dy = +inf and relu(v) > 0 give +inf.
    *_, ctx, w_out, _, grad_out, v = project_inputs((1, 4, 5, 6, 2, 21), torch.float32)
    w_out[2, 3] = float("inf")
    grad_out[:, 2] = grad_out[:, 2].abs() + 1
    v[:, 3] = v[:, 3].abs() + 0.1
    dv, dctx = _ops().separable_layer_project_backward(grad_out, v, ctx, w_out)
    ref_dv, ref_dctx = backward_reference(grad_out, v, ctx, w_out)
    assert (dctx[:, 3] == float("inf")).all()
    assert_matches(dv, ref_dv, torch.float32)
    assert_matches(dctx, ref_dctx, torch.float32)


@pytest.mark.parametrize("empty", ["B", "D", "C", "D_out", "P", "N"])
def test_empty_dimensions(empty, poison_empty):
    sizes = dict(B=2, D=5, C=3, D_out=4, P=2, N=7)
    sizes[empty] = 0
    shape = tuple(sizes[k] for k in ("B", "D", "C", "D_out", "P", "N"))
    x, w_v, b_v, ctx, w_out, b_out, grad_out, v = project_inputs(shape, torch.float32)
    out, v_kept, y = _ops().separable_layer_project_forward(x, w_v, b_v, ctx, w_out, b_out, True)
    ref_out, ref_v, ref_y = forward_reference(x, w_v, b_v, ctx, w_out, b_out)
    for got, ref in ((out, ref_out), (v_kept, ref_v), (y, ref_y)):
        assert_matches(got, ref, torch.float32)  # D = 0: v = b_v; C = 0: out = b_out
    dv, dctx = _ops().separable_layer_project_backward(grad_out, v, ctx, w_out)
    ref_dv, ref_dctx = backward_reference(grad_out, v, ctx, w_out)
    assert_matches(dv, ref_dv, torch.float32)
    assert_matches(dctx, ref_dctx, torch.float32)  # N = 0 or D_out = 0: zeros


def test_results_do_not_depend_on_the_thread_count():
    shape = (3, 20, 24, 12, 2, 290)  # three column blocks: dctx sums partials across tasks
    x, w_v, b_v, ctx, w_out, b_out, grad_out, v = project_inputs(shape, torch.float32)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        try:
            fwd = _ops().separable_layer_project_forward(x, w_v, b_v, ctx, w_out, b_out, True)
            bwd = _ops().separable_layer_project_backward(grad_out, v, ctx, w_out)
        finally:
            torch.set_num_threads(threads)
        results.append((*fwd, *bwd))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def _bad_forward_cases():
    x, w_v, b_v, ctx, w_out, b_out, _, _ = project_inputs((2, 5, 3, 4, 2, 7), torch.float32)
    good = dict(x=x, w_v=w_v, b_v=b_v, ctx=ctx, w_out=w_out, b_out=b_out)
    return good, [
        ("x", x[0], ValueError, "x must be a 4-D tensor"),
        ("x", x.int(), TypeError, "x must be float16, bfloat16, float32 or float64"),
        ("x", x.transpose(2, 3), ValueError, "x must be contiguous"),
        ("w_v", w_v[:, :4], ValueError, r"w_v must have shape \[C, D\] with D = 5"),
        ("w_v", w_v.double(), TypeError, "w_v must have dtype Float like x"),
        ("w_v", w_v.t().contiguous().t(), ValueError, "w_v must be contiguous"),
        ("b_v", b_v[:2], ValueError, r"b_v must have shape \[3\]"),
        ("ctx", ctx.half(), TypeError, "ctx must have dtype Float"),
        ("ctx", ctx[:, :2].contiguous(), ValueError, r"ctx must have shape \[2, 3, 2\]"),
        ("w_out", w_out[:, :2], ValueError, r"w_out must have shape \[D_out, C\] with C = 3"),
        ("b_out", b_out[None], ValueError, r"b_out must have shape \[4\]"),
    ]


def test_bad_forward_inputs_raise_naming_the_argument():
    good, cases = _bad_forward_cases()
    for name, bad, error, message in cases:
        args = {**good, name: bad}
        with pytest.raises(error, match=message):
            _ops().separable_layer_project_forward(*args.values(), False)


def test_bad_backward_inputs_raise_naming_the_argument():
    _, _, _, ctx, w_out, _, grad_out, v = project_inputs((2, 5, 3, 4, 2, 7), torch.float32)
    good = dict(grad_out=grad_out, v=v, ctx=ctx, w_out=w_out)
    cases = [
        (
            "grad_out",
            grad_out[:, :3].contiguous(),
            ValueError,
            r"grad_out must have shape \[2, 4, 2, 7\]",
        ),
        ("grad_out", grad_out.double(), TypeError, "grad_out must have dtype Float like v"),
        ("v", v.transpose(2, 3), ValueError, "v must be contiguous"),
        ("ctx", ctx.double(), TypeError, "ctx must have dtype Float"),
        ("w_out", w_out[:, :2], ValueError, r"w_out must have shape \[D_out, C\] with C = 3"),
    ]
    for name, bad, error, message in cases:
        args = {**good, name: bad}
        with pytest.raises(error, match=message):
            _ops().separable_layer_project_backward(*args.values())
