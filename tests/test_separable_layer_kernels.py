"""The four kernels of the whole-layer fusion (context and epilogue, forward and backward) on
every backend, each held to its reference contract
``separable_layer_{context,epilogue}_{forward,backward}_reference``.

C++ backends are the ``torch.ops.mvit2`` ops on CPU or CUDA tensors; Triton is
``mvit2_kernels.triton.separable_layer``. Without a GPU Triton runs in its interpreter with fixed
tiles (BLOCK_D = 8, BLOCK_N = 16 for the context kernels, BLOCK_R = 4 rows by BLOCK_N = 16 for
the epilogue): the shapes below sit on and across those tile edges as well as across the CPU
kernels' vectors and the CUDA kernels' row cache. The layer as a whole is specified by
test_separable_layer.py; bad arguments and opcheck by test_separable_layer_kernels_checks.py.
"""

import math
import os

import pytest
import torch
from conftest import BACKENDS, device_of
from utils import assert_close, capture_and_replay, context_inputs, epilogue_inputs, randn

from mvit2_kernels import backends, reference
from mvit2_kernels.kernels import kernel as lookup

KERNELS = (
    "separable_layer_context_forward",
    "separable_layer_context_backward",
    "separable_layer_epilogue_forward",
    "separable_layer_epilogue_backward",
)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (B, D or C, P, N): N = 1; D = 1 with N over two tiles; odd N and D; D a multiple of 4 with N
# one past a vector; B = 1 with N = 1000 (many vectors and a ragged one) and rows of x over
# 128 KiB in fp32 (the CPU kernels then take fewer than P rows at a time).
SHAPES = [(2, 3, 2, 1), (1, 1, 3, 20), (2, 5, 4, 7), (3, 8, 2, 17), (1, 70, 3, 1000)]
# Triton's tiles (from the interpreter's): D one past a tile with N one short of one; both
# exactly one tile; both ragged over three tiles. Rows B·C·P of 1, 15 and 6 for the epilogue.
CONTEXT_SHAPES = [*SHAPES, (1, 9, 2, 15), (2, 8, 1, 16), (1, 17, 2, 33)]
EPILOGUE_SHAPES = [*SHAPES, (1, 1, 1, 17), (1, 5, 3, 16), (2, 3, 1, 33)]
EMPTY_SHAPES = [(0, 3, 2, 5), (2, 0, 2, 5), (2, 3, 0, 5), (2, 3, 2, 0)]
# Triton without a GPU runs in its interpreter, one program at a time: small grids only there.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernel(backend: str, name: str):
    """The backend's kernel `name`. A C++ kernel that is not registered fails where the
    extension was built for that device (a build that lost a registration), and is skipped
    only where it was not."""
    if backend == "triton":
        return lookup(name, "triton")
    key = "CUDA" if backend == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mvit2::{name}", key):
        built = backends.compiled_cuda() if backend == "cuda" else backends.compiled_cpu()
        (pytest.fail if built else pytest.skip)(f"mvit2::{name} has no {key} kernel")
    return lookup(name, backend)


def skip_slow(backend: str, shape) -> None:
    if backend == "triton" and INTERPRETED and shape[1] * shape[3] > 500:
        pytest.skip("too slow for Triton's interpreter (the tile shapes cover its tiles)")


def sized_for(backend: str, shape, D: int = 17, N: int = 70):
    """`shape`, or under Triton's interpreter at most D channels (three D tiles) and N patches
    (five N tiles): its kernels have no row cache or vector width to cross, and it runs a
    program at a time (N = 8200 takes minutes there)."""
    if backend == "triton" and INTERPRETED:
        B, D0, P, N0 = shape
        return B, min(D0, D), P, min(N0, N)
    return shape


def layer_table(backend: str) -> str:
    """The tolerance table: float32 within 1.3e-6 relative (torch's default), as the kernels
    meet it on CPU and in Triton; the CUDA kernels as they were last run on a GPU (2e-5)."""
    return "layer_cuda" if backend == "cuda" else "layer"


