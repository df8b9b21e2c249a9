"""The Triton backend of separable attention, held to the reference (docs/design.md §1).

On a machine without a GPU this runs through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which uses one fixed config: BLOCK_C = 16 channels, BLOCK_N = 64 patches. The
shapes below sit on and across those tile edges while keeping the grids small. What every backend
shares (public-API bad input, compile) is in test_separable_attention.py and friends.
"""

import pytest
import torch
from conftest import device_of

from mvit2_kernels import available_backends, separable_attention
from mvit2_kernels.reference import (
    separable_attention_backward_reference,
    separable_attention_forward_reference,
    separable_attention_reference,
)

if "triton" not in available_backends():
    pytest.skip("triton cannot launch here", allow_module_level=True)

from mvit2_kernels.triton.separable_attention import (
    separable_attention_backward,
    separable_attention_forward,
)

DEVICE = device_of("triton")
# (B, C, P, N): N = 1; odd N; N one short of, equal to and one past a tile; N over 3 tiles with
# C over 2 channel tiles; C = 1; C = 17 and 40 (channel tiles with a ragged last one).
SHAPES = [
    (2, 3, 2, 1),
    (1, 5, 3, 37),
    (1, 4, 2, 63),
    (1, 1, 2, 64),
    (2, 17, 1, 65),
    (1, 20, 2, 150),
    (1, 40, 1, 9),
]
LAYOUTS = ["views", "separate", "transposed", "permuted", "strided_n"]


def make_qkv(shape, dtype, layout="views", seed=0):
    """Leaf q, k, v of ``shape`` in one of the layouts the kernels must read:
    ``views`` of one qkv tensor (MobileViTv2's case), ``separate`` contiguous tensors,
    ``transposed`` (N not the unit-stride axis: copied), ``permuted`` (dims 0..2 in any order,
    N unit-stride: read in place), ``strided_n`` (every other element along N: copied)."""
    B, C, P, N = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    if layout == "views":
        q, k, v = randn(B, 1 + 2 * C, P, N).split([1, C, C], dim=1)
    elif layout == "separate":
        q, k, v = randn(B, 1, P, N), randn(B, C, P, N), randn(B, C, P, N)
    elif layout == "transposed":
        q, k, v = randn(B, P, N, 1 + 2 * C).permute(0, 3, 1, 2).split([1, C, C], dim=1)
    elif layout == "permuted":
        q, k, v = randn(P, 1 + 2 * C, B, N).permute(2, 1, 0, 3).split([1, C, C], dim=1)
    else:
        q, k, v = randn(B, 1 + 2 * C, P, 2 * N)[..., ::2].split([1, C, C], dim=1)
    return tuple(t.detach().requires_grad_() for t in (q, k, v))


def triton_and_reference(q, k, v, grad_y):
    """(y, dq, dk, dv) from the Triton backend and from autograd through the reference, the
    latter in float32 for fp16/bf16 inputs (the kernels' accumulation dtype)."""
    y = separable_attention(q, k, v, backend="triton")
    ours = (y, *torch.autograd.grad(y, (q, k, v), grad_y))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q32, k32, v32 = (t.detach().to(acc).requires_grad_() for t in (q, k, v))
    y_ref = separable_attention_reference(q32, k32, v32)
    ref = (y_ref, *torch.autograd.grad(y_ref, (q32, k32, v32), grad_y.to(acc)))
    return ours, ref


