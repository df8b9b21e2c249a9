"""Bad arguments, ``torch.library.opcheck`` and the op table of the whole-layer fusion's
kernels (context and epilogue, forward and backward), on every backend; their values are
specified by test_separable_layer_kernels.py. Triton's kernels are also compiled for sm_90
without a GPU here."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS, device_of
from fixtures.optional import importorskip
from test_separable_layer_kernels import KERNELS, kernel
from utils import context_inputs, epilogue_inputs

from mvit2_kernels.kernels import kernel as lookup

TRITON = [b for b in BACKENDS if b == "triton"]


def bad_calls(device):
    """(kernel, arguments, the argument the error must name) for every kind of bad input."""
    x, w_q, s, xbar = context_inputs((2, 5, 3, 8), torch.float32, device)
    v, ctx, g = epilogue_inputs((2, 5, 3, 8), torch.float32, device)
    fwd, bwd, epi, epi_bwd = KERNELS
    return [
        (fwd, (x[0], w_q), "x"),  # 3-D
        (fwd, (x.to(torch.int32), w_q.to(torch.int32)), "x"),  # not float
        (fwd, (x.transpose(2, 3), w_q), "x"),  # not contiguous
        (fwd, (x, w_q[:4]), "w_q"),  # wrong length
        (fwd, (x, w_q.double()), "w_q"),  # not x's dtype
        (bwd, (xbar, x, w_q, s[:, :2], xbar), "s"),  # wrong shape
        (bwd, (xbar.half(), x, w_q, s, xbar), "grad_xbar"),  # not the accumulation dtype
        (bwd, (xbar, x, w_q, s, xbar.transpose(0, 2).contiguous().transpose(0, 2)), "xbar"),
        (epi, (v, ctx[..., :2]), "ctx"),
        (epi, (v, ctx.double()), "ctx"),
        (epi, (v.transpose(2, 3), ctx), "v"),
        (epi_bwd, (g[:1], v, ctx), "grad_y"),
        (epi_bwd, (g.double(), v, ctx), "grad_y"),
        (epi_bwd, (g.transpose(2, 3), v, ctx), "grad_y"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_calls("cpu"))))
def test_bad_inputs_raise_naming_the_argument(case, backend):
    name, args, arg = bad_calls(device_of(backend))[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=rf"\b{arg}\b"):
        kernel(backend, name)(*args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, backend):
    """The registered ops (``torch.ops.mvit2.*``, ``*_triton`` for Triton)."""
    x, w_q, s, xbar = context_inputs((2, 9, 2, 17), dtype, device_of(backend))
    v, ctx, grad_y = epilogue_inputs((2, 3, 2, 17), dtype, device_of(backend))
    suffix = "_triton" if backend == "triton" else ""
    for name, args in zip(
        KERNELS,
        ((x, w_q), (torch.randn_like(xbar), x, w_q, s, xbar), (v, ctx), (grad_y, v, ctx)),
        strict=True,
    ):
        kernel(backend, name)  # fails or skips on a missing registration
        torch.library.opcheck(getattr(torch.ops.mvit2, name + suffix), args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", KERNELS)
def test_ops_are_what_the_layer_looks_up(name, backend):
    """The kernel table the layer dispatches through gives each backend's own op."""
    if backend == "triton":
        from mvit2_kernels.triton import separable_layer

        assert lookup(name, backend) is getattr(separable_layer, name)
        assert getattr(torch.ops.mvit2, f"{name}_triton") is not None
    else:
        assert lookup(name, backend) is getattr(torch.ops.mvit2, name)


# Triton's own errors, message by message (the C++ ones name the argument, as above, and print
# dtypes in ATen's spelling).
def _context(dtype=torch.float32, N=5):
    x, w_q, s, xbar = context_inputs((2, 4, 3, N), dtype, device_of("triton"))
    return {"grad_xbar": torch.ones_like(xbar), "x": x, "w_q": w_q, "s": s, "xbar": xbar}


def _epilogue(dtype=torch.float32):
    v, ctx, grad_y = epilogue_inputs((2, 4, 3, 5), dtype, device_of("triton"))
    return {"grad_y": grad_y, "v": v, "ctx": ctx}


def _with(make, **changes):
    """The valid arguments ``make()`` gives, with some replaced by functions of them."""
    def args():
        a = make()
        a.update({k: f(a) for k, f in changes.items()})
        return a
    return args


CONTEXT_FWD = "separable_layer_context_forward", ("x", "w_q")
CONTEXT_BWD = "separable_layer_context_backward", ("grad_xbar", "x", "w_q", "s", "xbar")
EPILOGUE_FWD = "separable_layer_epilogue_forward", ("v", "ctx")
EPILOGUE_BWD = "separable_layer_epilogue_backward", ("grad_y", "v", "ctx")