def check_context(backend, x, w_q, s_ref, xbar_ref, grad_xbar, equal_nan=False, s=None,
                  dw_q_atol=None):
    """Forward and backward against the contracts. The backward is given the reference's s and
    x̄ (or `s`, the same values in another storage), so it is tested on its own."""
    table = layer_table(backend)
    s_got, xbar = kernel(backend, KERNELS[0])(x, w_q)
    assert_close(s_got, s_ref, table=table, equal_nan=equal_nan, name="s")
    assert_close(xbar, xbar_ref, table=table, equal_nan=equal_nan, name="xbar")
    dx, dw_q = kernel(backend, KERNELS[1])(grad_xbar, x, w_q, s_ref if s is None else s, xbar_ref)
    dx_ref, dw_ref = reference.separable_layer_context_backward_reference(
        grad_xbar, x, w_q, s_ref, xbar_ref
    )
    assert_close(dx, dx_ref, table=table, equal_nan=equal_nan, name="dx")
    atol = {} if dw_q_atol is None else {"atol": dw_q_atol}
    assert_close(dw_q, dw_ref, table=table, equal_nan=equal_nan, name="dw_q", **atol)


def check_epilogue(backend, v, ctx, grad_y, equal_nan=False):
    table = layer_table(backend)
    y = kernel(backend, KERNELS[2])(v, ctx)
    y_ref = reference.separable_layer_epilogue_forward_reference(v, ctx)
    assert_close(y, y_ref, table=table, equal_nan=equal_nan, name="y")
    dv, dctx = kernel(backend, KERNELS[3])(grad_y, v, ctx)
    dv_ref, dctx_ref = reference.separable_layer_epilogue_backward_reference(grad_y, v, ctx)
    assert_close(dv, dv_ref, table=table, equal_nan=equal_nan, name="dv")
    assert_close(dctx, dctx_ref, table=table, equal_nan=equal_nan, name="dctx")


def grad_xbar_for(xbar, seed=3):
    return randn(*xbar.shape, dtype=xbar.dtype, device=xbar.device, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CONTEXT_SHAPES)
def test_context_kernels_match_the_reference(shape, dtype, backend, poison_empty):
    # Under poison_empty, an output element a kernel forgot to write is NaN and fails.
    skip_slow(backend, shape)
    x, w_q, s, xbar = context_inputs(shape, dtype, device_of(backend))
    check_context(backend, x, w_q, s, xbar, grad_xbar_for(xbar))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES)
def test_epilogue_kernels_match_the_reference(shape, dtype, backend, poison_empty):
    skip_slow(backend, shape)
    check_epilogue(backend, *epilogue_inputs(shape, dtype, device_of(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 5, 2, 8200), torch.float32),  # N past the CUDA row cache, forward (8192 floats)
        ((1, 5, 2, 8200), torch.bfloat16),
        ((1, 5, 2, 4100), torch.float32),  # ... and backward (4096 floats), forward cached
        ((1, 5, 2, 4100), torch.bfloat16),
        ((1, 5, 2, 2050), torch.float64),  # float64: backward past the cache at half the N
    ],
    ids=str,
)
def test_context_rows_beyond_the_row_cache_match_the_reference(shape, dtype, backend,
                                                               poison_empty):
    """The CUDA context kernels keep a row's vectors in shared memory up to 32 KiB and in global
    memory beyond (s itself, a workspace): the second path is the one no smaller N reaches."""
    x, w_q, s, xbar = context_inputs(sized_for(backend, shape), dtype, device_of(backend))
    check_context(backend, x, w_q, s, xbar, grad_xbar_for(xbar))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_context_backward_reads_a_misaligned_s(dtype, backend, poison_empty):
    """s a view one element into its storage, with N past the backward's row cache: the CUDA
    kernel reads an uncached s in 16-byte vectors, so it must copy a misaligned one."""
    x, w_q, s_ref, xbar = context_inputs(sized_for(backend, (1, 5, 2, 4100)), dtype,
                                         device_of(backend))
    s = torch.empty(1 + s_ref.numel(), dtype=s_ref.dtype, device=s_ref.device)
    s = s[1:].view(s_ref.shape).copy_(s_ref)
    assert s.is_contiguous() and s.storage_offset() == 1
    check_context(backend, x, w_q, s_ref, xbar, grad_xbar_for(xbar), s=s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 4, 64), (1, 9, 2, 1000)], ids=str)
