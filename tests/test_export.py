"""Deployment (docs/export.md): the fused ops decomposed into aten ops, ONNX export checked in ONNX
Runtime, AOTInductor packages that keep calling the fused CPU kernels.

Parity is ``max |exported - eager| / max |eager| <= 1e-4`` in float32 (``check_parity``), at two
batch sizes from one export with a dynamic batch, at an odd image size (odd feature maps at the
attention stages: MobileViTv2 resizes them, SwiftFormer strides over them). Widths and sizes are
small so that the module stays within about two minutes; ``slow`` covers the released sizes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import mvit2_kernels
from mvit2_kernels import backends
from mvit2_kernels.export import (
    ParityError,
    check_exportable,
    check_onnx,
    check_parity,
    check_standard_onnx,
    decompositions,
    export_program,
    fused_ops,
    onnx_decompositions,
    to_onnx,
)
from mvit2_kernels.models import mobilevitv2, mobilevitv2_deeplabv3, swiftformer_xs
from mvit2_kernels.reference import additive_attention_reference, separable_layer_reference

needs_cpu_kernels = pytest.mark.skipif(not backends.compiled_cpu(),
                                       reason="the C++ CPU kernels are not built")
OPS = torch.ops.mvit2 if backends.compiled() else None
RTOL = 1e-4


def _onnx():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


# --- Decompositions: each equal to its op's kernel, outputs, dtypes and layout alike -----------

B, C, D, P, N = 2, 5, 6, 4, 37


def _op_cases(dtype):
    """``(op name, args)`` for every op with a decomposition; inputs made by the forward ops."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = _rand(B, 1, P, N, dtype=dtype), _rand(B, C, P, N, dtype=dtype), _rand(
        B, C, P, N, dtype=dtype)
    _, ctx4 = OPS.separable_attention_forward(q, k, v)
    x, w_q = _rand(B, D, P, N, dtype=dtype), _rand(D, dtype=dtype)
    s, xbar = OPS.separable_layer_context_forward(x, w_q)
    ctx3 = _rand(B, C, P, dtype=acc)
    w_v, b_v, w_out, b_out = (_rand(C, D, dtype=dtype), _rand(C, dtype=dtype),
                              _rand(D, C, dtype=dtype), _rand(D, dtype=dtype))
    qa, ka, w_g = _rand(B, N, D, dtype=dtype), _rand(B, N, D, dtype=dtype), _rand(D, 1, dtype=dtype)
    cases = [
        ("separable_attention_forward", (q, k, v)),
        ("separable_attention_backward", (_rand(B, C, P, N, dtype=dtype), q, k, v, ctx4)),
        ("separable_layer_context_forward", (x, w_q)),
        ("separable_layer_context_backward", (_rand(B, D, P, dtype=acc), x, w_q, s, xbar)),
        ("separable_layer_epilogue_forward", (v, ctx3)),
        ("separable_layer_epilogue_backward", (_rand(B, C, P, N, dtype=dtype), v, ctx3)),
        ("separable_layer_project_forward", (x, w_v, b_v, ctx3, w_out, b_out, True)),
        ("separable_layer_project_forward", (x, w_v, None, ctx3, w_out, None, False)),
        ("separable_layer_project_backward", (_rand(B, D, P, N, dtype=dtype), v, ctx3, w_out)),
        ("separable_layer_project_weight_backward", (_rand(B, C, P, N, dtype=dtype), x)),
    ]
    if hasattr(OPS, "separable_attention_qkv_forward"):
        qkv = _rand(B, 1 + 2 * C, P, N, dtype=dtype)
        _, ctx_qkv = OPS.separable_attention_qkv_forward(qkv)
        cases += [("separable_attention_qkv_forward", (qkv,)),
                  ("separable_attention_qkv_backward",
                   (_rand(B, C, P, N, dtype=dtype), qkv, ctx_qkv))]
    for variant in ("normalize", "softmax"):
        _, _, g, a_norm = OPS.additive_attention_forward(qa, ka, w_g, variant)
        cases += [
            ("additive_attention_forward", (qa, ka, w_g, variant)),
            ("additive_attention_backward", (_rand(B, N, D, dtype=dtype),
                                             _rand(B, N, D, dtype=dtype), qa, ka, w_g, g, a_norm,
                                             variant)),
        ]
    return cases


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_decompositions_equal_the_kernels(dtype):
    table = decompositions(backward=True)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for name, args in _op_cases(dtype):
        op = getattr(OPS, name).default
        want, got = op(*args), table[op](*args)
        want, got = ((t,) if torch.is_tensor(t) else t for t in (want, got))
        assert len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert (g.shape, g.dtype, g.is_contiguous()) == (w.shape, w.dtype, True), (name, i)
            torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name, i=i: f"{n}[{i}]: {m}")


