"""The ops are registered with torch.library: opcheck passes, torch.compile traces them whole."""

import pytest
import torch
from conftest import BACKENDS, device_of

from mvit2_kernels import separable_attention
from mvit2_kernels.reference import separable_attention_reference

CPP_BACKENDS = [b for b in BACKENDS if b in ("cpu", "cuda")]


def inputs(device, dtype=torch.float32, shape=(2, 3, 4, 37)):
    B, C, P, N = shape
    qkv = torch.randn(B, 1 + 2 * C, P, N, dtype=dtype, device=device)
    q, k, v = qkv.split([1, C, C], dim=1)
    return q, k, v


@pytest.mark.parametrize("backend", CPP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward_and_backward(backend, dtype):
    q, k, v = inputs(device_of(backend), dtype)
    y, ctx = torch.ops.mvit2.separable_attention_forward(q, k, v)
    torch.library.opcheck(torch.ops.mvit2.separable_attention_forward, (q, k, v))
    torch.library.opcheck(
        torch.ops.mvit2.separable_attention_backward, (torch.randn_like(y), q, k, v, ctx)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    q, k, v = (t.detach().requires_grad_() for t in inputs(device_of(backend), shape=(2, 3, 4, 70)))

    def layer(q, k, v):
        return separable_attention(q, k, v, backend=backend).square().sum()

    compiled = torch.compile(layer, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = separable_attention_reference(q, k, v).square().sum()
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", CPP_BACKENDS)
def test_export_keeps_the_op_in_the_graph(backend):
    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return separable_attention(q, k, v, backend=backend)

    q, k, v = inputs(device_of(backend))
    program = torch.export.export(Layer(), (q, k, v))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.mvit2.separable_attention_forward.default in targets
    torch.testing.assert_close(program.module()(q, k, v), separable_attention_reference(q, k, v))
