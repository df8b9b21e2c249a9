"""What the Triton kernels share: the interpreter switch, autotuning, op registration, the device
guard, and the jitted helpers (NaN-keeping max and relu, softmax statistics) that mirror
``csrc/cuda/common.cuh`` and ``csrc/cpu/row_ops.h``."""

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op

# Read once, as triton.jit does at decoration time (tests/conftest.py sets it before import).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _autotune(configs: list[tuple[dict, int]], key: list[str]):
    """``triton.autotune`` over ``(meta, num_warps)`` configs on a GPU; identity if interpreted."""
    if _INTERPRET:
        return lambda fn: fn
    return triton.autotune([triton.Config(m, num_warps=w) for m, w in configs], key=key)


def _triton_op(name: str, mutates_args: tuple[str, ...] = ()):
    """``triton_op`` on a GPU. The interpreter runs kernels on host copies of real tensors, so it
    cannot be traced into: there the op is an opaque ``custom_op`` whose fake kernel is the same
    function, which stops before launching when its tensors are fake (see ``_tracing``)."""
    if not _INTERPRET:
        return triton_op(name, mutates_args=mutates_args)

    def register(fn):
        op = custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)
        return op

    return register


def _tracing(t: Tensor) -> bool:
    """Whether an interpreted op is being traced (fake tensors): allocate, launch nothing."""
    return _INTERPRET and is_fake(t)


@triton.jit
def _max_nan(a, b):
    # torch.max propagates NaN; tl.maximum (by default) and tl.max drop it on a GPU. The same
    # select as csrc/cuda/common.cuh's max_nan.
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _softmax_stats(q_row, N, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Max and 1/sum of exp(q - max) over a row of N, in ACC, two passes of BLOCK_N tiles.

    Two passes rather than an online rescale: a leading tile of -inf would otherwise turn the
    running sum into NaN where torch.softmax gives a finite result. A NaN score makes the max
    NaN, and so every s[n], as in csrc/cuda/common.cuh's softmax_stats.
    """
    offs = tl.arange(0, BLOCK_N)
    mx = tl.full([BLOCK_N], float("-inf"), ACC)
    for n0 in range(0, N, BLOCK_N):
        x = tl.load(q_row + n0 + offs, mask=n0 + offs < N, other=float("-inf")).to(ACC)
        mx = _max_nan(mx, x)
    m = tl.reduce(mx, 0, _max_nan)
    acc = tl.zeros([BLOCK_N], ACC)
    for n0 in range(0, N, BLOCK_N):
        mask = n0 + offs < N
        x = tl.load(q_row + n0 + offs, mask=mask, other=float("-inf")).to(ACC)
        acc += tl.where(mask, tl.exp(x - m), 0.0)
    return m, 1.0 / tl.sum(acc, axis=0)


@triton.jit
def _relu(x):
    # torch.relu propagates NaN; tl.maximum(x, 0) need not.
    return tl.where(x < 0, 0.0, x)


def _unit_last_stride(x: Tensor) -> Tensor:
    """The kernels step along N with unit stride; only a strided last axis is copied."""
    return x if x.size(-1) <= 1 or x.stride(-1) == 1 else x.contiguous()


def _device_guard(t: Tensor):
    """Triton launches on the *current* CUDA device and stream: make that t's device (the C++
    kernels use a CUDAGuard). Under torch.compile, Inductor emits its own guard."""
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