def test_misaligned_inputs_match_the_reference(shape, dtype, backend, poison_empty):
    """x, v and grad_y as views one element into their storage (``buf[1:].view(...)``): vector
    loads narrow to what the address allows, down to scalars."""
    device, shape = device_of(backend), sized_for(backend, shape)
    x, w_q, s, xbar = context_inputs(shape, dtype, device, offset=1)
    v, ctx, grad_y = epilogue_inputs(shape, dtype, device, offset=1)
    assert x.storage_offset() == v.storage_offset() == grad_y.storage_offset() == 1
    check_context(backend, x, w_q, s, xbar, grad_xbar_for(xbar))
    check_epilogue(backend, v, ctx, grad_y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_channels_and_few_patches_match_the_reference(dtype, backend, poison_empty):
    """D = 600, N = 8: many channel slots (lane groups, D tiles) per row, one short vector
    (under the interpreter D = 200, 25 tiles). dw_q sums 600 channels' products per n in another
    order than the reference: its absolute error is that of the largest terms."""
    shape = sized_for(backend, (1, 600, 2, 8), D=200)
    x, w_q, s, xbar = context_inputs(shape, dtype, device_of(backend))
    check_context(backend, x, w_q, s, xbar, grad_xbar_for(xbar), dw_q_atol=1e-4)
    check_epilogue(backend, *epilogue_inputs(shape, dtype, device_of(backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 70, 4, 64), (1, 128, 4, 256)], ids=str)
def test_context_launch_paths_match_the_reference(shape, dtype, backend, poison_empty):
    """The CUDA context kernels' launches (csrc/cuda/separable_layer.cu): B·P = 512 rows with
    D = 70, more channels than a block has lane groups, takes the fused path with several d slots
    per group; B·P = 4 splits each row's channels over blocks (the split kernels, W = 8 in bf16).
    Other backends: two more shapes against the reference (small under Triton's interpreter).
    dw_q sums B·P·N = 32,768 products per channel: a kernel's sum in another order may differ
    from the reference's by up to twice the reference's own rounding (against float64)."""
    if backend == "triton" and INTERPRETED:
        shape = (2, *sized_for(backend, shape)[1:])
    x, w_q, s, xbar = context_inputs(shape, dtype, device_of(backend))
    grad_xbar = grad_xbar_for(xbar)
    args = (grad_xbar, x, w_q, s, xbar)
    dw_q = reference.separable_layer_context_backward_reference(*args)[1].double()
    dw_q64 = reference.separable_layer_context_backward_reference(*(t.double() for t in args))[1]
    check_context(backend, x, w_q, s, xbar, grad_xbar,
                  dw_q_atol=2 * (dw_q - dw_q64).abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_dims_give_the_reference_results(shape, backend, poison_empty):
    """N = 0: x̄, dw_q and dctx are empty sums, 0. D = 0: every score is 0, so s = 1/N. The
    rest is empty. Poisoned allocations make a result left unwritten fail."""
    x, w_q, s, xbar = context_inputs(shape, torch.float32, device_of(backend))
    check_context(backend, x, w_q, s, xbar, torch.ones_like(xbar))
    check_epilogue(backend, *epilogue_inputs(shape, torch.float32, device_of(backend)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [37, 40, 64])  # 64: the values inside full vectors
def test_context_non_finite_values_propagate_like_the_reference(N, dtype, backend):
    x, w_q, _, _ = context_inputs((1, 5, 4, N), dtype, device_of(backend))
    w_q = w_q.abs()
    x[0, 0, 0, :20] = float("-inf")  # row 0: leading -inf scores (a whole tile) before finite
    x[0, 2, 1, 35] = float("nan")  # row 1: a NaN in the last tile or vector poisons the row
    x[0, 1, 2, :] = float("-inf")  # row 2: every score -inf: torch.softmax gives NaN
    x[0, 4, 3, 6] = float("inf")  # row 3: a score of +inf
    s, xbar = reference.separable_layer_context_forward_reference(x, w_q)
    assert torch.isfinite(s[0, 0]).all() and s[0, 0, :20].eq(0).all()  # the cases hold
    assert s[0, 1].isnan().all() and s[0, 2].isnan().all()
    check_context(backend, x, w_q, s, xbar, grad_xbar_for(xbar), equal_nan=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [20, 37, 64])  # 64: the values inside full vectors
def test_epilogue_non_finite_values_follow_relu_and_its_backward(N, dtype, backend):
    """relu(NaN) = NaN and passes the gradient; v <= 0 stops it even where g * ctx is inf."""
    v, ctx, grad_y = epilogue_inputs((1, 2, 2, N), dtype, device_of(backend))
    v[0, 0, 0, 3], v[0, 0, 0, N - 1], v[0, 1, 1, 7] = float("nan"), float("-inf"), float("inf")
    ctx[0, 1, 1] = 0.0  # inf * 0
    ctx[0, 1, 0] = float("inf")
    v[0, 1, 0, :10] = 0.0  # relu(0) * inf, and a select, not 0 * inf, in the backward
    grad_y[0, 0, 1, 5] = float("inf")
    dv_ref, _ = reference.separable_layer_epilogue_backward_reference(grad_y, v, ctx)
    assert dv_ref[0, 1, 0, :10].eq(0).all() and dv_ref[0, 0, 0, 3].isfinite()  # the cases hold
    check_epilogue(backend, v, ctx, grad_y, equal_nan=True)


NON_FINITE = [float("nan"), float("inf"), float("-inf")]
# The context backward takes sum_n s[n] ds[n] as dx̄ · x̄ (docs/layer_fusion.md), equal in real
# arithmetic, not once an inf in dx̄ makes ds infinite: ds[n] - dot is then inf - inf only where
# the signs agree, where autograd's sum over n of mixed-sign infs is NaN everywhere.
_DOT_IDENTITY = pytest.mark.xfail(
    strict=True, reason="dq of a row with an infinite dx̄: dx̄ · x̄ stands for sum_n s ds"
)


def _contracts(backend, kind):
    """(forward, backward) of the context or epilogue kernels, or their reference contracts."""
    names = KERNELS[:2] if kind == "context" else KERNELS[2:]
    if backend == "reference":
        return tuple(getattr(reference, f"{name}_reference") for name in names)
    return tuple(kernel(backend, name) for name in names)


def _one_non_finite_cases(inputs, infinite_dot=()):
    for where in inputs:
        for value in NON_FINITE:
            marks = [_DOT_IDENTITY] if where in infinite_dot and math.isinf(value) else []
            yield pytest.param(where, value, marks=marks, id=f"{where}-{value}")


def assert_nan_where_autograd_has_it(got, expected, names):
    for name, a, b in zip(names, got, expected, strict=True):
        differ = a.isnan() ^ b.isnan()
        assert not differ.any(), f"{name}: NaN on one side only at {differ.nonzero().tolist()}"
        assert_close(a, b, dtype=torch.float32, rtol=2e-5, atol=2e-5, equal_nan=True, name=name,
                     layout=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize(
    ("where", "value"), list(_one_non_finite_cases(("x", "w_q", "grad_xbar"), ("grad_xbar",)))
)
def test_context_one_non_finite_element_gives_autograds_nan_pattern(backend, where, value):
    """docs/design.md §5 for x, w_q and dx̄ in turn: s, x̄, dx and dw_q have NaN exactly where
    autograd through the forward contract has it (a max that drops a NaN score must not leave its
    softmax row finite), and equal values elsewhere. Row p = 1 only; D = 18 ends in single channels
    on CPU, in a third D tile under Triton's interpreter, N = 37 in a ragged vector or tile."""
    device = "cpu" if backend == "reference" else device_of(backend)
    x, w_q, _, xbar = context_inputs((1, 18, 2, 37), torch.float32, device)
    grad_xbar = grad_xbar_for(xbar)
    tensors = {"x": x, "w_q": w_q, "grad_xbar": grad_xbar}
    tensors[where][{"x": (0, 17, 1, 35), "w_q": (17,), "grad_xbar": (0, 17, 1)}[where]] = value
    x, w_q = x.requires_grad_(), w_q.requires_grad_()
    s_ref, xbar_ref = reference.separable_layer_context_forward_reference(x, w_q)
    expected = (s_ref, xbar_ref, *torch.autograd.grad(xbar_ref, (x, w_q), grad_xbar))
    x, w_q = x.detach(), w_q.detach()
    forward, backward = _contracts(backend, "context")
    s, xbar = forward(x, w_q)
    got = (s, xbar, *backward(grad_xbar, x, w_q, s, xbar))
    assert_nan_where_autograd_has_it(got, expected, ("s", "xbar", "dx", "dw_q"))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize(("where", "value"), list(_one_non_finite_cases(("v", "ctx", "grad_y"))))
def test_epilogue_one_non_finite_element_gives_autograds_nan_pattern(backend, where, value):
    """docs/design.md §5 for v, ctx and grad_y in turn: y, dv and dctx have NaN exactly where
    autograd through relu(v) * ctx has it (relu keeps NaN, its backward passes the gradient at a NaN
    v and blocks it, 0 and not 0 * inf, where v <= 0), and equal values elsewhere."""
    device = "cpu" if backend == "reference" else device_of(backend)
    v, ctx, grad_y = epilogue_inputs((1, 3, 2, 37), torch.float32, device)
    tensors = {"v": v, "ctx": ctx, "grad_y": grad_y}
    tensors[where][{"v": (0, 2, 1, 35), "ctx": (0, 2, 1), "grad_y": (0, 2, 1, 35)}[where]] = value
    v, ctx = v.requires_grad_(), ctx.requires_grad_()
    y_ref = reference.separable_layer_epilogue_forward_reference(v, ctx)
    expected = (y_ref, *torch.autograd.grad(y_ref, (v, ctx), grad_y))
    v, ctx = v.detach(), ctx.detach()
    forward, backward = _contracts(backend, "epilogue")
    got = (forward(v, ctx), *backward(grad_y, v, ctx))
    assert_nan_where_autograd_has_it(got, expected, ("y", "dv", "dctx"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_kernels_are_deterministic(backend):
    """dw_q sums the rows' partials in a fixed order: on CPU the same bits on 1 thread and 2
    (9 rows of 3 batches: the threads' halves split a batch), elsewhere the same bits twice
    (under the interpreter over three D tiles and three N tiles)."""
    shape = (2, 17, 3, 33) if backend == "triton" and INTERPRETED else (3, 70, 3, 256)
    x, w_q, s, xbar = context_inputs(shape, torch.float32, device_of(backend))
    grad_xbar = grad_xbar_for(xbar)
    forward, backward = kernel(backend, KERNELS[0]), kernel(backend, KERNELS[1])
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2) if backend == "cpu" else (threads, threads):
            torch.set_num_threads(n)
            runs.append((*forward(x, w_q), *backward(grad_xbar, x, w_q, s, xbar)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


GPU_BACKENDS = [b for b in BACKENDS if device_of(b) == "cuda"]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_the_kernels_capture_in_a_cuda_graph(backend):
    """The four kernels captured once and replayed on new inputs give what eager calls give
    (a launch on the legacy stream or a host sync would break the capture), and the reference."""
    x, w_q, _, xbar = context_inputs((2, 9, 3, 70), torch.bfloat16, "cuda")
    v, ctx, grad_y = epilogue_inputs((2, 9, 3, 70), torch.bfloat16, "cuda")
    inputs = (x, w_q, grad_xbar_for(xbar), v, ctx, grad_y)
    fwd, bwd, epi, epi_bwd = (kernel(backend, name) for name in KERNELS)

    def step(x, w_q, grad_xbar, v, ctx, grad_y):
        s, xbar = fwd(x, w_q)
        return (s, xbar, *bwd(grad_xbar, x, w_q, s, xbar), epi(v, ctx), *epi_bwd(grad_y, v, ctx))

    new = tuple(t.flip(-1) for t in inputs)
    got = capture_and_replay(step, inputs, new)
    x, w_q, grad_xbar, v, ctx, grad_y = new
    s, xbar = reference.separable_layer_context_forward_reference(x, w_q)
    expected = (s, xbar, *reference.separable_layer_context_backward_reference(
        grad_xbar, x, w_q, got[0], got[1]), reference.separable_layer_epilogue_forward_reference(
        v, ctx), *reference.separable_layer_epilogue_backward_reference(grad_y, v, ctx))
    for name, a, b in zip(("s", "xbar", "dx", "dw_q", "y", "dv", "dctx"), got, expected,
                          strict=True):
        assert_close(a, b, table=layer_table(backend), name=name)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="2**31 elements need a GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["context", "epilogue"])
def test_more_than_2_to_the_31_elements(kind, backend):
    """x, dx, v, y, grad_y, dv of 2.3e9 bf16 elements: 64-bit offsets, and the epilogue's
    grid-stride loop past its capped grid (no smaller tensor wraps it). Batches at element
    offsets past 2**31 match the reference on their slice; dw_q sums every row, so its reference
    is summed over slices."""
    B, D, P, N = 1100, 512, 4, 1032
    tol = {"table": layer_table(backend)}
    numel = B * D * P * N
    assert numel > 2**31
    if torch.cuda.mem_get_info()[0] < 4 * numel * 2 + 2 * 10**9:
        pytest.skip("needs ~21 GB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(B, D, P, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    if kind == "context":
        w_q = torch.randn(D, device="cuda", dtype=torch.bfloat16, generator=gen) * D**-0.5
        s, xbar = kernel(backend, KERNELS[0])(big, w_q)
        grad_xbar = torch.randn(xbar.shape, device="cuda", generator=gen)
        dx, dw_q = kernel(backend, KERNELS[1])(grad_xbar, big, w_q, s, xbar)
        dw_ref = torch.zeros_like(dw_q)
        for b0 in range(0, B, 100):
            sl = slice(b0, b0 + 100)
            s_ref, xbar_ref = reference.separable_layer_context_forward_reference(big[sl], w_q)
            dx_ref, dw_part = reference.separable_layer_context_backward_reference(
                grad_xbar[sl], big[sl], w_q, s[sl], xbar[sl])
            dw_ref += dw_part
            if b0 + 100 >= B:  # the last batches start past element 2**31 of x and dx
                assert_close(s[sl], s_ref, **tol, name="s", layout=False)
                assert_close(xbar[sl], xbar_ref, **tol, name="xbar", layout=False)
                assert_close(dx[sl], dx_ref, **tol, name="dx", layout=False)
        assert_close(dw_q, dw_ref, name="dw_q", rtol=1e-4, atol=1e-3)
        return
    ctx = torch.randn(B, D, P, device="cuda", generator=gen)
    y = kernel(backend, KERNELS[2])(big, ctx)
    for sl in (slice(0, 1), slice(B // 2, B // 2 + 1), slice(B - 1, B)):
        y_ref = reference.separable_layer_epilogue_forward_reference(big[sl], ctx[sl])
        assert_close(y[sl], y_ref, **tol, name="y", layout=False)
    del y
    grad_y = torch.randn(B, D, P, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    dv, dctx = kernel(backend, KERNELS[3])(grad_y, big, ctx)
    for sl in (slice(0, 1), slice(B // 2, B // 2 + 1), slice(B - 1, B)):
        dv_ref, dctx_ref = reference.separable_layer_epilogue_backward_reference(
            grad_y[sl], big[sl], ctx[sl])
        assert_close(dv[sl], dv_ref, **tol, name="dv", layout=False)
        assert_close(dctx[sl], dctx_ref, **tol, name="dctx", layout=False)
