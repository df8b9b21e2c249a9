"""The CUDA C++ kernels (csrc/cuda/separable_attention.cu) where the shared specification tests
(test_separable_attention.py, test_compile.py, which also run backend="cuda") do not reach: every
vector width and the scalar fallback, channel tiles and N panels at the sizes that matter
(docs/design.md §3), float32 judged like fp16/bf16 against PyTorch's own error, ctx, tensors of more
than 2**31 elements, CUDA graphs, the device guard and bitwise determinism over many channel tiles.

Skipped without a CUDA device or when the extension was built without its CUDA kernels.
"""

import pytest
import torch
from test_separable_attention import run
from utils import assert_close, capture_and_replay, make_qkv

from mvit2_kernels import separable_attention
from mvit2_kernels.backends import compiled_cuda
from mvit2_kernels.reference import (
    separable_attention_backward_reference,
    separable_attention_forward_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not compiled_cuda(), reason="mvit2_kernels._C was built without CUDA (see the build banner)"
    ),
]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (B, C, P, N). N = 1, odd, beyond one panel (1000) and far beyond (4096); C = 1, 3, 256; B = 1
# (many channel tiles per row), B = 0; docs/design.md §3 stages at 256² and 384² (N = 36: 8-byte
# vectors in 16-bit dtypes); and B·P ≥ 512 with C = 200 (one tile of 25 channel slots per lane
# group).
SHAPES = [
    (1, 1, 4, 1),
    (2, 3, 4, 37),
    (1, 3, 4, 1000),
    (1, 256, 4, 4096),
    (0, 3, 4, 37),
    (4, 256, 4, 256),
    (4, 384, 4, 64),
    (4, 512, 4, 16),
    (2, 192, 4, 36),
    (128, 200, 4, 37),
]


def cuda_ops():
    return torch.ops.mvit2.separable_attention_forward, torch.ops.mvit2.separable_attention_backward


def qkv_views(shape, dtype, offset=0, seed=0, requires_grad=False):
    """q, k, v as views of one qkv tensor [B, 1 + 2C, P, N] that starts `offset` elements into its
    storage (an offset that is not a multiple of the vector width forces narrower vectors), and
    the leaf the gradients flow to."""
    q, k, v, (leaf,) = make_qkv(shape, dtype, "cuda", "views", requires_grad, seed, offset)
    return q, k, v, leaf


def assert_within_torch_error(name, out, ref_lowp, ref64, dtype):
    """out's largest error against float64 is at most twice that of the reference computed in
    `dtype` (the error PyTorch itself makes), plus about one unit in the last place of the dtype
    (float32: accumulation order over thousands of terms) of the largest reference value; and
    every element written."""
    assert out.shape == ref64.shape, name
    assert out.isfinite().all(), f"{name}: non-finite values (an unwritten element?)"
    assert_close(out, ref_lowp, exact=ref64, slack="cuda", dtype=dtype, name=name, layout=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_within_pytorch_error(shape, dtype, poison_empty):
    grad_y = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)

    def run_on_views(dtype, backend):
        q, k, v, buf = qkv_views(shape, dtype, requires_grad=True)
        return run(q, k, v, [buf], backend, grad_y.to(dtype))

    y, grads = run_on_views(dtype, "cuda")
    y_lowp, grads_lowp = run_on_views(dtype, None)
    y64, grads64 = run_on_views(torch.float64, None)
    assert y.dtype == dtype and y.is_contiguous()
    assert_within_torch_error("y", y, y_lowp, y64, dtype)
    assert_within_torch_error("dqkv", grads[0], grads_lowp[0], grads64[0], dtype)

    # ctx, kept for the backward in float32: against the float32 and float64 op contracts.
    q, k, v, _ = qkv_views(shape, dtype)
    _, ctx = cuda_ops()[0](q, k, v)
    _, ctx32 = separable_attention_forward_reference(q, k, v)
    _, ctx64 = separable_attention_forward_reference(q.double(), k.double(), v.double())
    assert ctx.dtype == torch.float32 and ctx.shape == (*k.shape[:3], 1) and ctx.is_contiguous()
    assert_within_torch_error("ctx", ctx, ctx32, ctx64, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 2, 4])
