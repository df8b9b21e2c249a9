"""Specification of ``additive_attention`` (SwiftFormer, docs/design.md §2): every backend, both
variants.

The reference (``additive_attention_reference``, the published maths) is the oracle; its
hand-derived backward is itself held to autograd in float64 first.
"""

import pytest
import torch
from conftest import BACKENDS, device_of
from utils import additive_grads, assert_close, capture_and_replay, make_qkw

from mvit2_kernels.ops import additive_attention
from mvit2_kernels.reference import (
    additive_attention_backward_reference,
    additive_attention_forward_reference,
    additive_attention_reference,
)

VARIANTS = ["normalize", "softmax"]
# (B, N, D): odd sizes, N = 1, D = 1, N in the thousands, SwiftFormer-XS's last stage (D = 220),
# L3's (D = 384: 16 features per lane of one 512-wide CUDA feature tile) and D = 1100 (three such
# tiles, the last one ragged).
SHAPES = [(2, 37, 24), (1, 1, 1), (1, 1, 16), (3, 130, 7), (1, 3000, 20), (2, 49, 220),
          (2, 49, 384), (2, 33, 1100)]
EMPTY_SHAPES = [(0, 5, 8), (2, 0, 8), (2, 5, 0)]
INTERPRETED = [b for b in BACKENDS if b == "triton" and device_of(b) == "cpu"]


def run(q, k, w, leaves, backend, variant, grads=None):
    """(out, qn) and, given their gradients, those of the leaves (the reference if no backend)."""
    if backend is None:
        outs = additive_attention_reference(q, k, w, variant)
    else:
        outs = additive_attention(q, k, w, variant=variant, backend=backend)
    return outs, (None if grads is None else torch.autograd.grad(outs, leaves, grads))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["random", "zero_rows", "zero_w_g"])
def test_hand_derived_backward_matches_autograd_float64(variant, case):
    """The reference backward (the spec of every kernel's backward) is autograd's, including the
    clamped branches: a zero q or k row, and ||a|| = 0 (w_g = 0)."""
    w_scale = 0.0 if case == "zero_w_g" else 1.0
    q, k, w, _ = make_qkw((3, 11, 6), torch.float64, "cpu", w_scale=w_scale)
    if case == "zero_rows":
        q[0, 3], k[2, 7] = 0, 0
    q, k, w = (t.requires_grad_() for t in (q, k, w))
    outs = additive_attention_reference(q, k, w, variant)
    grads = additive_grads(q.shape, torch.float64, "cpu")
    expected = torch.autograd.grad(outs, (q, k, w), grads)
    out, qn, g, a_norm = additive_attention_forward_reference(q, k, w, variant)
    torch.testing.assert_close((out, qn), outs)
    got = additive_attention_backward_reference(*grads, q, k, w, g, a_norm, variant)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * expected[0].abs().max())


def test_softmax_variant_weights_every_token_by_one():
    """The original release's softmax is over a size-1 axis: G is the plain sum of qn."""
    q, k, w, _ = make_qkw((2, 9, 5), torch.float64, "cpu")
    out, qn = additive_attention_reference(q, k, w, "softmax")
    kn = torch.nn.functional.normalize(k, dim=-1)
    torch.testing.assert_close(out, qn.sum(dim=1, keepdim=True) * kn)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["views", "separate", "transposed"])
def test_forward_and_backward_match_reference(backend, variant, dtype, shape, layout):
    if backend in INTERPRETED and max(shape) > 200:
        pytest.skip("interpreter: small N and D for time (its 16-wide D tiles make D = 20 and 24 "
                    "span several tiles already)")
    device = device_of(backend)
    grads = additive_grads(shape, dtype, device)
    outs, dl = run(*make_qkw(shape, dtype, device, layout, True), backend, variant, grads)
    outs_ref, dl_ref = run(*make_qkw(shape, dtype, device, layout, True), None, variant, grads)
    grads64 = tuple(g.double() for g in grads)
    qkw64 = make_qkw(shape, torch.float64, device, layout, True)
    outs64, dl64 = run(*qkw64, None, variant, grads64)
    names = ("out", "qn", *(f"grad of leaf {i}" for i in range(len(dl))))
    for name, t, t_ref, t64 in zip(names, (*outs, *dl), (*outs_ref, *dl_ref), (*outs64, *dl64),
                                   strict=True):
        assert t.dtype == dtype and t.shape == t_ref.shape, name
        assert_close(t, t_ref, exact=t64, slack="additive", name=name, layout=False)
    assert all(t.is_contiguous() for t in outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ops_match_the_op_contract(backend, variant, dtype):
    """The forward op's saved statistics (G, ||a||) and the backward op against the reference
    contract, called directly."""
    q, k, w, _ = make_qkw((2, 70, 12), dtype, device_of(backend), "views")
    fwd, bwd = _ops(backend)
    got = fwd(q, k, w, variant)
    expected = additive_attention_forward_reference(q, k, w, variant)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[2].dtype == got[3].dtype == acc
    tol = {} if dtype != torch.bfloat16 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, expected, **tol)
    grads = additive_grads(q.shape, dtype, q.device)
    torch.testing.assert_close(
        bwd(*grads, q, k, w, *expected[2:], variant),
        additive_attention_backward_reference(*grads, q, k, w, *expected[2:], variant),
        **tol,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 5, 3), (1, 1, 1), (1, 40, 4)])
