"""Specification of ``separable_attention_qkv``: ``separable_attention`` on the channel views of
one ``qkv`` (docs/design.md §1, "The packed op"), its gradient written into one tensor.

Parametrized over the backends usable here (conftest.BACKENDS). The oracle is the op on the split
views (the same kernel: equal bit for bit where the same vector code runs) and the reference.
"""

import os

import pytest
import torch
from conftest import BACKENDS, device_of
from utils import assert_close, randn

from mvit2_kernels import separable_attention, separable_attention_qkv
from mvit2_kernels.kernels import kernel
from mvit2_kernels.reference import separable_attention_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (B, C, P, N) as in test_separable_attention.py; under Triton's interpreter (one program at a
# time) its tiles alone: N = 1, N past one 64-wide tile with C over two 16-channel tiles.
SHAPES = [(2, 3, 4, 37), (1, 1, 1, 1), (3, 5, 2, 130), (64, 3, 2, 5), (1, 2, 1, 3000)]
TILE_SHAPES = [(2, 3, 2, 1), (1, 17, 2, 65)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# qkv as the kernels meet it: contiguous, channels last (N not unit-stride: the views are
# copied), a channel slice of a wider tensor (read in place), every other element along N.
LAYOUTS = ["contiguous", "channels_last", "channel_slice", "strided_n"]


SHAPE_CASES = [(b, shape) for b in BACKENDS
               for shape in (TILE_SHAPES if b == "triton" and INTERPRETED else SHAPES)]


def make(shape, dtype=torch.float32, device="cpu", layout="contiguous", seed=0):
    """qkv ``[B, 1 + 2C, P, N]`` for ``shape = (B, C, P, N)``, a leaf in the given layout."""
    B, C, P, N = shape
    if layout == "channel_slice":
        qkv = randn(B, 2 * C + 4, P, N, dtype=dtype, device=device, seed=seed)[:, 2:3 + 2 * C]
    elif layout == "strided_n":
        qkv = randn(B, 1 + 2 * C, P, 2 * N, dtype=dtype, device=device, seed=seed)[..., ::2]
    else:
        qkv = randn(B, 1 + 2 * C, P, N, dtype=dtype, device=device, seed=seed)
        if layout == "channels_last":
            qkv = qkv.contiguous(memory_format=torch.channels_last)
    return qkv.detach().requires_grad_()


def split(qkv):
    C = (qkv.shape[1] - 1) // 2
    return qkv.split([1, C, C], dim=1)


def packed_and_split(qkv, backend, grad_y):
    """(y, dqkv) from the packed op and from ``separable_attention`` on the split views."""
    results = []
    for fn in (lambda t: separable_attention_qkv(t, backend=backend),
               lambda t: separable_attention(*split(t), backend=backend)):
        leaf = qkv.detach().requires_grad_()  # the same memory: the same strides and offset
        y = fn(leaf)
        results.append((y, *torch.autograd.grad(y, leaf, grad_y)))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("backend", "shape"), SHAPE_CASES)
def test_equals_the_op_on_the_split_views(backend, shape, dtype):
    """y and qkv's gradient as through the split: bit for bit on CPU and Triton (the same
    kernel, the same order); on CUDA the vector width may follow other pointers' alignment."""
    device = device_of(backend)
    qkv = make(shape, dtype, device)
    grad_y = randn(*shape, dtype=dtype, device=device, seed=1)
    (y, dqkv), (y_split, dqkv_split) = packed_and_split(qkv, backend, grad_y)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype and dqkv.is_contiguous()
    if device == "cuda":
        assert_close(y, y_split, table="rounded_once", name="y")
        assert_close(dqkv, dqkv_split, table="rounded_once", name="dqkv")
    else:
        assert torch.equal(y, y_split)
        assert torch.equal(dqkv, dqkv_split)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU kernels")