@pytest.mark.parametrize(
    ("op", "args", "error", "match"),
    [
        (CONTEXT_FWD, _with(_context, x=lambda a: a["x"][0]), ValueError, "x must be a 4-D"),
        (CONTEXT_FWD, _with(_context, x=lambda a: a["x"].int()), TypeError,
         "x must be float16, bfloat16"),
        (CONTEXT_FWD, _with(_context, w_q=lambda a: a["w_q"].double()), TypeError,
         "w_q has dtype torch.float64 but x has torch.float32"),
        (CONTEXT_FWD, _with(_context, w_q=lambda a: a["w_q"][:3]), ValueError,
         r"w_q must have shape \[4\], got \[3\]"),
        (CONTEXT_FWD, _with(_context, x=lambda a: a["x"].transpose(2, 3)), ValueError,
         "x must be contiguous"),
        (CONTEXT_BWD, _with(_context, s=lambda a: a["s"].half(), x=lambda a: a["x"].half(),
                            w_q=lambda a: a["w_q"].half()), TypeError,
         r"s must have dtype torch.float32 \(the accumulation dtype of x\), got torch.float16"),
        (CONTEXT_BWD, _with(_context, xbar=lambda a: a["xbar"].double()), TypeError,
         "xbar must have dtype torch.float32"),
        (CONTEXT_BWD, _with(_context, grad_xbar=lambda a: a["grad_xbar"][:, :3]), ValueError,
         r"grad_xbar must have shape \[2, 4, 3\], got \[2, 3, 3\]"),
        (CONTEXT_BWD, _with(_context, s=lambda a: _context(N=6)["s"]), ValueError,
         r"s must have shape \[2, 3, 5\]"),
        (CONTEXT_BWD, _with(_context, xbar=lambda a: a["xbar"].mT.contiguous().mT), ValueError,
         "xbar must be contiguous"),
        (EPILOGUE_FWD, _with(_epilogue, v=lambda a: a["v"][0]), ValueError, "v must be a 4-D"),
        (EPILOGUE_FWD, _with(_epilogue, ctx=lambda a: a["ctx"][..., None]), ValueError,
         r"ctx must have shape \[2, 4, 3\], got \[2, 4, 3, 1\]"),
        (EPILOGUE_FWD, _with(_epilogue, ctx=lambda a: a["ctx"].double()), TypeError,
         "ctx must have dtype torch.float32"),
        (EPILOGUE_FWD, _with(_epilogue, v=lambda a: a["v"].mT.contiguous().mT), ValueError,
         "v must be contiguous"),
        (EPILOGUE_BWD, _with(_epilogue, grad_y=lambda a: a["grad_y"].double()), TypeError,
         "grad_y has dtype torch.float64 but v has torch.float32"),
        (EPILOGUE_BWD, _with(_epilogue, grad_y=lambda a: a["grad_y"][:, :2]), ValueError,
         r"grad_y must have shape \[2, 4, 3, 5\]"),
        (EPILOGUE_BWD, _with(_epilogue, grad_y=lambda a: a["grad_y"].mT.contiguous().mT),
         ValueError, "grad_y must be contiguous"),
    ],
)
@pytest.mark.parametrize("backend", TRITON)
def test_triton_bad_arguments_raise_with_the_message(op, args, error, match, backend):
    fn, names = op
    a = args()
    with pytest.raises(error, match=match):
        lookup(fn, backend)(*(a[n] for n in names))


# Compiles every kernel for sm_90 (Hopper) without a GPU, through the whole pipeline down to a
# cubin (Triton bundles ptxas): in every dtype with the first autotuning config, and with every
# config in float32. What the interpreter accepts need not compile (layouts, fp64 maths).
_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mvit2_kernels.triton import separable_layer as L

ACC = {"s_ptr", "xbar_ptr", "gx_ptr", "dq_ptr", "dwp_ptr", "ctx_ptr", "dctx_ptr"}
for name in ("context_forward", "context_backward", "epilogue_forward", "epilogue_backward"):
    tuner = getattr(L, f"_separable_layer_{name}_kernel")
    for dtype in ("fp64", "fp32", "fp16", "bf16"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        for config in tuner.configs if dtype == "fp32" else tuner.configs[:1]:
            sig = {a: "constexpr" if a in config.kwargs else
                   ("*" + (acc if a in ACC else dtype)) if a.endswith("_ptr") else "i32"
                   for a in tuner.fn.arg_names}
            kernel = triton.compile(ASTSource(tuner.fn, sig, config.kwargs),
                                    target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": config.num_warps})
            assert kernel.asm["cubin"], (name, dtype, config)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
@pytest.mark.skipif(not TRITON, reason="no triton here")
def test_triton_kernels_compile_for_sm90():
    importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
