"""Specification of ``separable_attention``: every backend matches the reference
(docs/design.md §1).

Parametrized over the backends usable here (conftest.BACKENDS); the reference is the oracle.
"""

import math

import pytest
import torch
from conftest import BACKENDS, device_of

from mvit2_kernels import available_backends, separable_attention
from mvit2_kernels.reference import (
    separable_attention_backward_reference,
    separable_attention_forward_reference,
    separable_attention_reference,
)

# (B, C, P, N): odd N, N = 1, C = 1, B = 1, N beyond one tile, N in the thousands, and B large
# enough that the CPU kernel keeps all channels of a batch in one task.
SHAPES = [(2, 3, 4, 37), (1, 1, 1, 1), (1, 8, 4, 1), (3, 5, 2, 130), (1, 2, 1, 3000), (64, 3, 2, 5)]
EMPTY_SHAPES = [(0, 4, 4, 16), (2, 0, 4, 16), (2, 4, 0, 16), (2, 4, 4, 0)]
LOW_PRECISION = (torch.bfloat16, torch.float16)


def make_qkv(shape, dtype, device, layout="views", requires_grad=False, seed=0):
    """q, k, v and the leaves they come from, in one of three layouts: ``views`` of one qkv
    tensor (the module's case), ``separate`` contiguous tensors, ``transposed`` (N not the
    unit-stride axis)."""
    B, C, P, N = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        qkv = torch.randn(B, P, N, 1 + 2 * C, generator=g, dtype=torch.float64)
        qkv = qkv.to(device, dtype).permute(0, 3, 1, 2).detach()
    else:
        qkv = torch.randn(B, 1 + 2 * C, P, N, generator=g, dtype=torch.float64).to(device, dtype)
    qkv.requires_grad_(requires_grad)
    q, k, v = qkv.split([1, C, C], dim=1)
    if layout == "separate":
        q, k, v = (t.detach().clone().requires_grad_(requires_grad) for t in (q, k, v))
        return q, k, v, [q, k, v]
    return q, k, v, [qkv]


def run(q, k, v, leaves, backend, grad_y=None):
    """y and, given grad_y, the gradients w.r.t. the leaves (the reference when no backend)."""
    if backend is None:
        y = separable_attention_reference(q, k, v)
    else:
        y = separable_attention(q, k, v, backend=backend)
    return y, (None if grad_y is None else torch.autograd.grad(y, leaves, grad_y))


def assert_matches_reference(out, ref_lowp, ref64):
    """Low precision: the kernel's error against float64 at most that of the reference in the same
    dtype (the error PyTorch itself makes), with slack. Otherwise the usual float tolerances."""
    if out.dtype in LOW_PRECISION:
        err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
        ref_err = (ref_lowp.double() - ref64).abs().max().item() if out.numel() else 0.0
        scale = ref64.abs().max().item() if out.numel() else 0.0
        assert err <= 2 * ref_err + 1e-3 * scale + 1e-6, (err, ref_err)
    else:
        torch.testing.assert_close(out, ref_lowp.to(out.dtype))


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
        pytest.skip("interpreter: layouts and fp16 are covered in test_triton.py")
    device = device_of(backend)
    q, k, v, leaves = make_qkv(shape, dtype, device, layout, requires_grad=True)
    grad_y = torch.randn(k.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y, grads = run(q, k, v, leaves, backend, grad_y)
    y_ref, grads_ref = run(*make_qkv(shape, dtype, device, layout, True), None, grad_y)
    y64, grads64 = run(*make_qkv(shape, torch.float64, device, layout, True), None, grad_y.double())
    assert y.dtype == dtype and y.shape == k.shape and y.is_contiguous()
    assert_matches_reference(y, y_ref, y64)
    for g, g_ref, g64 in zip(grads, grads_ref, grads64, strict=True):
        assert g.dtype == dtype
        assert_matches_reference(g, g_ref, g64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 2, 5), (1, 1, 1, 1), (1, 2, 1, 70)])
def test_gradcheck_float64(backend, shape):
    q, k, v, _ = make_qkv(shape, torch.float64, device_of(backend), "separate", True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: separable_attention(q, k, v, backend=backend), (q, k, v)
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
def test_non_finite_values_propagate_like_the_reference(backend):
    """Forward and backward give what autograd gives on the reference, NaN and inf included."""

    def inputs():
        q, k, v = (t.clone() for t in make_qkv((1, 3, 4, 9), torch.float32, device_of(backend))[:3])
        q[0, 0, 0, 4] = float("inf")  # row 0: softmax of +inf is NaN everywhere
        k[0, 1, 1, 2] = float("nan")  # row 1: one channel's context is NaN
        v[0, 2, 2, 5] = float("nan")  # relu(NaN) is NaN, and its gradient passes
        v[0, 0, 2, 6] = float("-inf")
        k[0, 0, 3, 1] = float("inf")  # row 3: ctx = inf; where v <= 0, dv is 0, not 0 * inf
        return [t.requires_grad_() for t in (q, k, v)]

    grad_y = torch.randn(1, 3, 4, 9, generator=torch.Generator().manual_seed(2)).to(
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


def _contract(backend):
    """The forward and backward ops of a backend, or the reference's contract functions."""
    if backend == "reference":
        return separable_attention_forward_reference, separable_attention_backward_reference
    if backend == "triton":
        from mvit2_kernels.triton import separable_attention as module

        return module.separable_attention_forward, module.separable_attention_backward
    return torch.ops.mvit2.separable_attention_forward, torch.ops.mvit2.separable_attention_backward


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
    fwd, bwd = _contract(backend)
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
    q, k, v, leaves = make_qkv((1, 64, 2, 300), torch.float32, device_of(backend), "views", True)
    grad_y = torch.randn(k.shape, device=k.device)
    grads = [run(q, k, v, leaves, backend, grad_y)[1][0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


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
    assert_matches_reference(y, y_ref, y64)
    for g, g_ref, g64 in zip(grads, grads_ref, grads64, strict=True):
        assert_matches_reference(g, g_ref, g64)