@needs_cpu_kernels
def test_decompositions_cover_every_op_but_the_in_place_ones():
    # The C++ ops (the Triton twins join the table once triton/ is imported, as earlier tests do)
    triton = {n for n in dir(OPS) if n.endswith("_triton")}
    names = {op._opname for op in decompositions(backward=True)} - triton
    built = {n for n in mvit2_kernels.kernels.OPS if hasattr(OPS, n)}
    in_place = {n for n in built if getattr(OPS, n).default._schema.is_mutable}
    assert in_place == {"separable_layer_project_input_backward", "separable_attention_forward_out"}
    assert names == built - in_place
    forward = {op._opname for op in decompositions()} - triton
    assert forward == {n for n in names if n.endswith("_forward")}


def _registered_mvit2_ops():
    return [op for op in torch._decomp.decomposition_table
            if getattr(op, "namespace", None) == "mvit2"]


def test_importing_mvit2_kernels_registers_no_decomposition():
    """FakeTensor reads ``torch._decomp.decomposition_table`` before our fake kernels whenever
    shapes are symbolic: an entry there would run the reference maths as the fake kernel of
    every dynamic ``torch.compile``/``torch.export``. A fresh process, so that nothing this
    session did can hide it."""
    code = ("import torch, mvit2_kernels, mvit2_kernels.export, mvit2_kernels.kernels\n"
            "print(sorted(str(op) for op in torch._decomp.decomposition_table\n"
            "             if getattr(op, 'namespace', None) == 'mvit2'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


@needs_cpu_kernels
def test_onnx_decompositions_lends_the_table_for_the_block_only():
    assert _registered_mvit2_ops() == []
    with onnx_decompositions() as added:
        assert set(added) == set(decompositions())  # where torch.onnx.export looks
        assert set(_registered_mvit2_ops()) == set(decompositions())
        with onnx_decompositions() as inner:  # nested: adds nothing, removes nothing
            assert inner == {}
        assert set(_registered_mvit2_ops()) == set(decompositions())
    assert _registered_mvit2_ops() == []
    with pytest.raises(RuntimeError, match="boom"), onnx_decompositions():
        raise RuntimeError("boom")
    assert _registered_mvit2_ops() == []  # removed on an exception too


class _Tokens(nn.Module):
    """SeparableAttention on patches, EfficientAdditiveAttention on the same values as tokens:
    every fused forward op family in one small module."""

    def __init__(self, dim=8, fused=True, variant="normalize"):
        super().__init__()
        self.sep = mvit2_kernels.SeparableAttention(dim, fused=fused)
        self.add = mvit2_kernels.EfficientAdditiveAttention(dim, variant=variant,
                                                            fused=bool(fused))

    def forward(self, x):  # x: [B, C, P, N]
        y = self.sep(x)
        b, c, p, n = y.shape
        t = self.add(y.permute(0, 2, 3, 1).reshape(b, p * n, c))
        return t.reshape(b, p, n, c).permute(0, 3, 1, 2)


@needs_cpu_kernels
@pytest.mark.parametrize("fused", [True, "kernel"])
@pytest.mark.parametrize("variant", ["normalize", "softmax"])
def test_run_decompositions_equals_the_reference(fused, variant):
    torch.manual_seed(0)
    model = _Tokens(fused=fused, variant=variant).eval()
    x = torch.randn(2, 8, 4, 9)
    program = export_program(model, (x,))
    expected = {True: ["separable_layer_context_forward", "separable_layer_project_forward"],
                "kernel": ["separable_attention_qkv_forward"]}[fused]
    assert fused_ops(program) == [f"mvit2.{n}" for n in expected] + [
        "mvit2.additive_attention_forward"]
    decomposed = program.run_decompositions(decompositions())
    assert fused_ops(decomposed) == []

    sep, add = model.sep, model.add
    y = separable_layer_reference(x, sep.qkv_proj.weight, sep.qkv_proj.bias,
                                  sep.out_proj.weight, sep.out_proj.bias)
    b, c, p, n = y.shape
    out, qn = additive_attention_reference(add.to_query(y.permute(0, 2, 3, 1).reshape(b, -1, c)),
                                           add.to_key(y.permute(0, 2, 3, 1).reshape(b, -1, c)),
                                           add.w_g, variant)
    reference = add.final(add.proj(out) + qn).reshape(b, p, n, c).permute(0, 3, 1, 2)
    with torch.no_grad():
        check_parity(decomposed.module()(x), reference, rtol=1e-5)
        x3 = torch.randn(3, 8, 4, 9)  # the batch stays dynamic through the decomposition
        check_parity(decomposed.module()(x3), model(x3), rtol=1e-5)


# --- Bad input and failed checks -----------------------------------------------------------------


def test_attn_dropout_in_training_mode_is_not_exportable():
    model = mobilevitv2(0.5, num_classes=10, attn_dropout=0.1).train()
    with pytest.raises(ValueError, match=r"SeparableAttention 'stages\.2\.1\.transformer\.0\.attn'"
                                         r".*attn_dropout=0\.1 in training mode"):
        check_exportable(model)
    with pytest.raises(ValueError, match="attn_dropout"):
        export_program(model, (torch.randn(2, 3, 64, 64),))
    with pytest.raises(ValueError, match="attn_dropout"):
        to_onnx(model, (torch.randn(2, 3, 64, 64),), check=False)
    check_exportable(model.eval())  # in eval mode dropout is off: exportable


def test_check_parity_fails_loudly():
    x = torch.randn(2, 3)
    assert check_parity((x,), x) == 0.0
    with pytest.raises(ParityError, match=r"output 0 \[2, 3\] differs from eager .* rtol=0\.0001"):
        check_parity([x * (1 + 1e-3)], x)
    with pytest.raises(ParityError, match="2 outputs"):
        check_parity((x, x), x)
    with pytest.raises(ParityError, match="shape"):
        check_parity(x[:1], x)
    with pytest.raises(ParityError):
        check_parity(x * float("nan"), x)


@needs_cpu_kernels
def test_onnx_parity_mismatch_fails_loudly(tmp_path):
    _onnx()
    torch.manual_seed(0)
    model = _Tokens().eval()
    x = torch.randn(2, 8, 4, 9)
    path = tmp_path / "tokens.onnx"
    program = to_onnx(model, (x,), path)  # checked on the way: parity holds
    assert path.stat().st_size > 0
    assert check_onnx(path, model, (x,)) <= RTOL
    op_types = {node.op_type for node in program.model_proto.graph.node}
    assert {"Softmax", "Relu", "Mul", "ReduceSum"} <= op_types, op_types
    with torch.no_grad():
        model.sep.out_proj.weight.mul_(1.01)  # the eager model moves on; the file does not
    with pytest.raises(ParityError, match="onnxruntime: output 0"):
        check_onnx(path, model, (x,))


# --- ONNX: torch.onnx.export(..., dynamo=True) as it is, checked in ONNX Runtime ---------------


def _onnx_export_and_check(model, image_size, batches=(1, 3), channels=3):
    """Plain ``torch.onnx.export`` (in ``onnx_decompositions()``, the one documented extra call)
    with a dynamic batch at an example batch of 2; standard ONNX; ONNX Runtime equal to eager at
    each of ``batches``. Returns the worst relative error."""
    x = torch.randn(2, channels, image_size, image_size)
    with onnx_decompositions():
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    check_standard_onnx(program.model_proto)
    return max(check_onnx(program, model, (torch.randn(b, channels, image_size, image_size),),
                          rtol=RTOL) for b in batches)


MODELS = {
    "mobilevitv2": lambda: mobilevitv2(0.5, num_classes=10),
    "deeplabv3": lambda: mobilevitv2_deeplabv3(0.5, num_classes=5, aspp_channels=32),
    "swiftformer-normalize": lambda: swiftformer_xs(num_classes=10, variant="normalize"),
}


@needs_cpu_kernels
@pytest.mark.parametrize("name", [  # deeplabv3: mobilevitv2's attention, a bigger head; slow
    n if n != "deeplabv3" else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_onnx_export_of_our_models(name):
    _onnx()
    torch.manual_seed(0)
    assert _onnx_export_and_check(MODELS[name]().eval(), image_size=65) <= RTOL


@needs_cpu_kernels
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_of_our_models_at_256(name):
    _onnx()
    torch.manual_seed(0)
    model = {**MODELS, "mobilevitv2": lambda: mobilevitv2(1.0)}[name]().eval()
    assert _onnx_export_and_check(model, image_size=256, batches=(1, 4)) <= RTOL


def _transformers_model(name):
    transformers = pytest.importorskip("transformers")
    if name == "swiftformer":
        config = transformers.SwiftFormerConfig(depths=[2, 1, 1, 2], embed_dims=[16, 24, 32, 40],
                                                num_labels=10)
        return transformers.SwiftFormerForImageClassification(config)
    # transformers' own test configuration (tests/models/mobilevitv2/test_modeling_mobilevitv2.py)
    config = transformers.MobileViTV2Config(
        image_size=64, patch_size=2, num_channels=3, hidden_act="swish", conv_kernel_size=3,
        output_stride=32, classifier_dropout_prob=0.1, initializer_range=0.02,
        width_multiplier=0.25, ffn_dropout=0.0, attn_dropout=0.0, base_attn_unit_dims=[16, 24, 32],
        n_attn_blocks=[1, 1, 2], aspp_out_channels=32, num_labels=10)
    return getattr(transformers, name)(config)


@needs_cpu_kernels
@pytest.mark.parametrize("name", [  # MobileViTV2 also in the next test, through transformers' own
    pytest.param("MobileViTV2ForImageClassification", marks=pytest.mark.slow), "swiftformer"])
def test_onnx_export_of_fused_transformers_models(name):
    _onnx()
    torch.manual_seed(0)
    model = _transformers_model(name).eval()
    assert mvit2_kernels.fuse_(model) > 0
    assert _onnx_export_and_check(model, image_size=65) <= RTOL


@needs_cpu_kernels
@pytest.mark.parametrize("dynamic", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("model_class", [
    pytest.param("MobileViTV2Model", marks=pytest.mark.slow), "MobileViTV2ForImageClassification",
    pytest.param("MobileViTV2ForSemanticSegmentation", marks=pytest.mark.slow)])
def test_transformers_onnx_export_test_on_a_fused_model(model_class, dynamic):
    """The essence of transformers' ``ExportTesterMixin.test_onnx_export`` for MobileViTV2 (its
    model tester's configuration and inputs, its exporter, its runtime, its tolerances), on the
    model after ``fuse_``, inside ``onnx_decompositions()``: without them it fails for every
    model class."""
    _onnx()
    pytest.importorskip("transformers.exporters.exporter_onnx")
    from transformers.exporters.configs import OnnxConfig
    from transformers.exporters.exporter_onnx import OnnxExporter
    from transformers.exporters.utils import get_leaf_tensors

    torch.manual_seed(0)
    model = _transformers_model(model_class).eval()
    assert mvit2_kernels.fuse_(model) == 4
    inputs = {"pixel_values": torch.rand(2, 3, 64, 64)}
    with torch.no_grad():
        expected = get_leaf_tensors(model(**inputs))
    with onnx_decompositions():
        exported = OnnxExporter().export(model, inputs, config=OnnxConfig(dynamic=dynamic))
    actual = get_leaf_tensors(exported(**inputs))  # run in ONNX Runtime
    assert set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(torch.as_tensor(actual[key]), value, atol=1e-3, rtol=1e-3)


# --- AOTInductor: the package keeps calling the fused CPU kernels ------------------------------


@needs_cpu_kernels
def test_aoti_package_calls_the_fused_kernels(tmp_path):
    torch.manual_seed(0)
    model = _Tokens().eval()
    program = export_program(model, (torch.randn(2, 8, 4, 9),))
    in_graph = fused_ops(program)
    assert in_graph == ["mvit2.separable_layer_context_forward",
                        "mvit2.separable_layer_project_forward",
                        "mvit2.additive_attention_forward"]
    path = torch._inductor.aoti_compile_and_package(program,
                                                    package_path=str(tmp_path / "tokens.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for batch in (1, 3):
        x = torch.randn(batch, 8, 4, 9)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            actual = runner(x)
        called = [e.name for e in prof.events() if e.name.startswith("mvit2::")]
        assert called == [n.replace(".", "::") for n in in_graph], called
        with torch.no_grad():
            check_parity(actual, model(x), rtol=RTOL, what="AOTInductor")
