"""``torch.ops.mvit2.*_forward`` are differentiable by themselves (autograd registered on the ops).

Each forward op, called directly on every backend, passes gradcheck against finite differences,
opcheck's autograd-registration checks, raises on double backward, and returns its saved
statistics (ctx, s, g, ||a||, the kept v and y) as non-differentiable outputs.
"""

import pytest
import torch
from conftest import BACKENDS, device_of

from mvit2_kernels.kernels import kernel

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no compiled or Triton backend here")


def _cases(backend: str) -> dict:
    """``name -> (op, make_inputs, the non-tensor tail, indices of the differentiable outputs)``
    for every forward op this backend has, at tiny float64 shapes (gradcheck calls the op twice
    per input element, and Triton's interpreter runs one program at a time)."""
    B, C, D, P, N = 2, 2, 3, 1, 4

    def rand(*shape):
        return lambda dev: torch.randn(*shape, dtype=torch.float64, device=dev,
                                       requires_grad=True)

    none = lambda dev: None  # noqa: E731
    cases = {
        "separable_attention": ("separable_attention_forward",
                                (rand(B, 1, P, N), rand(B, C, P, N), rand(B, C, P, N)), (), (0,)),
        "separable_layer_context": ("separable_layer_context_forward",
                                    (rand(B, D, P, N), rand(D)), (), (1,)),
        "separable_layer_epilogue": ("separable_layer_epilogue_forward",
                                     (rand(B, C, P, N), rand(B, C, P)), (), (0,)),
    }
    for variant in ("normalize", "softmax"):
        cases[f"additive_attention[{variant}]"] = (
            "additive_attention_forward", (rand(B, N, D), rand(B, N, D), rand(D, 1)),
            (variant,), (0, 1))
    if backend == "cpu":  # the projections' kernel exists on CPU only
        for keep in (True, False):
            for bias in (True, False):
                b_v, b_out = (rand(C), rand(D)) if bias else (none, none)
                cases[f"separable_layer_project[keep={keep},bias={bias}]"] = (
                    "separable_layer_project_forward",
                    (rand(B, D, P, N), rand(C, D), b_v, rand(B, C, P), rand(D, C), b_out),
                    (keep,), (0,))
    return cases


CASES = [(backend, name) for backend in BACKENDS for name in _cases(backend)]


def _case(backend: str, name: str):
    """``(op, inputs, tail, outputs)`` with the inputs made on the backend's device."""
    op, make, tail, outputs = _cases(backend)[name]
    dev = device_of(backend)
    return kernel(op, backend), tuple(m(dev) for m in make), tail, outputs


def _differentiable(op, tail, outputs):
    """The op as a function of its tensor inputs, returning its differentiable outputs."""
    def fn(*tensors):
        out = op(*tensors, *tail)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(out[i] for i in outputs)
    return fn


# The public functions' gradchecks (test_separable_attention.py, test_additive_attention.py) run
# through these same registered formulas; the interpreter is too slow to repeat them here.
GRADCHECK = [c for c in CASES if not (c[0] == "triton" and "attention" in c[1])]


@pytest.mark.parametrize(("backend", "name"), GRADCHECK)
def test_forward_op_passes_gradcheck(backend, name):
    op, inputs, tail, outputs = _case(backend, name)
    assert torch.autograd.gradcheck(_differentiable(op, tail, outputs), inputs)


@pytest.mark.parametrize(("backend", "name"), CASES)
def test_saved_statistics_are_not_differentiable(backend, name):
    op, inputs, tail, outputs = _case(backend, name)
    out = op(*inputs, *tail)
    out = out if isinstance(out, tuple) else (out,)
    for i, t in enumerate(out):
        assert t.requires_grad == (i in outputs), f"output {i}"


@pytest.mark.parametrize(("backend", "name"), CASES)
def test_double_backward_raises(backend, name):
    """Each input's gradient alone: differentiating it raises, never gives a silent None."""
    op, inputs, tail, outputs = _case(backend, name)
    tensors = [t for t in inputs if t is not None]
    # b_out's gradient is Σ grad_out: autograd's own, which differentiates correctly
    own = inputs[5] if name.startswith("separable_layer_project") else None
    for t in [t for t in tensors if t is not own]:
        out = _differentiable(op, tail, outputs)(*inputs)
        (grad,) = torch.autograd.grad(sum(o.sum() for o in out), t, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad((grad * grad).sum(), tensors, allow_unused=True)


@pytest.mark.parametrize(("backend", "name"), [c for c in CASES if c[0] != "triton"])
def test_opcheck_checks_the_autograd_registration(backend, name):
    op, inputs, tail, _ = _case(backend, name)
    torch.library.opcheck(op, (*inputs, *tail))
