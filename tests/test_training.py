"""Specification of training and inference as people run them: autocast (with GradScaler for
fp16), gradient checkpointing, channels_last inputs, half-precision models, frozen projections,
inference mode and train/eval switches. Every fused module and model is held against the same
module or model unfused, in the same set-up.

Lower-precision results are judged by their error against a float32 (or float64) oracle: the fused
form may err at most a little more than the unfused form does in the same dtype (the criterion
of flash-attention's tests), which is what "within the dtype's own error" means here.
"""

import copy

import pytest
import torch
from conftest import BACKENDS, device_of
from fixtures.hf_mobilevitv2 import hf_classifier, randomize_, rel_err
from fixtures.optional import optional
from torch.utils.checkpoint import checkpoint

import mvit2_kernels
from mvit2_kernels.models import SwiftFormer, mobilevitv2
from mvit2_kernels.nn import EfficientAdditiveAttention, SeparableAttention

# Autocast dtypes per device; CPU autocast runs fp16 too (torch >= 2.3), so the fp16 GradScaler
# loop is checked here and not only on a GPU.
AMP = [("cpu", torch.bfloat16), ("cpu", torch.float16)]
if torch.cuda.is_available():
    AMP += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
MODULE_BACKENDS = [*BACKENDS, "reference"]
SMALL_SWIFTFORMER = {"depths": [1, 1, 1, 2], "dims": [16, 24, 32, 40]}


def separable(fused, backend="auto", seed=0, dim=16):
    torch.manual_seed(seed)
    return SeparableAttention(dim, fused=fused, backend=backend)


def additive(fused, backend="auto", seed=0, variant="normalize", dim=16):
    torch.manual_seed(seed)
    return EfficientAdditiveAttention(dim, variant=variant, fused=fused, backend=backend)


MODULES = {  # name -> (factory(fused, backend), input shape)
    "separable_layer": (lambda fused, backend: separable(fused, backend), (2, 16, 4, 12)),
    "separable_kernel": (lambda fused, backend: separable("kernel" if fused else False, backend),
                         (2, 16, 4, 12)),
    "additive_normalize": (lambda fused, backend: additive(fused, backend), (2, 10, 16)),
    "additive_softmax": (lambda fused, backend: additive(fused, backend, variant="softmax"),
                         (2, 10, 16)),
}


def run_step(model, x, device_type=None, dtype=None):
    """Forward and backward of ``sum(out * w)`` (a fixed random weight, so every output element
    matters), under autocast when a dtype is given; returns the output and the gradients of x and
    of every parameter, in float32."""
    x = x.detach().clone().requires_grad_()
    enabled = dtype is not None
    with torch.autocast(device_type or x.device.type, dtype=dtype, enabled=enabled):
        out = model(x)
        if isinstance(out, dict) or hasattr(out, "logits"):
            out = out["logits"]
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
        (out.float() * w).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.grad is not None]
    return out.float(), torch.cat([g.float().flatten() for g in grads])


def norm_err(actual, expected):
    """||actual - expected|| / ||expected||: a whole result's error, not one element's (a model's
    gradients hold elements that cancel to round-off in any dtype)."""
    return ((actual - expected).norm() / expected.norm()).item()


def assert_within_dtype_error(fused, unfused, oracle, what, slack=1e-3):
    """The fused result errs against the oracle at most 2x the unfused one, plus ``slack`` (a
    fraction of bf16's unit roundoff, for results the unfused form happens to round exactly)."""
    err_fused, err_unfused = norm_err(fused, oracle), norm_err(unfused, oracle)
    assert err_fused <= 2 * err_unfused + slack, (
        f"{what}: fused errs {err_fused:.2e} against the float32 oracle, unfused {err_unfused:.2e}")