def test_outputs_over_32_mib_equal_the_split_views():
    """y (36 MB) and dqkv (72 MB) are each mapped for themselves, with huge-page advice on the
    CPU (csrc/cpu/outputs.h): still every element as through the split, whose dk and dv are
    allocated the same way."""
    shape = (2, 1024, 4, 1100)
    qkv = make(shape)
    grad_y = randn(*shape, seed=1)
    (y, dqkv), (y_split, dqkv_split) = packed_and_split(qkv, "cpu", grad_y)
    assert y.nbytes > 32 << 20 and dqkv.nbytes > 32 << 20
    assert torch.equal(y, y_split) and torch.equal(dqkv, dqkv_split)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_qkv_equals_the_split_views(layout, backend, poison_empty):
    """Every layout of qkv; dqkv contiguous whatever qkv's strides, and every element written."""
    device = device_of(backend)
    qkv = make((2, 17, 3, 65), torch.float32, device, layout)
    assert not qkv.is_contiguous() or layout == "contiguous"
    grad_y = randn(2, 17, 3, 65, device=device, seed=1).transpose(1, 2).contiguous().transpose(1, 2)
    (y, dqkv), (y_split, dqkv_split) = packed_and_split(qkv, backend, grad_y)
    assert dqkv.is_contiguous() and not dqkv.isnan().any()
    assert_close(y, y_split, table="rounded_once", name="y")
    assert_close(dqkv, dqkv_split, table="rounded_once", name="dqkv", layout=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rounds_once_from_the_float32_reference(dtype, backend, poison_empty):
    """y and dqkv within one unit in the last place of the float32 (float64) reference rounded
    to the dtype, as test_separable_attention.py holds the split op; every element written."""
    shape = (1, 17, 2, 65)
    device = device_of(backend)
    qkv = make(shape, dtype, device)
    grad_y = randn(*shape, dtype=dtype, device=device, seed=1)
    y = separable_attention_qkv(qkv, backend=backend)
    (dqkv,) = torch.autograd.grad(y, qkv, grad_y)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref_in = qkv.detach().to(acc).requires_grad_()
    y_ref = separable_attention_reference(*split(ref_in))
    (dqkv_ref,) = torch.autograd.grad(y_ref, ref_in, grad_y.to(acc))
    assert_close(y, y_ref.to(dtype), table="rounded_once", name="y")
    assert_close(dqkv, dqkv_ref.to(dtype), table="rounded_once", name="dqkv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_fully_written(backend, poison_empty):
    """With NaN-filled allocations, no element of y or dqkv (q's channel included) stays NaN."""
    qkv = make((2, 5, 3, 67), torch.float32, device_of(backend))
    y = separable_attention_qkv(qkv, backend=backend)
    (dqkv,) = torch.autograd.grad(y, qkv, torch.ones_like(y))
    assert not y.isnan().any() and not dqkv.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 2, 1, 5), (1, 1, 1, 1), (1, 2, 2, 3)])
def test_gradcheck_float64(backend, shape):
    qkv = make(shape, torch.float64, device_of(backend))
    assert torch.autograd.gradcheck(lambda t: separable_attention_qkv(t, backend=backend), (qkv,))


def test_reference_backend_runs_the_reference_on_the_split_views():
    qkv = make((2, 3, 2, 7), torch.float64)
    y = separable_attention_qkv(qkv, backend="reference")
    torch.testing.assert_close(y, separable_attention_reference(*split(qkv)), rtol=0, atol=0)
    (dqkv,) = torch.autograd.grad(y.sum(), qkv)
    assert dqkv.shape == qkv.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_ops_keep_the_split_ops_contract(backend):
    """The raw ops: (y, ctx) as the forward op on the views; dqkv = [dq, dk, dv] of the
    backward op, in one contiguous tensor."""
    qkv = make((1, 20, 2, 70), torch.bfloat16, device_of(backend)).detach()
    q, k, v = split(qkv)
    y, ctx = kernel("separable_attention_qkv_forward", backend)(qkv)
    y_split, ctx_split = kernel("separable_attention_forward", backend)(q, k, v)
    assert torch.equal(y, y_split) and torch.equal(ctx, ctx_split)
    assert ctx.dtype == torch.float32 and ctx.is_contiguous()
    grad_y = randn(*y.shape, dtype=y.dtype, device=y.device, seed=2)
    dqkv = kernel("separable_attention_qkv_backward", backend)(grad_y, qkv, ctx)
    grads = kernel("separable_attention_backward", backend)(grad_y, q, k, v, ctx)
    assert dqkv.is_contiguous()
    assert torch.equal(dqkv, torch.cat(grads, dim=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 2, 5), (2, 3, 0, 5), (2, 3, 2, 0)])
