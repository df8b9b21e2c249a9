"""Specification of ``separable_attention(..., out=y)`` and its op
``separable_attention_forward_out``: the forward into a preallocated y, for inference loops.

Parametrized over the backends usable here (conftest.BACKENDS) and the reference; the oracle is
the same backend's forward without ``out``.
"""

import pytest
import torch
from conftest import BACKENDS, device_of
from utils import make_qkv, randn

from mvit2_kernels import separable_attention
from mvit2_kernels.kernels import kernel


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("N", "offset"), [(65, 0), (64, 0), (64, 1)])  # vectors; a misaligned y
def test_out_receives_the_result_and_is_returned(N, offset, dtype, backend):
    """Under no_grad, ``out=`` gets the very values the op returns without it, twice in a row
    (the second call overwrites the first's result), is what the call returns, and has a new
    version (autograd would notice a saved y overwritten); ctx of the raw op into a preallocated
    y is the forward op's."""
    device = device_of(backend) if backend != "reference" else "cpu"
    q, k, v, _ = make_qkv((2, 17, 3, N), dtype, device)
    out = randn(*k.shape, dtype=dtype, device=device, offset=offset).fill_(float("nan"))
    with torch.no_grad():
        want = separable_attention(q, k, v, backend=backend)
        for _ in range(2):
            version = out._version
            got = separable_attention(q, k, v, backend=backend, out=out)
            assert got is out and out._version > version
            assert torch.equal(out, want)
            q, k, v = (t.flip(-1) for t in (q, k, v))
            want = separable_attention(q, k, v, backend=backend)
    if backend != "reference":
        y_out = torch.empty_like(out)
        ctx = kernel("separable_attention_forward_out", backend)(q, k, v, y_out)
        y, ctx_want = kernel("separable_attention_forward", backend)(q, k, v)
        assert torch.equal(y_out, y) and torch.equal(ctx, ctx_want)


@pytest.mark.parametrize(
    ("make_out", "error", "match"),
    [
        (lambda k: torch.empty(k.shape[1:], device=k.device), ValueError,
         r"out must have shape \[B, C, P, N\] = \[2, 3, 4, 5\] like k, got \[3, 4, 5\]"),
        (lambda k: torch.empty(k.shape, dtype=torch.float64, device=k.device), TypeError,
         "out must have dtype torch.float32 like k, got torch.float64"),
        (lambda k: torch.empty(k.shape, device="meta"), ValueError, "out must be on"),
        (lambda k: torch.empty(2, 3, 5, 4, device=k.device).transpose(2, 3), ValueError,
         "out must be contiguous"),
        (lambda k: k, ValueError, "out shares memory with k"),
        (lambda k: k.tolist(), TypeError, "out must be a torch.Tensor, got list"),
    ],
)
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_bad_out_raises_naming_out(make_out, error, match, backend):
    device = device_of(backend) if backend != "reference" else "cpu"
    q, k, v, _ = make_qkv((2, 3, 4, 5), torch.float32, device, "separate")
    with torch.no_grad(), pytest.raises(error, match=match):
        separable_attention(q, k, v, backend=backend, out=make_out(k))


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_out_under_inference_mode_bumps_a_normal_tensors_version(backend):
    """A y saved for a backward and overwritten inside inference mode is still noticed; an
    inference tensor is written without complaint."""
    device = device_of(backend) if backend != "reference" else "cpu"
    q, k, v, _ = make_qkv((2, 5, 3, 37), torch.float32, device)
    out = torch.empty(k.shape, device=device)
    version = out._version
    with torch.inference_mode():
        separable_attention(q, k, v, backend=backend, out=out)
        inference_out = torch.empty(k.shape, device=device)
        separable_attention(q, k, v, backend=backend, out=inference_out)
    assert out._version > version
    assert torch.equal(out, inference_out)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_out_refuses_to_record_gradients(backend):
    device = device_of(backend) if backend != "reference" else "cpu"
    q, k, v = (t.detach().requires_grad_() for t in make_qkv((2, 3, 4, 5), torch.float32,
                                                              device)[:3])
    with pytest.raises(RuntimeError, match=r"out=\.\.\.\) does not record gradients"):
        separable_attention(q, k, v, backend=backend, out=torch.empty_like(k))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
def test_the_raw_out_op_checks_y(backend):
    """Direct ``torch.ops`` calls: the C++ checks name y."""
    q, k, v, _ = make_qkv((2, 3, 4, 5), torch.float32, device_of(backend), "separate")
    out_op = kernel("separable_attention_forward_out", backend)
    with pytest.raises(ValueError, match=r"y must have shape \[2, 3, 4, 5\]"):
        out_op(q, k, v, torch.empty(2, 3, 4, device=k.device))
    with pytest.raises(ValueError, match="y must be contiguous"):
        out_op(q, k, v, torch.empty(2, 3, 5, 4, device=k.device).transpose(2, 3))
    with pytest.raises(ValueError, match="y shares memory with v"):
        out_op(q, k, v, v)
    # The module's layout: q, k, v views of one qkv (too hard for at::assert_no_overlap), and a
    # contiguous y over the start of the same storage.
    q, k, v, _ = make_qkv((2, 3, 4, 5), torch.float32, device_of(backend))
    with pytest.raises(ValueError, match="y shares memory with q"):
        out_op(q, k, v, q._base.view(-1)[:k.numel()].view(k.shape))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(k.detach(), torch.ones_like(k))
        with pytest.raises(RuntimeError, match="records no forward-mode gradients"):
            out_op(q.detach(), dual, v.detach(), torch.empty_like(k))
    with pytest.raises(RuntimeError, match="records no gradients"):
        out_op(*(t.detach().requires_grad_() for t in (q, k, v)), torch.empty_like(k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_compiles_fullgraph(backend):
    """``out=`` inside a compiled inference function: the mutation of a graph input survives
    functionalisation, and the values are the eager call's."""
    torch._dynamo.reset()
    q, k, v, _ = make_qkv((2, 5, 3, 37), torch.float32, device_of(backend))
    out = torch.full(k.shape, float("nan"), device=k.device)

    @torch.compile(fullgraph=True)
    def infer(q, k, v, out):
        return separable_attention(q, k, v, backend=backend, out=out) * 2

    with torch.no_grad():
        doubled = infer(q, k, v, out)
        want = separable_attention(q, k, v, backend=backend)
    assert torch.equal(out, want) and torch.equal(doubled, want * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_out_op(backend):
    q, k, v, _ = make_qkv((2, 17, 2, 65), torch.float32, device_of(backend), "separate")
    kernel("separable_attention_forward_out", backend)  # registers the Triton ops
    suffix = "_triton" if backend == "triton" else ""
    out_op = getattr(torch.ops.mvit2, "separable_attention_forward_out" + suffix)
    torch.library.opcheck(out_op, (q, k, v, torch.empty_like(k)))