# --- Autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("amp", AMP, ids=lambda a: f"{a[0]}-{str(a[1])[6:]}")
def test_fused_modules_under_autocast_match_unfused_ones(amp, name, backend):
    device_type, dtype = amp
    if backend != "reference" and device_of(backend) != device_type:
        pytest.skip(f"backend {backend} runs {device_of(backend)} tensors")
    factory, shape = MODULES[name]
    fused = factory(True, backend).to(device_type)
    unfused = factory(False, backend).to(device_type)
    x = torch.randn(shape, device=device_type)
    out, grads = run_step(fused, x, device_type, dtype)
    assert out.dtype == torch.float32 and grads.isfinite().all()
    ref_out, ref_grads = run_step(unfused, x, device_type, dtype)
    exact_out, exact_grads = run_step(copy.deepcopy(unfused), x)
    assert_within_dtype_error(out, ref_out, exact_out, "output")
    assert_within_dtype_error(grads, ref_grads, exact_grads, "gradients")


@pytest.mark.parametrize("amp", AMP, ids=lambda a: f"{a[0]}-{str(a[1])[6:]}")
def test_ops_under_autocast_cast_like_a_convolution(amp):
    """Under autocast each op casts float32 inputs to the autocast dtype once (a float32 w_g
    beside fp16/bf16 activations is fine), returns that dtype, and its float32 gradients reach
    the float32 leaves."""
    device_type, dtype = amp
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 1 + 2 * 8, 3, 5, generator=g).to(device_type).requires_grad_()
    q, k = (torch.randn(2, 5, 8, generator=g).to(device_type).requires_grad_() for _ in "qk")
    w_g = torch.randn(8, 1, generator=g).to(device_type).requires_grad_()
    x = torch.randn(2, 8, 3, 5, generator=g).to(device_type).requires_grad_()
    w_qkv, b_qkv = (torch.randn(s, generator=g).to(device_type).requires_grad_()
                    for s in ((17, 8, 1, 1), (17,)))
    w_out = torch.randn(8, 8, 1, 1, generator=g).to(device_type).requires_grad_()
    with torch.autocast(device_type, dtype=dtype):
        y = mvit2_kernels.separable_attention(*qkv.split([1, 8, 8], dim=1))
        out, qn = mvit2_kernels.additive_attention(q, k.to(dtype), w_g)
        layer = mvit2_kernels.separable_attention_layer(x, w_qkv, b_qkv, w_out, None)
    assert y.dtype == out.dtype == qn.dtype == layer.dtype == dtype
    (y.float().sum() + out.float().sum() + qn.float().sum() + layer.float().sum()).backward()
    for t in (qkv, q, k, w_g, x, w_qkv, b_qkv, w_out):
        assert t.grad.dtype == torch.float32 and t.grad.isfinite().all()


def test_compiled_fused_modules_under_autocast_match_eager():
    """``torch.compile(fullgraph=True)`` traces the autocast boundary of the ops (no graph
    break) and gives eager's results within bf16's rounding."""
    layer, attn = separable(True), additive(True)

    def step(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).float().square().sum() + attn(t).float().square().sum()

    x, t = torch.randn(2, 16, 4, 12), torch.randn(2, 10, 16)
    params = [*layer.parameters(), *attn.parameters()]
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        loss = fn(x, t)
        results.append([loss.detach(), *torch.autograd.grad(loss, params)])
    for a, b in zip(*results, strict=True):
        assert norm_err(a, b) <= 1e-2


