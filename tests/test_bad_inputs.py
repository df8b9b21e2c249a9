"""docs/design.md §5: bad input raises an error that names the argument and the expected shape."""

import pytest
import torch
from conftest import BACKENDS, device_of

from mvit2_kernels import separable_attention


def qkv(B=2, C=3, P=4, N=5, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(B, 1, P, N, dtype=dtype, device=device),
        torch.randn(B, C, P, N, dtype=dtype, device=device),
        torch.randn(B, C, P, N, dtype=dtype, device=device),
    )


def with_(args, **changes):
    q, k, v = args
    return changes.get("q", q), changes.get("k", k), changes.get("v", v)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference", "auto"])
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: with_(a, q=a[0][0]), ValueError, r"q must be a 4-D tensor \[B, 1, P, N\]"),
        (lambda a: with_(a, k=a[1][None]), ValueError, r"k must be a 4-D tensor \[B, C, P, N\]"),
        (lambda a: with_(a, v=a[2][..., 0]), ValueError, r"v must be a 4-D tensor"),
        (
            lambda a: with_(a, q=a[0].expand(2, 2, 4, 5)),
            ValueError,
            r"q must have shape \[B, 1, P, N\]",
        ),
        (lambda a: with_(a, q=a[0][:1]), ValueError, r"q must have shape .* got \[1, 1, 4, 5\]"),
        (lambda a: with_(a, q=a[0][:, :, :3]), ValueError, r"q must have shape"),
        (lambda a: with_(a, q=a[0][..., :4]), ValueError, r"q must have shape"),
        (lambda a: with_(a, v=a[2][:, :2]), ValueError, r"v must have shape \[B, C, P, N\]"),
        (lambda a: with_(a, v=a[2].double()), TypeError, r"v has dtype torch.float64 but k has"),
        (lambda a: with_(a, q=a[0].half()), TypeError, r"q has dtype torch.float16"),
        (lambda a: tuple(t.int() for t in a), TypeError, r"q must be float16, bfloat16, float32"),
        (lambda a: with_(a, k=a[1].to(torch.complex64)), TypeError, r"k must be float16"),
        (lambda a: with_(a, q=a[0].to("meta")), ValueError, r"q is on meta but k is on"),
        (lambda a: with_(a, v=a[2].tolist()), TypeError, r"v must be a torch.Tensor, got list"),
    ],
)
def test_bad_input_raises_naming_the_argument(backend, change, error, match):
    args = change(qkv(device=device_of(backend) if backend in BACKENDS else "cpu"))
    with pytest.raises(error, match=match):
        separable_attention(*args, backend=backend)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        separable_attention(*qkv(), backend="fortran")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_backend_without_a_gpu_fails_clearly():
    with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
        separable_attention(*qkv(), backend="cuda")


def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="backend='cpu' runs CPU tensors"):
        separable_attention(*qkv(device="meta"), backend="cpu")


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (
            lambda: (*qkv()[:2], torch.randn(2, 3, 4, 6)),
            ValueError,
            r"v must have shape \[2, 3, 4, 5\]",
        ),
        (
            lambda: (torch.randn(2, 2, 4, 5), *qkv()[1:]),
            ValueError,
            r"q must have shape \[2, 1, 4, 5\]",
        ),
        (lambda: (*qkv()[:2], torch.randn(2, 3, 4, 5).double()), TypeError, r"v must have dtype"),
        (lambda: tuple(t.long() for t in qkv()), TypeError, r"k must be float16, bfloat16"),
    ],
)
def test_the_compiled_op_checks_its_arguments_too(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.mvit2.separable_attention_forward(*args())


def test_the_compiled_backward_checks_ctx():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"ctx must have shape \[2, 3, 4, 1\]"):
        torch.ops.mvit2.separable_attention_backward(k, q, k, v, torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="ctx must have dtype Float"):
        torch.ops.mvit2.separable_attention_backward(k, q, k, v, torch.zeros(2, 3, 4, 1).double())
