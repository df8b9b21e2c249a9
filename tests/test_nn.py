"""Specification of ``mvit2_kernels.nn.SeparableAttention``: the public implementations' layer,
computed by the fused op (docs/design.md §1)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, device_of

import mvit2_kernels.nn as mnn
from mvit2_kernels.nn import SeparableAttention

# (B, C, P, N): N = 1, odd N, C = 1, and the 2×2-patch case.
SHAPES = [(2, 8, 4, 16), (1, 1, 1, 1), (3, 5, 4, 7), (2, 1, 4, 9)]


def make(C, backend="auto", seed=0, **kwargs):
    torch.manual_seed(seed)
    module = SeparableAttention(C, backend=backend, **kwargs)
    with torch.no_grad():  # non-zero biases so a dropped bias shows
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def public_layer(x, module):
    """The layer as ml-cvnets / transformers / timm write it (LinearSelfAttention.forward)."""
    qkv = F.conv2d(x, module.qkv_proj.weight, module.qkv_proj.bias)
    query, key, value = qkv.split([1, module.embed_dim, module.embed_dim], dim=1)
    context = (key * F.softmax(query, dim=-1)).sum(dim=-1, keepdim=True)
    out = F.relu(value) * context.expand_as(value)
    return F.conv2d(out, module.out_proj.weight, module.out_proj.bias)


def test_parameters_are_the_public_layout():
    m = SeparableAttention(6)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"qkv_proj.weight": (13, 6, 1, 1), "qkv_proj.bias": (13,),
                      "out_proj.weight": (6, 6, 1, 1), "out_proj.bias": (6,)}
    assert list(SeparableAttention(6, bias=False).state_dict()) == ["qkv_proj.weight",
                                                                    "out_proj.weight"]


@pytest.mark.parametrize("fused_mode", [True, "kernel"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_public_layer_and_unfused(shape, backend, fused_mode):
    C = shape[1]
    device = device_of(backend)
    fused = make(C, backend, fused=fused_mode).to(device, torch.float64)
    unfused = make(C, fused=False).to(device, torch.float64)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    y = fused(x)
    torch.testing.assert_close(y, public_layer(x, fused))
    torch.testing.assert_close(y, unfused(x))

    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *fused.parameters()], g)
    x2 = x.detach().requires_grad_()
    grads_ref = torch.autograd.grad(unfused(x2), [x2, *unfused.parameters()], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_bias_free(backend):
    device = device_of(backend)
    m = make(8, backend, bias=False).to(device)
    x = torch.randn(2, 8, 4, 12, device=device)
    torch.testing.assert_close(m(x), public_layer(x, m), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    m = make(3).double()
    x = torch.randn(1, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_the_qkv_projection_goes_to_the_op_whole_and_backend_is_passed(monkeypatch):
    seen = {}

    def spy(qkv, *, backend):
        seen.update(qkv=qkv, backend=backend)
        q, k, v = qkv.split([1, 4, 4], dim=1)
        return torch.relu(v) * (k * torch.softmax(q, -1)).sum(-1, keepdim=True)

    monkeypatch.setattr(mnn, "separable_attention_qkv", spy)
    m = make(4, backend="reference", fused="kernel")
    m(torch.randn(2, 4, 4, 6))
    assert seen["backend"] == "reference"
    assert seen["qkv"].shape == (2, 1 + 2 * 4, 4, 6)


def test_attn_dropout_in_training_runs_the_reference_with_dropout_on_the_weights(monkeypatch):
    monkeypatch.setattr(mnn, "_warned_dropout_fallback", False)
    m = make(4, attn_dropout=0.5).train()
    x = torch.randn(2, 4, 4, 10)
    with pytest.warns(UserWarning, match="attn_dropout"):
        torch.manual_seed(1)
        y = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per call
        m(x)

    torch.manual_seed(1)  # the same dropout mask, applied where the public code applies it
    qkv = m.qkv_proj(x)
    q, k, v = qkv.split([1, 4, 4], dim=1)
    s = F.dropout(F.softmax(q, dim=-1), p=0.5, training=True)
    expected = m.out_proj(F.relu(v) * (k * s).sum(-1, keepdim=True))
    torch.testing.assert_close(y, expected)


def test_attn_dropout_in_eval_mode_and_zero_dropout_in_training_are_fused(monkeypatch):
    calls = []
    real = mnn.separable_attention_layer

    def counting(*args, backend):
        calls.append(backend)
        return real(*args, backend=backend)

    monkeypatch.setattr(mnn, "separable_attention_layer", counting)
    x = torch.randn(1, 4, 4, 6)
    make(4, attn_dropout=0.1).eval()(x)
    make(4).train()(x)
    assert len(calls) == 2


def test_fused_true_runs_the_layer_without_the_qkv_projection(monkeypatch):
    m = make(4)
    monkeypatch.setattr(m.qkv_proj, "forward", lambda x: pytest.fail("qkv_proj was called"))
    y = m(torch.randn(2, 4, 4, 6))
    assert y.shape == (2, 4, 4, 6)


class ScaledConv(torch.nn.Conv2d):
    """A projection that is not a plain 1×1 convolution (a subclass may compute anything)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_fused_true_runs_projections_that_are_not_plain_convs_as_modules(monkeypatch):
    m = make(4)
    scaled = ScaledConv(4, 9, 1)
    scaled.load_state_dict(m.qkv_proj.state_dict())
    m.qkv_proj = scaled
    monkeypatch.setattr(mnn, "separable_attention_layer", lambda *a, **k: pytest.fail("layer"))
    x = torch.randn(2, 4, 4, 6)
    expected = make(4, fused=False)
    expected.qkv_proj = scaled
    torch.testing.assert_close(m(x), expected(x))


def test_fused_true_runs_projections_with_hooks_as_modules():
    """A hook on a projection (an observer, pruning, weight norm) still runs, and sees the
    projection's input."""
    m, seen = make(4), []
    m.qkv_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    x = torch.randn(2, 4, 4, 6)
    torch.testing.assert_close(m(x), public_layer(x, m))
    assert seen == [x.shape]


def test_float64_under_autocast_stays_float64_like_the_convs():
    m, x = make(4).double(), torch.randn(2, 4, 4, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, public_layer(x, m))


def test_fused_modes_share_one_state_dict():
    ref = make(4, fused=False)
    for mode in (True, "kernel"):
        m = make(4, seed=1, fused=mode)
        m.load_state_dict(ref.state_dict())
        x = torch.randn(2, 4, 4, 6)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_mode", [True, "kernel"])
def test_torch_compile_fullgraph_matches_eager(fused_mode):
    m = make(8, fused=fused_mode).eval()
    x = torch.randn(2, 8, 4, 16)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="embed_dim"):
        SeparableAttention(0)
    with pytest.raises(ValueError, match="attn_dropout"):
        SeparableAttention(4, attn_dropout=1.0)
    with pytest.raises(ValueError, match="fused"):
        SeparableAttention(4, fused="layer")
    with pytest.raises(ValueError, match="backend"):
        SeparableAttention(4, backend="nope")(torch.randn(1, 4, 4, 4))
