"""What the kernel tests share: one comparison against the reference, with per-dtype tolerances,
and one set of input builders (q/k/v and their views, layer and additive-attention inputs,
views at a misaligned offset).

Every builder draws float64 numbers from a seeded generator and rounds them to the dtype, so a
test's inputs do not depend on the device or on the dtype's own random stream.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)

# rtol, atol per dtype. Each table holds what one family of tests was written against; a test
# names its table (or overrides one number) instead of carrying its own helper.
TOLERANCES = {
    # torch.testing.assert_close's defaults.
    "default": {
        torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5),
        torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5),
    },
    # A kernel that accumulates in float32 and rounds once, against the float32 reference
    # rounded to the same dtype: one unit in the last place in fp16/bf16.
    "rounded_once": {
        torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5),
        torch.bfloat16: (2**-7, 1e-5), torch.float16: (2**-10, 1e-5),
    },
    # The layer kernels (context, epilogue): sums over N and D in another order than the
    # reference's, in float32 for every input dtype below float64.
    "layer": {
        torch.float64: (1e-12, 1e-12), torch.float32: (1.3e-6, 1e-5),
        torch.bfloat16: (2**-7, 1e-5), torch.float16: (2**-10, 1e-5),
    },
    # ... on CUDA, as they were written (float32 within 2e-5): not yet run tighter on a GPU.
    "layer_cuda": {
        torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5),
        torch.bfloat16: (2**-7, 1e-5), torch.float16: (2**-10, 1e-5),
    },
    # The layer's projections (GEMMs) against a float64 composition of the rounded inputs.
    "project": {
        torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5),
        torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3),
    },
}

# Judged against float64 ("exact"): the slack over PyTorch's own error in the dtype, as a
# fraction of the largest exact value, plus an absolute floor.
ERROR_SLACK = {
    # separable attention through the public op, every backend.
    "separable": {torch.bfloat16: 1e-3, torch.float16: 1e-3, "floor": 1e-6},
    # additive attention: sums over thousands of tokens round differently in every order.
    "additive": {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5, "floor": 1e-6},
    # the CUDA kernels: about one unit in the last place (float32: over thousands of terms).
    "cuda": {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5, "floor": 0.0},
}


def tolerance(dtype: torch.dtype, table: str = "default") -> dict[str, float]:
    """``{"rtol", "atol"}`` of ``table`` for ``dtype``."""
    rtol, atol = TOLERANCES[table][dtype]
    return {"rtol": rtol, "atol": atol}


def sum_tolerance(dtype: torch.dtype, terms: int, rounded: bool = True) -> dict:
    """A sum of ``terms`` products of dtype-rounded inputs accumulated in float32 (float64 for
    float64), plus the rounding of the result to dtype if ``rounded``: the error grows as
    sqrt(terms)."""
    acc = 1e-15 if dtype == torch.float64 else 1e-6
    eps = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 8e-3,
           torch.float16: 1e-3}[dtype] if rounded else acc
    return {"rtol": max(eps, acc * terms**0.5) * 4, "atol": acc * terms**0.5 * 10 + eps}


def assert_close(actual, expected, *, table="default", exact=None, slack=None, dtype=None,
                 equal_nan=False, name="", layout=True, **override):
    """``actual`` against the reference's ``expected``.

    Without ``exact``: ``torch.testing.assert_close`` with ``table``'s rtol/atol for ``dtype``
    (default: actual's dtype), any of them replaced by ``override``; fp16/bf16 are compared in
    float32. ``layout`` also asks for the same dtype and shape and a contiguous ``actual``.

    With ``exact`` (the reference in float64): ``actual``'s largest error against it is at most
    twice ``expected``'s (the reference in actual's dtype: the error PyTorch itself makes) plus
    ``ERROR_SLACK[slack]`` of the largest exact value; dtypes without a slack in that table fall
    back to the tolerance comparison above.
    """
    msg = (lambda m: f"{name}: {m}") if name else None
    dtype = dtype or actual.dtype
    if layout:
        assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
        assert actual.dtype == expected.dtype or exact is not None, (name, actual.dtype)
        assert actual.is_contiguous(), f"{name}: not contiguous"
    if exact is not None and dtype in ERROR_SLACK[slack]:
        if actual.numel() == 0:
            return
        err = (actual.double() - exact).abs().max().item()
        torch_err = (expected.double() - exact).abs().max().item()
        bound = 2 * torch_err + ERROR_SLACK[slack][dtype] * exact.abs().max().item()
        bound += ERROR_SLACK[slack]["floor"]
        assert err <= bound, (
            f"{name} in {dtype}: error {err:.3g} > {bound:.3g} (PyTorch's {torch_err:.3g})"
        )
        return
    tol = {**tolerance(dtype, table), **override}
    if actual.dtype in LOW_PRECISION or expected.dtype in LOW_PRECISION:
        actual, expected = actual.float(), expected.float()
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=equal_nan, msg=msg,
                               **tol)


def acc_of(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def randn(*size, dtype=torch.float32, device="cpu", seed=0, scale=1.0, offset=0):
    """Seeded normal numbers; ``offset`` > 0 gives a contiguous view that starts that many
    elements into its storage (``buf[offset:].view(size)``: narrower vectors, or none)."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for s in size:
        numel *= s
    buf = torch.randn(offset + numel, generator=g, dtype=torch.float64) * scale
    return buf.to(device, dtype)[offset:].view(size)