def test_empty_inputs_give_empty_results(shape, backend, poison_empty):
    qkv = make(shape, torch.float32, device_of(backend))
    y = separable_attention_qkv(qkv, backend=backend)
    assert y.shape == split(qkv)[1].shape
    (dqkv,) = torch.autograd.grad(y.sum(), qkv)
    assert dqkv.shape == qkv.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    qkv = make((1, 2, 1, 4), torch.float64, device_of(backend))
    y = separable_attention_qkv(qkv, backend=backend)
    (dqkv,) = torch.autograd.grad(y.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dqkv.sum().backward()


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize(
    ("make_qkv", "error", "match"),
    [
        (lambda d: torch.randn(2, 4, 3, 5, device=d), ValueError, r"qkv .*\[B, 1 \+ 2C, P, N\]"),
        (lambda d: torch.randn(2, 1, 3, 5, device=d), ValueError, r"odd channel count >= 3"),
        (lambda d: torch.randn(7, 3, 5, device=d), ValueError, r"qkv must be a 4-D tensor"),
        (lambda d: torch.ones(2, 7, 3, 5, dtype=torch.int32, device=d), TypeError,
         r"qkv must be float16, bfloat16, float32 or float64"),
    ],
    ids=["even-channels", "one-channel", "rank-3", "int32"],
)
def test_bad_input_raises_naming_qkv(make_qkv, error, match, backend):
    device = "cpu" if backend == "reference" else device_of(backend)
    with pytest.raises(error, match=match):
        separable_attention_qkv(make_qkv(device), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_raw_ops_check_their_arguments(backend):
    """Called directly (no Python wrapper), the ops still refuse what they cannot index."""
    device = device_of(backend)
    fwd = kernel("separable_attention_qkv_forward", backend)
    bwd = kernel("separable_attention_qkv_backward", backend)
    with pytest.raises(ValueError, match="qkv"):
        fwd(torch.randn(2, 4, 3, 5, device=device))
    qkv = torch.randn(2, 7, 3, 5, device=device)
    y, ctx = fwd(qkv)
    with pytest.raises(ValueError, match="grad_y"):
        bwd(y[:, :2], qkv, ctx)
    with pytest.raises(TypeError, match="ctx"):
        bwd(y, qkv, ctx.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_and_backward(dtype, backend):
    """The registered ops (``torch.ops.mvit2.*``, ``*_triton`` for Triton), on a strided qkv."""
    qkv = make((2, 3, 2, 9), dtype, device_of(backend), "channel_slice").detach()
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.mvit2, "separable_attention_qkv_forward" + suffix)
    bwd = getattr(torch.ops.mvit2, "separable_attention_qkv_backward" + suffix)
    y, ctx = fwd(qkv)
    torch.library.opcheck(fwd, (qkv,))
    torch.library.opcheck(bwd, (torch.randn_like(y), qkv, ctx))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    qkv = make((2, 3, 4, 70), torch.float32, device_of(backend))

    def layer(qkv):
        return separable_attention_qkv(qkv, backend=backend).square().sum()

    loss = torch.compile(layer, fullgraph=True)(qkv)
    (dqkv,) = torch.autograd.grad(loss, qkv)
    loss_ref = separable_attention_reference(*split(qkv)).square().sum()
    (dqkv_ref,) = torch.autograd.grad(loss_ref, qkv)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(dqkv, dqkv_ref)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if device_of(b) == "cpu"])
def test_autocast_casts_qkv_once(backend):
    """Under autocast the op takes qkv in the autocast dtype, as a convolution would."""
    qkv = make((1, 3, 2, 9), torch.float32, device_of(backend))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = separable_attention_qkv(qkv, backend=backend)
    assert y.dtype == torch.bfloat16
    (dqkv,) = torch.autograd.grad(y.float().sum(), qkv)
    assert dqkv.dtype == torch.float32
    expected = separable_attention(*split(qkv.detach().bfloat16()), backend=backend)
    assert torch.equal(y, expected)