@pytest.mark.parametrize("shape", [(2, 5, 4, 64), (1, 9, 2, 1000)])
def test_every_vector_width_matches_the_op_contract(shape, dtype, offset, poison_empty):
    """Views 0, 4, 2 or 1 elements into their storage: every vector width the kernels pick, down
    to scalar loads (in 16-bit dtypes: 16-, 8-, 4- and 2-byte). The kernels accumulate in float32
    like the op contract, so they agree with it to within rounding to the output dtype."""
    fwd, bwd = cuda_ops()
    q, k, v, _ = qkv_views(shape, dtype, offset)
    grad_y = torch.randn_like(k)
    y, ctx = fwd(q, k, v)
    y_ref, ctx_ref = separable_attention_forward_reference(q, k, v)
    tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-5}
    torch.testing.assert_close(ctx, ctx_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    grads = bwd(grad_y, q, k, v, ctx)
    grads_ref = separable_attention_backward_reference(grad_y, q, k, v, ctx)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert g.is_contiguous(), name
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", [(1, 5, 2, 70), (2, 3, 4, 37), (1, 40, 1, 6)])
def test_gradcheck_float64_on_qkv_views(shape, offset):
    _, _, _, buf = qkv_views(shape, torch.float64, offset, requires_grad=True)
    B, C, P, N = shape

    def f(buf):
        q, k, v = buf[offset:].view(B, 1 + 2 * C, P, N).split([1, C, C], dim=1)
        return separable_attention(q, k, v, backend="cuda")

    assert torch.autograd.gradcheck(f, (buf,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_opcheck_on_misaligned_views_and_long_rows(dtype):
    fwd, bwd = cuda_ops()
    q, k, v, _ = qkv_views((2, 3, 4, 1000), dtype, offset=1)
    y, ctx = fwd(q, k, v)
    torch.library.opcheck(fwd, (q, k, v))
    torch.library.opcheck(bwd, (torch.randn_like(y), q, k, v, ctx))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitwise_deterministic_over_many_channel_tiles(dtype):
    """B = 1: every row is split into ~128 channel tiles whose partial ds the dq kernel sums."""
    fwd, bwd = cuda_ops()
    q, k, v, _ = qkv_views((1, 256, 4, 256), dtype)
    grad_y = torch.randn_like(k)

    def forward_backward():
        y, ctx = fwd(q, k, v)
        return (y, ctx, *bwd(grad_y, q, k, v, ctx))

    for a, b in zip(forward_backward(), forward_backward(), strict=True):
        assert torch.equal(a, b)


def test_forward_and_backward_capture_in_a_cuda_graph():
    """Kernels launched on the legacy stream, or a host sync, would break the capture."""
    fwd, bwd = cuda_ops()
    q, k, v, _ = qkv_views((2, 16, 4, 64), torch.bfloat16)
    q, k, v = q.clone(), k.clone(), v.clone()  # static inputs the replays read
    grad_y = torch.randn_like(k)

    def step(q, k, v):
        y, ctx = fwd(q, k, v)
        return (y, ctx, *bwd(grad_y, q, k, v, ctx))

    other, new = (qkv_views((2, 16, 4, 64), torch.bfloat16, seed=seed)[:3] for seed in (4, 3))
    captured = capture_and_replay(step, (q, k, v), other, new)
    y_ref, ctx_ref = separable_attention_forward_reference(*new)
    assert_close(captured[1], ctx_ref, table="rounded_once", name="ctx")
    assert_close(captured[0], y_ref, table="rounded_once", name="y")


def test_compiled_with_cuda_graphs_matches_eager():
    torch._dynamo.reset()
    views = qkv_views((2, 8, 4, 37), torch.float32)[:3]
    q, k, v = (t.detach().clone().requires_grad_() for t in views)

    def layer(q, k, v):
        return separable_attention(q, k, v, backend="cuda").square().sum()

    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # cudagraph trees record on the second call and replay on the third
        loss = compiled(q, k, v)
        grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = layer(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_inputs_device_not_the_current_one():
    q, k, v, _ = qkv_views((2, 3, 4, 37), torch.float32)
    q1, k1, v1 = (t.to("cuda:1") for t in (q, k, v))
    with torch.cuda.device(0):
        y1 = separable_attention(q1, k1, v1, backend="cuda")
    assert y1.device == torch.device("cuda:1")
    torch.testing.assert_close(y1.cpu(), separable_attention(q, k, v, backend="cuda").cpu())


def test_direct_op_calls_reject_mixed_devices():
    q, k, v, _ = qkv_views((2, 3, 4, 37), torch.float32)
    with pytest.raises(ValueError, match="q must be on"):
        cuda_ops()[0](q.cpu(), k, v)


@pytest.mark.slow
@pytest.mark.parametrize("N", [1025, 1032])
def test_more_than_2_31_elements(N):
    """k, v, y, grad_y, dk, dv of 2.3e9 elements each (N = 1025: scalar loads, 1032: 16-byte
    vectors): rows at element offsets past 2**31 match the reference computed on their slice."""
    B, C, P = 1100, 512, 4
    numel = B * C * P * N
    if torch.cuda.mem_get_info()[0] < 7 * numel * 2 + 2 * 10**9:
        pytest.skip("needs ~35 GB of free GPU memory")
    assert numel > 2**31
    fwd, bwd = cuda_ops()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, 1, P, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v, grad_y = (
        torch.randn(B, C, P, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(3)
    )
    y, ctx = fwd(q, k, v)
    dq, dk, dv = bwd(grad_y, q, k, v, ctx)
    tol = {"rtol": 2 * torch.finfo(torch.bfloat16).eps, "atol": 1e-5}
    for b in (0, B // 2, B - 1):  # b = B - 1 starts past element 2**31 of k, v, y, dk, dv
        s = slice(b, b + 1)
        y_ref, ctx_ref = separable_attention_forward_reference(q[s], k[s], v[s])
        torch.testing.assert_close(ctx[s], ctx_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y[s], y_ref, **tol)
        refs = separable_attention_backward_reference(grad_y[s], q[s], k[s], v[s], ctx[s])
        for g, g_ref in zip((dq[s], dk[s], dv[s]), refs, strict=True):
            torch.testing.assert_close(g, g_ref, **tol)