def make_qkv(shape, dtype, device="cpu", layout="views", requires_grad=False, seed=0, offset=0):
    """q [B, 1, P, N], k, v [B, C, P, N] and the leaves gradients flow to, in one layout:
    ``views`` of one qkv tensor (the module's case; ``offset`` elements into its storage),
    ``separate`` contiguous tensors, ``transposed`` (N not the unit-stride axis: copied),
    ``permuted`` (dims 0..2 in another order, N unit-stride: read in place), ``strided_n``
    (every other element along N: copied)."""
    B, C, P, N = shape
    split = [1, C, C]
    if layout == "transposed":
        qkv = randn(B, P, N, 1 + 2 * C, dtype=dtype, device=device, seed=seed).permute(0, 3, 1, 2)
    elif layout == "permuted":
        qkv = randn(P, 1 + 2 * C, B, N, dtype=dtype, device=device, seed=seed).permute(2, 1, 0, 3)
    elif layout == "strided_n":
        qkv = randn(B, 1 + 2 * C, P, 2 * N, dtype=dtype, device=device, seed=seed)[..., ::2]
    else:
        qkv = randn(B, 1 + 2 * C, P, N, dtype=dtype, device=device, seed=seed, offset=offset)
    if layout == "separate":
        q, k, v = (t.clone().requires_grad_(requires_grad) for t in qkv.split(split, dim=1))
        return q, k, v, [q, k, v]
    if requires_grad and offset:  # the leaf is the whole storage, as in a misaligned module
        base = qkv._base.detach().requires_grad_()
        q, k, v = base[offset:].view(B, 1 + 2 * C, P, N).split(split, dim=1)
        return q, k, v, [base]
    qkv = qkv.detach().requires_grad_(requires_grad)
    q, k, v = qkv.split(split, dim=1)
    return q, k, v, [qkv]


def make_qkw(shape, dtype, device="cpu", layout="separate", requires_grad=False, seed=0,
             w_scale=1.0):
    """q, k [B, N, D], w_g [D, 1] and the leaves they come from. Layouts: ``separate``
    contiguous tensors, ``views`` of one [B, N, 2D] projection (row stride 2D), ``transposed``
    (D not unit-stride)."""
    B, N, D = shape
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(D, 1, generator=gen, dtype=torch.float64) * w_scale).to(device, dtype)
    w.requires_grad_(requires_grad)
    if layout == "transposed":
        qk = torch.randn(B, 2 * D, N, generator=gen, dtype=torch.float64).to(device, dtype)
        qk = qk.transpose(1, 2).detach()
    else:
        qk = torch.randn(B, N, 2 * D, generator=gen, dtype=torch.float64).to(device, dtype)
    qk.requires_grad_(requires_grad)
    q, k = qk.split([D, D], dim=-1)
    if layout == "separate":
        q, k = (t.detach().clone().requires_grad_(requires_grad) for t in (q, k))
        return q, k, w, [q, k, w]
    return q, k, w, [qk, w]


def additive_grads(shape, dtype, device, seed=1):
    """The incoming gradients (grad_out, grad_qn) of additive attention, [B, N, D] each."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))


def layer_inputs(shape, dtype=torch.float64, device="cpu", bias=True, seed=0):
    """x [B, D, P, N], qkv_weight [1 + 2C, D, 1, 1], qkv_bias, out_weight [D_out, C, 1, 1],
    out_bias of the whole layer for ``shape = (B, D, P, N, C, D_out)``; weights scaled so that
    values stay O(1)."""
    B, D, P, N, C, D_out = shape
    g = torch.Generator().manual_seed(seed)

    def draw(*size, scale=1.0):
        return (torch.randn(size, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    x = draw(B, D, P, N)
    w_qkv = draw(1 + 2 * C, D, 1, 1, scale=max(D, 1) ** -0.5)
    w_out = draw(D_out, C, 1, 1, scale=max(C, 1) ** -0.5)
    b_qkv = draw(1 + 2 * C, scale=0.5) if bias else None
    b_out = draw(D_out, scale=0.5) if bias else None
    return x, w_qkv, b_qkv, w_out, b_out


def context_inputs(shape, dtype, device="cpu", offset=0):
    """x [B, D, P, N] (``offset`` elements into its storage), w_q [D], and the reference's
    (s, x̄) made contiguous as the kernels' are. w_q is scaled so that the softmax is neither
    flat nor one-hot."""
    from mvit2_kernels.reference import separable_layer_context_forward_reference

    x = randn(*shape, dtype=dtype, device=device, offset=offset)
    w_q = randn(shape[1], dtype=dtype, device=device, seed=1, scale=2 * max(shape[1], 1) ** -0.5)
    s, xbar = separable_layer_context_forward_reference(x, w_q)
    return x, w_q, s.contiguous(), xbar.contiguous()


def epilogue_inputs(shape, dtype, device="cpu", offset=0):
    """v [B, C, P, N] and grad_y in the input dtype (``offset`` elements into their storage),
    ctx [B, C, P] in the accumulation dtype."""
    v = randn(*shape, dtype=dtype, device=device, offset=offset)
    ctx = randn(*shape[:3], dtype=acc_of(dtype), device=device, seed=1)
    return v, ctx, randn(*shape, dtype=dtype, device=device, seed=2, offset=offset)


def capture_and_replay(step, static_inputs, *new_inputs):
    """Captures ``step(*static_inputs)`` in a CUDA graph (after a warm-up on a side stream, as
    torch.cuda.graphs recommends), then for each of ``new_inputs`` copies it into the static
    inputs and replays; each replay's outputs must equal an eager ``step`` bit for bit. Returns
    the captured outputs as the last replay left them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static_inputs)
    for new in new_inputs:
        for static, value in zip(static_inputs, new, strict=True):
            static.copy_(value)
        graph.replay()
        for i, (a, b) in enumerate(zip(captured, step(*static_inputs), strict=True)):
            assert torch.equal(a, b), f"output {i} of the replay differs from an eager call"
    return captured