def test_gradcheck_float64(backend, variant, shape):
    if backend in INTERPRETED and shape[1] > 5:
        pytest.skip("interpreter: numerical gradients of N = 40 take minutes")
    q, k, w, _ = make_qkw(shape, torch.float64, device_of(backend), "separate", True)
    assert torch.autograd.gradcheck(
        lambda q, k, w: additive_attention(q, k, w, variant=variant, backend=backend),
        (q, k, w),
        fast_mode=backend in INTERPRETED,  # one random projection instead of every input
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_rows_and_zero_w_g_follow_autograd(backend, variant):
    """F.normalize's clamp: zero q/k rows give dx = dxn / eps; ||a|| = 0 gives da = dalpha / eps."""
    for w_scale in (1.0, 0.0):
        q, k, w, _ = make_qkw((2, 9, 5), torch.float64, device_of(backend), w_scale=w_scale)
        q[1, 2], k[0, 4] = 0, 0
        grads = additive_grads(q.shape, torch.float64, q.device)
        got = run(
            q,
            k,
            w.requires_grad_(),
            [q.requires_grad_(), k.requires_grad_(), w],
            backend,
            variant,
            grads,
        )
        torch.testing.assert_close(got, run(q, k, w, [q, k, w], None, variant, grads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES)
def test_empty_inputs_give_empty_results(backend, shape):
    q, k, w, leaves = make_qkw(shape, torch.float32, device_of(backend), "separate", True)
    grads = additive_grads(shape, torch.float32, q.device)
    outs, dl = run(q, k, w, leaves, backend, "normalize", grads)
    outs_ref, dl_ref = run(q, k, w, leaves, None, "normalize", grads)
    torch.testing.assert_close((*outs, *dl), (*outs_ref, *dl_ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_are_fully_written(backend, variant, poison_empty):
    """With NaN-filled allocations, no element of out, qn, dq, dk, dw_g stays NaN."""
    q, k, w, leaves = make_qkw((2, 67, 19), torch.float32, device_of(backend), "views", True)
    grads = additive_grads(q.shape, torch.float32, q.device)
    outs, dl = run(q, k, w, leaves, backend, variant, grads)
    assert not any(t.isnan().any() for t in (*outs, *dl))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_non_finite_values_propagate_like_the_reference(backend, variant):
    q, k, w, _ = make_qkw((3, 6, 5), torch.float32, device_of(backend))
    q[0, 2, 1] = float("nan")  # batch 0: qn row NaN, and through G every output of the batch
    k[1, 3, 0] = float("inf")  # batch 1: that kn row is NaN where k is inf (inf / inf), else 0
    w_inf = w.clone()
    w_inf[4, 0] = float("inf")  # every weight a is +-inf or NaN: alpha is NaN in both variants
    for w_g in (w, w_inf):
        torch.testing.assert_close(
            additive_attention(q, k, w_g, variant=variant, backend=backend),
            additive_attention_reference(q, k, w_g, variant),
            equal_nan=True,
        )


NON_FINITE = [float("nan"), float("inf"), float("-inf")]
NON_FINITE_INPUTS = ["q", "k", "w_g", "grad_out", "grad_qn"]


# D = 18 leaves the element at d = 17 in the CPU kernels' scalar tail; at D = 64 it sits inside a
# vector (the second lane of the second 16-wide or of the third 8-wide one).
NON_FINITE_SHAPES = [(2, 20, 18), (2, 20, 64)]


def one_non_finite(where, value, device, shape):
    """q, k, w_g, grad_out, grad_qn in float32 with `value` at one element of `where` (batch 1
    for the [B, N, D] tensors: batch 0 stays finite). Under Triton's interpreter the shapes span
    two token chunks, several D tiles and rows past N in the last row tile."""
    q, k, w, _ = make_qkw(shape, torch.float32, device)
    grads = additive_grads(shape, torch.float32, device)
    tensors = dict(zip(NON_FINITE_INPUTS, (q, k, w, *grads), strict=True))
    t = tensors[where]
    t[(1, 13, 17) if t.dim() == 3 else (11, 0)] = value
    return tensors


def assert_same_non_finite(got, expected, names):
    """NaN exactly where expected has it; inf and the finite values equal or close."""
    for name, a, b in zip(names, got, expected, strict=True):
        differ = a.isnan() ^ b.isnan()
        assert not differ.any(), f"{name}: NaN on one side only at {differ.nonzero().tolist()}"
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


def _contract(backend):
    """The forward and backward ops of a backend, or the reference's contract functions."""
    if backend == "reference":
        return additive_attention_forward_reference, additive_attention_backward_reference
    return _ops(backend)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("where", NON_FINITE_INPUTS)
@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("shape", NON_FINITE_SHAPES, ids=["D18", "D64"])
def test_one_non_finite_element_gives_autograds_nan_pattern(backend, variant, where, value, shape):
    """docs/design.md §5 for each input and incoming gradient in turn: the outputs, the saved G and
    ||a||, and dq, dk, dw_g have NaN exactly where autograd through the published maths (and the
    forward contract) has it, and equal values elsewhere. A clamp's branch taken on a false
    comparison (``||k|| >= eps`` for a NaN norm) would give finite gradients there instead."""
    if backend in INTERPRETED and shape[2] == 64 and value != NON_FINITE[0]:
        pytest.skip("interpreter: NaN alone at D = 64, for time (+-inf run at D = 18)")
    device = "cpu" if backend == "reference" else device_of(backend)
    t = one_non_finite(where, value, device, shape)
    q, k, w = (t[name].requires_grad_() for name in ("q", "k", "w_g"))
    outs = additive_attention_reference(q, k, w, variant)
    expected = (*outs, *torch.autograd.grad(outs, (q, k, w), (t["grad_out"], t["grad_qn"])))
    q, k, w = (x.detach() for x in (q, k, w))
    fwd, bwd = _contract(backend)
    out, qn, g, a_norm = fwd(q, k, w, variant)
    dq, dk, dw = bwd(t["grad_out"], t["grad_qn"], q, k, w, g, a_norm, variant)
    assert_same_non_finite((out, qn, dq, dk, dw), expected, ("out", "qn", "dq", "dk", "dw_g"))
    assert_same_non_finite(
        (g, a_norm), additive_attention_forward_reference(q, k, w, variant)[2:], ("g", "a_norm")
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    N = 100 if backend in INTERPRETED else 700  # several chunks either way
    q, k, w, leaves = make_qkw((1, N, 16), torch.float32, device_of(backend), "views", True)
    grads = additive_grads(q.shape, torch.float32, q.device)
    first, second = (run(q, k, w, leaves, backend, "normalize", grads)[1] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_cpu_results_do_not_depend_on_the_thread_count():
    q, k, w, leaves = make_qkw((1, 3000, 24), torch.float32, "cpu", "views", True)
    grads = additive_grads(q.shape, torch.float32, "cpu")
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs, dl = run(q, k, w, leaves, "cpu", "normalize", grads)
            results.append((*outs, *dl))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    q, k, w, _ = make_qkw((1, 4, 3), torch.float64, device_of(backend), "separate", True)
    out, qn = additive_attention(q, k, w, backend=backend)
    (dw,) = torch.autograd.grad((out + qn).sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dw.sum().backward()


def _ops(backend):
    if backend == "triton":
        from mvit2_kernels.triton.additive_attention import (
            additive_attention_backward,
            additive_attention_forward,
        )

        return additive_attention_forward, additive_attention_backward
    return torch.ops.mvit2.additive_attention_forward, torch.ops.mvit2.additive_attention_backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck_forward_and_backward(backend, variant):
    q, k, w, _ = make_qkw((2, 21, 8), torch.float32, device_of(backend), "views")
    fwd, bwd = _ops(backend)
    if backend == "triton":
        fwd, bwd = (
            torch.ops.mvit2.additive_attention_forward_triton,
            torch.ops.mvit2.additive_attention_backward_triton,
        )
    _out, _qn, g, a_norm = fwd(q, k, w, variant)
    torch.library.opcheck(fwd, (q, k, w, variant))
    grads = additive_grads(q.shape, q.dtype, q.device)
    torch.library.opcheck(bwd, (*grads, q, k, w, g, a_norm, variant))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    q, k, w, _ = make_qkw((2, 37, 8), torch.float32, device_of(backend), "separate", True)

    def layer(q, k, w):
        out, qn = additive_attention(q, k, w, variant="normalize", backend=backend)
        return (out.square() + qn * 0.5).sum()

    loss = torch.compile(layer, fullgraph=True)(q, k, w)
    grads = torch.autograd.grad(loss, (q, k, w))
    out, qn = additive_attention_reference(q, k, w, "normalize")
    loss_ref = (out.square() + qn * 0.5).sum()
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grads, torch.autograd.grad(loss_ref, (q, k, w)))


def _qkw(B=2, N=5, D=4, dtype=torch.float32):
    return torch.randn(B, N, D, dtype=dtype), torch.randn(B, N, D, dtype=dtype), torch.randn(D, 1)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference", "auto"])
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda q, k, w: (q[0], k, w), ValueError, r"q must have shape \[B, N, D\] = \[2, 5, 4\]"),
        (lambda q, k, w: (q, k[0], w), ValueError, r"k must be a 3-D tensor \[B, N, D\]"),
        (lambda q, k, w: (q, k[:, :3], w), ValueError, r"q must have shape .* got \[2, 5, 4\]"),
        (lambda q, k, w: (q, k, w[:, 0]), ValueError, r"w_g must have shape \[D, 1\] = \[4, 1\]"),
        (lambda q, k, w: (q, k, w[:3]), ValueError, r"w_g must have shape \[D, 1\]"),
        (lambda q, k, w: (q, k, w.double()), TypeError, r"w_g has dtype torch.float64 but k"),
        (lambda q, k, w: (q.half(), k, w), TypeError, r"q has dtype torch.float16 but k"),
        (lambda q, k, w: (q.int(), k.int(), w.int()), TypeError, r"q must be float16, bfloat16"),
        (lambda q, k, w: (q, k, w.to("meta")), ValueError, r"w_g is on meta but k is on"),
        (lambda q, k, w: (q, k, w.tolist()), TypeError, r"w_g must be a torch.Tensor, got list"),
    ],
)
def test_bad_input_raises_naming_the_argument(backend, change, error, match):
    with pytest.raises(error, match=match):
        additive_attention(*change(*_qkw()), backend=backend)


def test_unknown_variant_and_backend_are_value_errors():
    with pytest.raises(ValueError, match=r"variant must be one of \('normalize', 'softmax'\)"):
        additive_attention(*_qkw(), variant="sigmoid")
    with pytest.raises(ValueError, match="backend must be one of"):
        additive_attention(*_qkw(), backend="fortran")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "cuda")])
