"""Specification of ``separable_attention_layer``: the whole MobileViTv2 attention layer computed
without the keys (docs/design.md §1, "A layer-level identity") equals the standard layer, forward
and every gradient, on every backend; its errors name the argument."""

import pytest
import torch
from conftest import BACKENDS, device_of
from utils import layer_inputs

from mvit2_kernels import separable_attention_layer
from mvit2_kernels.reference import separable_layer_reference

CPP_BACKENDS = [b for b in BACKENDS if b in ("cpu", "cuda")]

# (B, D, P, N, C, D_out): the module's C = D_out = D, plus C != D != D_out, N = 1, odd N, D = 1.
SHAPES = [
    (2, 8, 4, 16, 8, 8),
    (1, 1, 1, 1, 1, 1),
    (3, 5, 4, 7, 5, 5),
    (2, 6, 1, 33, 3, 4),
    (1, 17, 4, 70, 17, 17),
]


def grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wrt, grad_out)


def check_against_the_standard_layer(inputs, backend):
    """The output and every gradient (x, weights, biases) equal the reference layer's."""
    ref_out = separable_layer_reference(*inputs)
    grad_out = torch.randn_like(ref_out)
    out, got = grads(lambda *t: separable_attention_layer(*t, backend=backend), inputs, grad_out)
    _, expected = grads(separable_layer_reference, inputs, grad_out)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_standard_layer_with_every_gradient(shape, bias, backend, poison_empty):
    check_against_the_standard_layer(layer_inputs(shape, device=device_of(backend), bias=bias),
                                     backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    # Small: every input element costs two interpreted forward passes under Triton's interpreter.
    shape = (1, 2, 2, 3, 2, 3)
    inputs = [t.requires_grad_() for t in layer_inputs(shape, device=device_of(backend))]
    assert torch.autograd.gradcheck(
        lambda *t: separable_attention_layer(*t, backend=backend), inputs)


def test_q_bias_gradient_is_exactly_zero():
    inputs = [t.requires_grad_() for t in layer_inputs((2, 4, 3, 9, 4, 4))]
    separable_attention_layer(*inputs).sum().backward()
    assert inputs[2].grad[0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_is_as_accurate_as_the_standard_layer(dtype, backend):
    """Judged against float64: the fused layer's error is within a small factor of the standard
    layer's own error in that dtype (it rounds fewer intermediates: no keys)."""
    device = device_of(backend)
    exact = layer_inputs((2, 32, 2, 64, 32, 32), device=device)
    low = [t.to(dtype) for t in exact]
    # The inputs rounded to dtype, then computed exactly: what both layers approximate.
    target = separable_layer_reference(*(t.double() for t in low))
    grad_out = torch.randn_like(target)
    out, got = grads(lambda *t: separable_attention_layer(*t, backend=backend), low,
                     grad_out.to(dtype))
    std, std_grads = grads(separable_layer_reference, low, grad_out.to(dtype))
    _, exact_grads = grads(separable_layer_reference, [t.double() for t in low], grad_out)

    def err(a, b):
        return (a.double() - b).norm().item() / b.norm().item()

    floor = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    assert err(out, target) <= 2 * err(std, target) + floor
    for a, s, e in zip(got, std_grads, exact_grads, strict=True):
        assert err(a, e) <= 2 * err(s, e) + floor


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_and_training_paths_agree(backend):
    inputs = layer_inputs((2, 8, 4, 16, 8, 8), torch.float32, device_of(backend))
    with torch.no_grad():
        inference = separable_attention_layer(*inputs, backend=backend)
    training = separable_attention_layer(inputs[0].requires_grad_(), *inputs[1:], backend=backend)
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_x_spoils_its_row_like_the_standard_layer(backend):
    x, *weights = layer_inputs((2, 4, 3, 9, 4, 4), torch.float32, device_of(backend))
    x[1, 2, 0, 5] = float("nan")
    x[0, 0, 2, 0] = float("inf")
    out = separable_attention_layer(x, *weights, backend=backend)
    ref = separable_layer_reference(x, *weights)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out.isnan().any()
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


NAN_AT = [  # one element of each input: batch 1, row p = 2 of x; a weight's last channel; q's bias
    ("x", (1, 3, 2, 8)), ("qkv_weight", (8, 3, 0, 0)), ("qkv_weight", (0, 1, 0, 0)),
    ("qkv_bias", (4,)), ("qkv_bias", (0,)), ("out_weight", (3, 3, 0, 0)), ("out_bias", (3,)),
    ("grad_out", (1, 3, 2, 8)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, index", NAN_AT, ids=lambda a: str(a).replace(" ", ""))
def test_one_nan_gives_the_standard_layers_nan_pattern(where, index, backend):
    """docs/design.md §5: a NaN at one element of x, a weight, a bias or grad_out gives NaN in
    the output and every gradient exactly where autograd through the standard layer has it,
    although the fused layer drops q's bias and the softmax backward's constant shift by
    identities that hold only for finite values."""
    x, w_qkv, b_qkv, w_out, b_out = layer_inputs((2, 4, 3, 9, 4, 4), torch.float32,
                                                 device_of(backend))
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(x.device)
    names = ("x", "qkv_weight", "qkv_bias", "out_weight", "out_bias", "grad_out")
    tensors = dict(zip(names, (x, w_qkv, b_qkv, w_out, b_out, grad_out), strict=True))
    tensors[where][index] = float("nan")
    inputs = (x, w_qkv, b_qkv, w_out, b_out)
    out, got = grads(lambda *t: separable_attention_layer(*t, backend=backend), inputs, grad_out)
    ref, expected = grads(separable_layer_reference, inputs, grad_out)
    names = ("out", "dx", "d qkv_weight", "d qkv_bias", "d out_weight", "d out_bias")
    for name, a, b in zip(names, (out, *got), (ref, *expected), strict=True):
        differ = a.isnan() ^ b.isnan()
        assert not differ.any(), f"{name}: NaN on one side only at {differ.nonzero().tolist()}"
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 2, 5, 4, 4), (2, 4, 0, 5, 4, 4), (2, 4, 2, 0, 4, 4),
                                   (2, 0, 2, 5, 3, 3)])
def test_empty_inputs_give_empty_or_reference_results(shape, backend):
    check_against_the_standard_layer(layer_inputs(shape, device=device_of(backend)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    inputs = layer_inputs((2, 8, 4, 24, 8, 8), torch.float32, device_of(backend))

    def loss(*t):
        return separable_attention_layer(*t, backend=backend).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_val, eager_grads = grads(loss, inputs, torch.tensor(1.0))
    val, got = grads(compiled, inputs, torch.tensor(1.0))
    torch.testing.assert_close(val, eager_val, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# Each gradient alone (out_bias's is Σ grad_out, which autograd differentiates itself).
@pytest.mark.parametrize("which", [0, 1, 2, 3], ids=["x", "qkv_weight", "qkv_bias", "out_weight"])
def test_double_backward_raises(which):
    inputs = [t.requires_grad_() for t in layer_inputs((1, 3, 2, 4, 3, 3))]
    (grad,) = torch.autograd.grad(separable_attention_layer(*inputs).square().sum(),
                                  inputs[which], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.square().sum().backward()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "x": a["x"][0]}, r"x must be a 4-D tensor \[B, D, P, N\]"),
        (lambda a: {**a, "qkv_weight": a["qkv_weight"][1:]}, r"qkv_weight must have shape"),
        (lambda a: {**a, "qkv_weight": a["qkv_weight"][:, :3]}, r"D = 4"),
        (lambda a: {**a, "out_weight": a["out_weight"][:, :2]}, r"out_weight .* C = 4"),
        (lambda a: {**a, "qkv_bias": a["qkv_bias"][:3]}, r"qkv_bias must have shape \[9\]"),
        (lambda a: {**a, "out_bias": a["out_bias"][None]}, r"out_bias must have shape \[4\]"),
        (lambda a: {**a, "out_weight": a["out_weight"][..., None]}, r"out_weight must have"),
    ],
)
def test_bad_shapes_are_named(change, match):
    x, w_qkv, b_qkv, w_out, b_out = layer_inputs((2, 4, 3, 5, 4, 4))
    args = dict(x=x, qkv_weight=w_qkv, qkv_bias=b_qkv, out_weight=w_out, out_bias=b_out)
    with pytest.raises(ValueError, match=match):
        separable_attention_layer(**change(args))


def test_bad_dtypes_are_named():
    x, w_qkv, b_qkv, w_out, b_out = layer_inputs((2, 4, 3, 5, 4, 4))
    with pytest.raises(TypeError, match=r"qkv_weight has dtype torch\.float32 but x"):
        separable_attention_layer(x, w_qkv.float(), b_qkv, w_out, b_out)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        separable_attention_layer(x.long(), w_qkv, b_qkv, w_out, b_out)
    with pytest.raises(ValueError, match="backend"):
        separable_attention_layer(x, w_qkv, b_qkv, w_out, b_out, backend="gpu")


@pytest.mark.parametrize("backend", CPP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_the_layer_kernels(backend, dtype):
    ops = torch.ops.mvit2
    x, w_qkv, b_qkv, w_out, b_out = layer_inputs((2, 5, 3, 37, 4, 6), dtype, device_of(backend))
    w_q, w_v = w_qkv[0, :, 0, 0].contiguous(), w_qkv[5:, :, 0, 0].contiguous()
    s, xbar = ops.separable_layer_context_forward(x, w_q)
    ctx = torch.randn(2, 4, 3, dtype=s.dtype, device=s.device)
    v = torch.randn(2, 4, 3, 37, dtype=dtype, device=x.device)
    cases = [
        (ops.separable_layer_context_forward, (x, w_q)),
        (ops.separable_layer_context_backward, (torch.randn_like(xbar), x, w_q, s, xbar)),
        (ops.separable_layer_epilogue_forward, (v, ctx)),
        (ops.separable_layer_epilogue_backward, (torch.randn_like(v), v, ctx)),
    ]
    if backend == "cpu":
        w_o = w_out.flatten(1).contiguous()
        cases += [
            (ops.separable_layer_project_forward, (x, w_v, b_qkv[5:], ctx, w_o, b_out, True)),
            (ops.separable_layer_project_forward, (x, w_v, None, ctx, w_o, None, False)),
            (ops.separable_layer_project_backward,
             (torch.randn(2, 6, 3, 37, dtype=dtype), v, ctx, w_o)),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args)