def test_backward_inside_the_autocast_region_keeps_float32_glue():
    """``loss.backward()`` called inside ``torch.autocast`` (common in training loops) runs the
    fused layer's backward with autocast off, as its forward ran: same gradients as outside."""
    m = separable(True)
    x = torch.randn(2, 16, 4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x).float().square().sum()
    loss.backward()
    outside = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(x).float().square().sum().backward()
    for a, b in zip(outside, (p.grad for p in m.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def our_models():
    torch.manual_seed(0)
    return {
        "mobilevitv2": (lambda fused: mobilevitv2(0.5, num_classes=10, fused=fused),
                        (2, 3, 64, 64)),
        "swiftformer": (lambda fused: SwiftFormer(**SMALL_SWIFTFORMER, num_classes=10,
                                                  variant="normalize", fused=fused),
                        (2, 3, 64, 64)),
    }


def hf_models():
    with optional("transformers"):
        from transformers import SwiftFormerConfig, SwiftFormerForImageClassification

    def hf_swiftformer():
        cfg = SwiftFormerConfig(num_labels=10, depths=[1, 1, 1, 2], embed_dims=[16, 24, 32, 40])
        return randomize_(SwiftFormerForImageClassification(cfg).eval())

    return {"hf_mobilevitv2": (lambda: hf_classifier(0.5), (2, 3, 64, 64)),
            "hf_swiftformer": (hf_swiftformer, (2, 3, 64, 64))}


def model_pair(name):
    """(fused, unfused) copies of one model with the same weights, in eval mode."""
    if name.startswith("hf_"):
        build, shape = hf_models()[name]
        unfused = build()
        fused = copy.deepcopy(unfused)
        mvit2_kernels.fuse_(fused)
        return fused, unfused, shape
    build, shape = our_models()[name]
    fused, unfused = build(True), build(False)
    randomize_(fused)
    unfused.load_state_dict(fused.state_dict())
    return fused.eval(), unfused.eval(), shape


MODELS = ["mobilevitv2", "swiftformer", "hf_mobilevitv2", "hf_swiftformer"]


@pytest.mark.parametrize("name", MODELS)
def test_fused_models_under_cpu_bf16_autocast_match_unfused_ones(name):
    fused, unfused, shape = model_pair(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out, grads = run_step(fused, x, "cpu", torch.bfloat16)
    ref_out, ref_grads = run_step(unfused, x, "cpu", torch.bfloat16)
    exact_out, exact_grads = run_step(copy.deepcopy(unfused), x)
    assert_within_dtype_error(out, ref_out, exact_out, "logits")
    assert_within_dtype_error(grads, ref_grads, exact_grads, "gradients")


@pytest.mark.parametrize("device_type", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
@pytest.mark.parametrize("name", ["mobilevitv2", "swiftformer"])
def test_fp16_autocast_training_with_grad_scaler_follows_the_unfused_model(name, device_type):
    """A few SGD steps of fp16 mixed precision with ``torch.amp.GradScaler``, from the models'
    own initialisation: the scaler never finds an inf/NaN gradient in the fused model, and its
    losses stay as close to the float32 run as the unfused model's do."""
    build, shape = our_models()[name]
    torch.manual_seed(0)
    models = {"fused": build(True), "unfused": build(False), "float32": build(False)}
    start = copy.deepcopy(models["fused"].state_dict())
    losses = {}
    for key, model in models.items():
        model.load_state_dict(start)
        model.to(device_type).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        amp = key != "float32"
        scaler = torch.amp.GradScaler(device_type, init_scale=2.0**10, enabled=amp)
        g = torch.Generator().manual_seed(3)
        losses[key] = []
        for _ in range(3):
            x = torch.randn(shape, generator=g).to(device_type)
            labels = torch.randint(0, 10, (shape[0],), generator=g).to(device_type)
            with torch.autocast(device_type, dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if amp:
                assert scaler.get_scale() == 2.0**10, f"{key}: the scaler found inf/NaN gradients"
            losses[key].append(loss.item())
    exact = torch.tensor(losses["float32"])
    fused_dev = (torch.tensor(losses["fused"]) - exact).abs()
    unfused_dev = (torch.tensor(losses["unfused"]) - exact).abs().max()
    assert (fused_dev <= 2 * unfused_dev + 1e-2 * exact.abs()).all(), losses


# --- Gradient checkpointing --------------------------------------------------------------------


class Checkpointed(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


@pytest.mark.parametrize("fused", [True, "kernel"])
def test_checkpointed_fused_blocks_give_the_same_gradients(fused):
    """``checkpoint(..., use_reentrant=False)`` recomputes the fused forward in the backward;
    the kernels are deterministic, so the gradients are those of the plain run."""
    m = separable(fused)
    x = torch.randn(2, 16, 4, 12)
    plain = run_step(m, x)
    m.zero_grad()
    again = run_step(Checkpointed(m), x)
    for a, b in zip(plain, again, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["hf_mobilevitv2"])
def test_transformers_gradient_checkpointing_on_a_fused_model(name):
    fused, unfused, shape = model_pair(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    fused.train(), unfused.train()
    for m in (fused, unfused):  # the models have BatchNorm: keep its statistics fixed
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()
    plain_out, plain_grads = run_step(fused, x)
    fused.zero_grad()
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert fused.is_gradient_checkpointing
    ckpt_out, ckpt_grads = run_step(fused, x)
    torch.testing.assert_close(ckpt_out, plain_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ckpt_grads, plain_grads, rtol=1e-5, atol=1e-6)
    ref_out, ref_grads = run_step(unfused, x)
    assert rel_err(ckpt_out, ref_out) <= 1e-5 and rel_err(ckpt_grads, ref_grads) <= 1e-4


# --- Inputs and modes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilevitv2", "swiftformer", "hf_mobilevitv2"])
def test_channels_last_inputs_give_the_same_results(name):
    fused, _, shape = model_pair(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    out, grads = run_step(fused, x)
    fused.zero_grad()
    cl_model = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    cl_out, cl_grads = run_step(cl_model, x.to(memory_format=torch.channels_last))
    assert rel_err(cl_out, out) <= 1e-5 and rel_err(cl_grads, grads) <= 1e-4


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_channels_last_and_strided_inputs_to_the_modules(backend):
    """A ``[B, C, P, N]`` tensor in channels_last (N not the fastest axis) or a transposed view
    is read correctly by every path."""
    device = "cpu" if backend == "reference" else device_of(backend)
    for fused in (True, "kernel"):
        m = separable(fused, backend).to(device)
        x = torch.randn(2, 16, 4, 12, device=m.qkv_proj.weight.device)
        expected = run_step(m, x)
        m.zero_grad()
        for strided in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous()
                        .transpose(2, 3)):
            got = run_step(m, strided)
            m.zero_grad()
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilevitv2", "swiftformer", "hf_mobilevitv2", "hf_swiftformer"])
def test_a_whole_model_in_bfloat16_trains_like_the_unfused_one(name):
    fused, unfused, shape = model_pair(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    exact = run_step(copy.deepcopy(unfused), x)
    got = run_step(fused.bfloat16(), x.bfloat16())
    ref = run_step(unfused.bfloat16(), x.bfloat16())
    assert_within_dtype_error(got[0], ref[0], exact[0], "logits")
    assert_within_dtype_error(got[1], ref[1], exact[1], "gradients")


@pytest.mark.parametrize("fused", [True, "kernel"])
def test_frozen_projections_still_pass_the_input_gradient(fused):
    m, ref = separable(fused), separable(False)
    for module in (m, ref):
        module.qkv_proj.requires_grad_(False)
    x = torch.randn(2, 16, 4, 12)
    out, grads = run_step(m, x)
    ref_out, ref_grads = run_step(ref, x)
    assert m.qkv_proj.weight.grad is None and m.out_proj.weight.grad is not None
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-4, atol=1e-5)
    m.zero_grad(set_to_none=True)
    m.requires_grad_(False)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    ref.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    ref(xr).sum().backward()
    assert all(p.grad is None for p in m.parameters())
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_inference_mode_and_train_eval_switches(name):
    fused, unfused, shape = model_pair(name)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = unfused(x)
        expected = expected["logits"] if hasattr(expected, "logits") else expected
        got = fused(x)
        got = got["logits"] if hasattr(got, "logits") else got
    assert rel_err(got, expected) <= 1e-5
    fused.train()
    run_step(fused, x)  # training step in train mode (batch statistics)
    fused.eval()
    with torch.no_grad():
        again = fused(x)
        again = again["logits"] if hasattr(again, "logits") else again
    # eval mode after a train-mode step: same weights, BatchNorm back on running statistics
    # (updated once by the train step, so compare with the unfused model after the same step)
    unfused.train()
    run_step(unfused, x)
    unfused.eval()
    with torch.no_grad():
        ref = unfused(x)
        ref = ref["logits"] if hasattr(ref, "logits") else ref
    assert rel_err(again, ref) <= 1e-5