def test_direct_op_calls_check_their_arguments(backend):
    q, k, w = (t.to(device_of(backend)) for t in _qkw())
    fwd, bwd = _ops(backend)
    with pytest.raises(ValueError, match=r"w_g must have shape \[4, 1\]"):
        fwd(q, k, w[:3], "normalize")
    with pytest.raises(ValueError, match=r"variant must be \"normalize\" or \"softmax\""):
        fwd(q, k, w, "sigmoid")
    _out, _qn, g, a_norm = fwd(q, k, w, "normalize")
    with pytest.raises(TypeError, match="g must have dtype Float"):
        bwd(q, q, q, k, w, g.double(), a_norm, "normalize")
    with pytest.raises(ValueError, match=r"a_norm must have shape \[2\]"):
        bwd(q, q, q, k, w, g, a_norm[:1], "normalize")


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if device_of(b) == "cuda"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_backward_capture_in_a_cuda_graph(backend, variant):
    """Captured once and replayed on new inputs, the forward and backward ops give what eager
    calls give (a launch on the legacy stream or a host sync would break the capture), and the
    reference. D = 600 takes two 512-wide feature tiles on CUDA."""
    fwd, bwd = _ops(backend)
    q, k, w, _ = make_qkw((2, 70, 600), torch.bfloat16, "cuda")
    grad_out, grad_qn = additive_grads(q.shape, torch.bfloat16, "cuda")

    def step(q, k, w):
        out, qn, g, a_norm = fwd(q, k, w, variant)
        return (out, qn, g, a_norm, *bwd(grad_out, grad_qn, q, k, w, g, a_norm, variant))

    new = make_qkw((2, 70, 600), torch.bfloat16, "cuda", seed=3)[:3]
    got = capture_and_replay(step, (q, k, w), new)

    def reference(q, k, w, grad_out, grad_qn):
        out, qn, g, a_norm = additive_attention_forward_reference(q, k, w, variant)
        return (out, qn, g, a_norm, *additive_attention_backward_reference(
            grad_out, grad_qn, q, k, w, g, a_norm, variant))

    expected = reference(*new, grad_out, grad_qn)
    exact = reference(*(t.double() for t in (*new, grad_out, grad_qn)))
    names = ("out", "qn", "g", "a_norm", "dq", "dk", "dw_g")
    for name, a, b, b64 in zip(names, got, expected, exact, strict=True):
        assert_close(a, b, exact=b64, slack="cuda", name=name, layout=False)