def assert_close_in(dtype, ours, ref):
    """fp32/fp64: the usual tolerances. fp16/bf16: the float32 reference rounded to the dtype,
    to within one unit in the last place (the kernels round once, from float32)."""
    assert ours.dtype == dtype and ours.is_contiguous()
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(ours.float(), ref.to(dtype).float(), rtol=eps, atol=1e-5)
    else:
        torch.testing.assert_close(ours, ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_the_reference(shape, dtype, poison_empty):
    # Under poison_empty, an output or workspace element the kernels forgot is NaN and fails.
    q, k, v = make_qkv(shape, dtype)
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    ours, ref = triton_and_reference(q, k, v, grad_y)
    for name, a, r in zip(("y", "dq", "dk", "dv"), ours, ref, strict=True):
        assert a.shape == r.shape, name
        assert_close_in(dtype, a, r)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs_match_the_reference(layout, poison_empty):
    q, k, v = make_qkv((2, 17, 3, 65), torch.float32, layout)
    grad_y = torch.randn(k.shape, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    ours, ref = triton_and_reference(q, k, v, grad_y)  # grad_y strided too
    for a, r in zip(ours, ref, strict=True):
        assert_close_in(torch.float32, a, r)


@pytest.mark.parametrize("shape", [(1, 2, 1, 5), (1, 18, 2, 70)])
def test_gradcheck_float64(shape):
    """Full Jacobian on a tiny shape; a random projection (fast mode) across channel and N tiles,
    where the full one would take minutes in the interpreter."""
    q, k, v = make_qkv(shape, torch.float64, "separate")
    assert torch.autograd.gradcheck(
        lambda q, k, v: separable_attention(q, k, v, backend="triton"),
        (q, k, v),
        fast_mode=shape[1] > 2,
    )


def test_the_ops_keep_the_reference_contract():
    """(y, ctx) and (dq, dk, dv) as the reference ops give them, ctx in float32 for bf16."""
    q, k, v = (t.detach() for t in make_qkv((1, 20, 2, 70), torch.bfloat16))
    y, ctx = separable_attention_forward(q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k, v)
    assert ctx.dtype == torch.float32 and ctx.shape == (1, 20, 2, 1) and ctx.is_contiguous()
    torch.testing.assert_close(ctx, ctx_ref)
    assert_close_in(torch.bfloat16, y, y_ref)
    grad_y = torch.randn_like(y)
    grads = separable_attention_backward(grad_y, q, k, v, ctx)
    grads_ref = separable_attention_backward_reference(grad_y, q, k, v, ctx_ref)
    for a, r in zip(grads, grads_ref, strict=True):
        assert_close_in(torch.bfloat16, a, r.float())


@pytest.mark.parametrize("shape", [(0, 3, 2, 5), (2, 3, 0, 5), (2, 3, 2, 0), (2, 0, 2, 5)])
def test_empty_inputs_give_the_reference_results(shape, poison_empty):
    """N = 0: ctx is an empty sum, 0; C = 0: dq = s * 0; the rest is empty."""
    q, k, v = (t.detach() for t in make_qkv(shape, torch.float32, "separate"))
    y, ctx = separable_attention_forward(q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k, v)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ctx, ctx_ref)
    grads = separable_attention_backward(torch.ones_like(y), q, k, v, ctx)
    grads_ref = separable_attention_backward_reference(torch.ones_like(y), q, k, v, ctx_ref)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
def test_non_finite_values_propagate_like_the_reference():
    q, k, v = (t.detach().clone() for t in make_qkv((1, 3, 3, 130), torch.float32, "separate"))
    q[0, 0, 0, :64] = float("-inf")  # row 0: a whole tile of -inf before finite ones
    q[0, 0, 1, 100] = float("nan")  # row 1: NaN in the last tile poisons the whole softmax
    k[0, 1, 2, 70] = float("inf")  # row 2: one channel's context is inf
    v[0, 2, 2, 5] = float("nan")  # relu(NaN) is NaN
    v[0, 0, 2, 6] = float("-inf")
    y, ctx = separable_attention_forward(q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k, v)
    torch.testing.assert_close(ctx, ctx_ref, equal_nan=True)
    torch.testing.assert_close(y, y_ref, equal_nan=True)


def test_backward_is_deterministic():
    q, k, v = make_qkv((1, 40, 2, 130), torch.float32)
    grad_y = torch.randn(k.shape, device=DEVICE)
    runs = [triton_and_reference(q, k, v, grad_y)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_and_backward(dtype):
    q, k, v = (t.detach() for t in make_qkv((2, 17, 2, 65), dtype))
    y, ctx = torch.ops.mvit2.separable_attention_forward_triton(q, k, v)
    torch.library.opcheck(torch.ops.mvit2.separable_attention_forward_triton, (q, k, v))
    torch.library.opcheck(
        torch.ops.mvit2.separable_attention_backward_triton, (torch.randn_like(y), q, k, v, ctx)
    )


def _qkv(B=2, C=3, P=4, N=5, dtype=torch.float32):
    return tuple(t.detach() for t in make_qkv((B, C, P, N), dtype, "separate"))


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
def test_the_forward_op_checks_its_arguments(args, error, match):
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
def test_the_backward_op_checks_grad_y_and_ctx(change, error, match):
    q, k, v = _qkv()
    y, ctx = separable_attention_forward(q, k, v)
    g, ctx = change(torch.ones_like(y), ctx)
    with pytest.raises(error, match=match):
        torch.ops.mvit2.separable_attention_backward_triton(g, q, k, v, ctx)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="2**31 elements need a GPU")
def test_more_than_2_to_the_31_elements():
    """64-bit offsets: channels past element 2**31 read and write the right memory. Channels
    are independent, so the last two are checked against the reference on their own."""
    P, N = 4, 1024
    C = 2**31 // (P * N) + 3
    q = torch.randn(1, 1, P, N, device="cuda", dtype=torch.float16)
    k = torch.randn(1, C, P, N, device="cuda", dtype=torch.float16)
    v = torch.randn(1, C, P, N, device="cuda", dtype=torch.float16)
    y, ctx = separable_attention_forward(q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k[:, -2:], v[:, -2:])
    torch.testing.assert_close(ctx[:, -2:], ctx_ref)
    assert_close_in(torch.float16, y[:, -2:].contiguous(), y_ref)
