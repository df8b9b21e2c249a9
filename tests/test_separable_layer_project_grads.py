"""Specification of the CPU kernels ``separable_layer_project_{weight,input}_backward``: the fused
layer's projection gradients, ``dW = sum_{b,p,n} grad (x) input`` and ``dx += W^T dv`` in place,
held against float64 einsums of the same (rounded) inputs."""

import pytest
import torch
from utils import acc_of, randn, sum_tolerance

from mvit2_kernels import backends

pytestmark = pytest.mark.skipif(not backends.compiled_cpu(), reason="C++ extension not built")

# (B, C, D, P, N): C off the register block (8 rows), D off the vector width (16 floats, 8
# doubles), N = 1, N over one column block (128), tiles of several rows (b, p) that end short,
# and MobileViTv2's L5 (N = 16) at a small batch.
SHAPES = [
    (5, 6, 7, 4, 5),
    (5, 17, 7, 4, 5),  # three panels, the last of one row, and tiles of 3 and then 2 rows
    (1, 1, 1, 1, 1),
    (2, 17, 3, 3, 1),
    (1, 3, 130, 2, 37),
    (2, 130, 17, 1, 33),
    (1, 24, 9, 2, 300),
    (3, 32, 32, 4, 16),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _ops():
    return torch.ops.mvit2


def weight_reference(grad, input):
    return torch.einsum("bopn,bipn->oi", grad.double(), input.double())


def input_reference(dx, dv, w):
    return dx.double() + torch.einsum("ci,bcpn->bipn", w.double(), dv.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weight_backward_sums_grad_times_input_over_every_column(shape, dtype, poison_empty):
    B, C, D, P, N = shape
    grad, input = randn(B, C, P, N, dtype=dtype), randn(B, D, P, N, dtype=dtype, seed=1)
    dw = _ops().separable_layer_project_weight_backward(grad, input)
    assert dw.shape == (C, D) and dw.dtype == acc_of(dtype) and dw.is_contiguous()
    # dW stays in the accumulation dtype: no rounding to dtype, whatever the inputs'.
    torch.testing.assert_close(dw.double(), weight_reference(grad, input),
                               **sum_tolerance(dtype, B * P * N, rounded=False))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_backward_adds_w_transpose_dv_in_place(shape, dtype, poison_empty):
    B, C, D, P, N = shape
    dv, w = randn(B, C, P, N, dtype=dtype), randn(C, D, dtype=dtype, seed=1, scale=C ** -0.5)
    dx = randn(B, D, P, N, dtype=dtype, seed=2)
    expected, storage = input_reference(dx, dv, w), dx.data_ptr()
    assert _ops().separable_layer_project_input_backward(dx, dv, w) is None
    assert dx.data_ptr() == storage and dx.dtype == dtype
    torch.testing.assert_close(dx.double(), expected, **sum_tolerance(dtype, C))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nonfinite_values_propagate_like_the_einsums(dtype):
    B, C, D, P, N = 2, 9, 10, 2, 40
    grad, input = randn(B, C, P, N, dtype=dtype), randn(B, D, P, N, dtype=dtype, seed=1)
    grad[0, 3, 1, 5], input[1, 4, 1, 39] = float("nan"), float("inf")  # 39: the padded vector
    dw = _ops().separable_layer_project_weight_backward(grad, input)
    ref = weight_reference(grad, input)
    assert dw[3].isnan().all() and dw[:, 4].isnan().any()
    torch.testing.assert_close(dw.double(), ref, equal_nan=True, **sum_tolerance(dtype, B * P * N))
    w, dx = randn(C, D, dtype=dtype, seed=3), randn(B, D, P, N, dtype=dtype, seed=4)
    dx[1, 0, 0, 7] = -float("inf")
    expected = input_reference(dx, grad, w)
    _ops().separable_layer_project_input_backward(dx, grad, w)
    assert dx.isnan().any() and dx.isinf().any()
    torch.testing.assert_close(dx.double(), expected, equal_nan=True, **sum_tolerance(dtype, C))


@pytest.mark.parametrize("empty", ["B", "C", "D", "P", "N"])
def test_empty_dimensions(empty):
    sizes = dict(B=2, C=5, D=3, P=2, N=7)
    sizes[empty] = 0
    B, C, D, P, N = (sizes[k] for k in ("B", "C", "D", "P", "N"))
    grad, input = randn(B, C, P, N, dtype=torch.float32), randn(B, D, P, N, dtype=torch.float32)
    dw = _ops().separable_layer_project_weight_backward(grad, input)
    torch.testing.assert_close(dw, torch.zeros(C, D))  # no columns: zeros
    dx = randn(B, D, P, N, dtype=torch.float32, seed=2)
    before = dx.clone()
    _ops().separable_layer_project_input_backward(dx, grad, randn(C, D, dtype=torch.float32))
    assert torch.equal(dx, before)  # C = 0: nothing to add


def test_results_do_not_depend_on_the_thread_count():
    shape = (3, 20, 24, 2, 290)  # 18 tasks: dW sums tiles in fixed slices of them
    B, C, D, P, N = shape
    grad, input = randn(B, C, P, N, dtype=torch.float32), randn(B, D, P, N, dtype=torch.float32)
    w, dx = randn(C, D, dtype=torch.float32), randn(B, D, P, N, dtype=torch.float32, seed=2)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        try:
            out = dx.clone()
            _ops().separable_layer_project_input_backward(out, grad, w)
            results.append((_ops().separable_layer_project_weight_backward(grad, input), out))
        finally:
            torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)
    # Several tiles per partial-sum slice: every tile counted once.
    dw, out = results[0]
    torch.testing.assert_close(dw.double(), weight_reference(grad, input),
                               **sum_tolerance(torch.float32, B * P * N))
    torch.testing.assert_close(out.double(), input_reference(dx, grad, w),
                               **sum_tolerance(torch.float32, C))


def test_bad_inputs_raise_naming_the_argument():
    grad, input = randn(2, 3, 2, 7, dtype=torch.float32), randn(2, 5, 2, 7, dtype=torch.float32)
    weight = _ops().separable_layer_project_weight_backward
    with pytest.raises(ValueError, match="grad must be a 4-D tensor"):
        weight(grad[0], input)
    with pytest.raises(ValueError, match=r"input must have shape \[B, I, P, N\] = \[2, I, 2, 7\]"):
        weight(grad, input[:, :, :, :6].contiguous())
    with pytest.raises(TypeError, match="input must have dtype Float like grad"):
        weight(grad, input.double())
    with pytest.raises(ValueError, match="input must be contiguous"):
        weight(grad, input.transpose(2, 3).contiguous().transpose(2, 3))
    add = _ops().separable_layer_project_input_backward
    dx, w = input.clone(), randn(3, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"w must have shape \[C, D\] = \[3, 5\]"):
        add(dx, grad, w[:, :4].contiguous())
    with pytest.raises(ValueError, match=r"dv must have shape \[B, C, P, N\]"):
        add(dx, grad[:1].contiguous(), w)
    with pytest.raises(TypeError, match="w must have dtype Float like dx"):
        add(dx, grad, w.double())
    with pytest.raises(ValueError, match="w must be contiguous"):
        add(dx, grad, w.t().contiguous().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    grad, input = randn(2, 6, 3, 37, dtype=dtype), randn(2, 4, 3, 37, dtype=dtype, seed=1)
    torch.library.opcheck(_ops().separable_layer_project_weight_backward, (grad, input))
    torch.library.opcheck(_ops().separable_layer_project_input_backward,
                          (input.clone(), grad, randn(6, 4, dtype=dtype, seed=2)))
