"""Specification of the MobileViTv2 models: the configuration table (docs/design.md §3), parity with
transformers, the odd-size and dilation behaviours, fused vs unfused, torch.compile, and the
preprocessing of the released checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures.hf_mobilevitv2 import hf_classifier, hf_segmenter, rel_err
from fixtures.optional import optional

from mvit2_kernels.models import (
    MobileViTv2,
    from_transformers,
    mobilevitv2,
    mobilevitv2_deeplabv3,
    preprocess,
)
from mvit2_kernels.models.mobilevitv2 import MobileViTv2Block
from mvit2_kernels.nn import SeparableAttention

# docs/design.md §3: width -> stem, L1, L2, (L3, L4, L5) channels, attention dims d,
# params (M, 1000 classes)
TABLE = {
    0.50: (16, 32, 64, (128, 192, 256), (64, 96, 128), 1.4),
    0.75: (24, 48, 96, (192, 288, 384), (96, 144, 192), 2.9),
    1.00: (32, 64, 128, (256, 384, 512), (128, 192, 256), 4.9),
    1.25: (40, 80, 160, (320, 480, 640), (160, 240, 320), 7.5),
    1.50: (48, 96, 192, (384, 576, 768), (192, 288, 384), 10.6),
    1.75: (56, 112, 224, (448, 672, 896), (224, 336, 448), 14.3),
    2.00: (64, 128, 256, (512, 768, 1024), (256, 384, 512), 18.4),
}


@pytest.mark.parametrize("width", TABLE)
def test_every_width_has_the_published_configuration(width):
    stem, c1, c2, cs, ds, params = TABLE[width]
    with torch.device("meta"):
        m = mobilevitv2(width)
        hf = hf_meta(width)
    assert m.stem.conv.out_channels == stem
    assert [m.stages[i][-1].reduce.conv.out_channels for i in (0, 1)] == [c1, c2]
    blocks = [m.stages[i][1] for i in (2, 3, 4)]
    assert [b.conv_proj.conv.out_channels for b in blocks] == list(cs)
    assert [b.conv_1x1.out_channels for b in blocks] == list(ds)
    assert [len(b.transformer) for b in blocks] == [2, 4, 3]
    assert [b.transformer[0].mlp.fc1.out_channels for b in blocks] == [2 * d for d in ds]
    n = sum(p.numel() for p in m.parameters())
    assert round(n / 1e6, 1) == params
    assert n == sum(p.numel() for p in hf.parameters())


def hf_meta(width):
    with optional("transformers"):
        from transformers import MobileViTV2Config, MobileViTV2ForImageClassification

    return MobileViTV2ForImageClassification(MobileViTV2Config(width_multiplier=width,
                                                               num_labels=1000))


@pytest.mark.parametrize("width", [0.5, 0.75])
def test_classifier_reproduces_transformers(width):
    hf = hf_classifier(width)
    ours = from_transformers(hf)
    x = torch.randn(2, 3, 96, 160)  # not 256, and 3×5 at the last stage: odd sizes
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) <= 1e-4


@pytest.mark.parametrize("output_stride, size", [(8, 14), (16, 7), (32, 4), (64, 4)])
def test_deeplabv3_reproduces_transformers_at_every_output_stride(output_stride, size):
    """transformers dilates L4 and L5 at output stride 8, L5 at 16 and nothing at 32, its
    default (and at any other value, which behaves as 32)."""
    hf = hf_segmenter(0.5, output_stride=output_stride)
    ours = from_transformers(hf)
    assert ours.output_stride == min(output_stride, 32)
    x = torch.randn(1, 3, 112, 112)  # 7×7 in L4 at output stride 32, in L4 and L5 at 16
    with torch.no_grad():
        expected = hf(x).logits
        actual = ours(x)
    assert actual.shape == expected.shape == (1, 5, size, size)
    assert rel_err(actual, expected) <= 1e-4


def test_deeplabv3_at_output_stride_32_is_the_classification_backbone():
    seg = mobilevitv2_deeplabv3(0.5, output_stride=32, upsample_logits=True).eval()
    convs = [m for m in seg.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.dilation == (1, 1) for c in convs)
    assert [c.stride for c in convs].count((2, 2)) == 5
    with torch.no_grad():
        assert seg.backbone.forward_features(torch.randn(1, 3, 64, 128)).shape[-2:] == (2, 4)
        assert seg(torch.randn(1, 3, 64, 128)).shape == (1, 21, 64, 128)


def block(odd_size, seed=0):
    torch.manual_seed(seed)
    b = MobileViTv2Block(8, 16, 32, depth=1, odd_size=odd_size).eval()
    with torch.no_grad():
        for bn in (b.conv_kxk.bn, b.conv_proj.bn):
            bn.bias.normal_()  # so the zero-filled border of "floor" is not zero
    return b


def test_resize_mode_resizes_odd_maps_up_and_keeps_the_size():
    x = torch.randn(2, 8, 7, 9)
    up = F.interpolate(x, size=(8, 10), mode="bilinear", align_corners=True)
    with torch.no_grad():
        y = block("resize")(x)
        torch.testing.assert_close(y, block("floor")(up))
    assert y.shape == (2, 8, 8, 10)


def test_floor_mode_drops_the_last_row_and_column_and_zero_fills_them():
    x = torch.randn(2, 8, 7, 9)
    b = block("floor")
    with torch.no_grad():
        # only the centre tap of the 3×3 conv, so the last row/column reach nothing through it
        b.conv_kxk.conv.weight[..., [0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]] = 0
        y = b(x)
        inner = b(x[..., :6, :8])
        filled = b.conv_proj(torch.zeros(1, 16, 1, 1))  # folding leaves zeros there
    assert y.shape == x.shape
    torch.testing.assert_close(y[..., :6, :8], inner)
    torch.testing.assert_close(y[..., 6, :], filled[0, :, 0, :1].expand(2, 8, 9))
    torch.testing.assert_close(y[..., :, 8], filled[0, :, 0, :1].expand(2, 8, 7))


def test_even_maps_are_the_same_in_both_modes():
    x = torch.randn(1, 8, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(block("resize")(x), block("floor")(x))


@pytest.mark.parametrize("output_stride, block_dilation, ir_dilation",
                         [(32, [1, 1, 1], [1, 1, 1]), (16, [1, 1, 2], [1, 1, 1]),
                          (8, [1, 2, 4], [1, 1, 2])])
def test_output_stride_dilates_the_last_stages(output_stride, block_dilation, ir_dilation):
    def dilations(model):
        return ([model.stages[i][1].conv_kxk.conv.dilation[0] for i in (2, 3, 4)],
                [model.stages[i][0].dw.conv.dilation[0] for i in (2, 3, 4)])

    m = MobileViTv2(0.5, 0, output_stride=output_stride)
    assert dilations(m) == (block_dilation, ir_dilation)
    undilated = MobileViTv2(0.5, 0, output_stride=output_stride, dilate_block_conv=False)
    assert dilations(undilated) == ([1, 1, 1], ir_dilation)
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 64 // output_stride


@pytest.mark.parametrize("factory", [mobilevitv2, mobilevitv2_deeplabv3])
def test_fused_and_backend_reach_every_attention_module(factory):
    m = factory(0.5, fused=False, backend="reference")
    attns = [a for a in m.modules() if isinstance(a, SeparableAttention)]
    assert len(attns) == 9
    assert all(a.fused is False and a.backend == "reference" for a in attns)


@pytest.mark.parametrize("fused_mode", [True, "kernel"])
def test_fused_and_unfused_agree_forward_and_parameter_gradients(fused_mode):
    torch.manual_seed(0)
    # training mode: BatchNorm uses batch statistics
    fused = mobilevitv2(0.5, num_classes=10, fused=fused_mode)
    unfused = mobilevitv2(0.5, num_classes=10, fused=False)
    unfused.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    y_fused, y_unfused = fused(x), unfused(x)
    assert rel_err(y_fused, y_unfused) <= 1e-5
    g = torch.randn_like(y_fused)
    y_fused.backward(g)
    y_unfused.backward(g)
    # absolute tolerance on the model's gradient scale: some gradients are zero analytically
    # (a BN bias followed by a conv and a training-mode BN) and are round-off only
    scale = max(p.grad.abs().max() for p in unfused.parameters())
    for (name, a), b in zip(fused.named_parameters(), unfused.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_bfloat16_fused_layer_model_is_as_accurate_as_the_reference_model():
    """Whole-model parity in bf16, judged against the float32 model: the fused layer (no keys
    to round) errs no more than the reference implementation does in bf16."""
    torch.manual_seed(0)
    exact = mobilevitv2(0.5, num_classes=10, fused=False).eval()
    fused = mobilevitv2(0.5, num_classes=10).eval()
    reference = mobilevitv2(0.5, num_classes=10, fused=False).eval()
    fused.load_state_dict(exact.state_dict())
    reference.load_state_dict(exact.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        target = exact(x)
        err_fused = rel_err(fused.bfloat16()(x.bfloat16()).float(), target)
        err_reference = rel_err(reference.bfloat16()(x.bfloat16()).float(), target)
    assert err_fused <= 1.5 * err_reference + 1e-3


def test_deeplabv3_fused_matches_unfused_and_upsamples_like_cvnets():
    torch.manual_seed(0)
    m = mobilevitv2_deeplabv3(0.5, num_classes=3, aspp_channels=32).eval()
    unfused = mobilevitv2_deeplabv3(0.5, num_classes=3, aspp_channels=32, fused=False).eval()
    unfused.load_state_dict(m.state_dict())
    m_up = mobilevitv2_deeplabv3(0.5, num_classes=3, aspp_channels=32, upsample_logits=True)
    m_up.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        low = m(x)
        assert low.shape == (1, 3, 4, 4)
        assert rel_err(low, unfused(x)) <= 1e-5
        expected = F.interpolate(low, scale_factor=16, mode="bilinear", align_corners=True)
        torch.testing.assert_close(m_up.eval()(x), expected)


def test_torch_compile_fullgraph_gives_the_same_outputs():
    m = mobilevitv2(0.5, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = m(x)
        actual = torch.compile(m, fullgraph=True)(x)
    assert rel_err(actual, expected) <= 1e-4


def test_bad_configurations():
    with pytest.raises(ValueError, match="width"):
        mobilevitv2(0.6)
    with pytest.raises(ValueError, match="output_stride"):
        mobilevitv2(0.5, output_stride=4)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 4"):
        mobilevitv2_deeplabv3(0.5, output_stride=4)
    with pytest.raises(ValueError, match="odd_size"):
        mobilevitv2(0.5, odd_size="pad")


# --- preprocessing: transformers' MobileViTImageProcessor is the oracle ---------------------


def hf_processor(**kwargs):
    with optional("transformers"):
        from transformers import MobileViTImageProcessorPil

    return MobileViTImageProcessorPil(**kwargs)


@pytest.mark.parametrize("hw, resample", [((200, 300), "bilinear"), ((333, 181), "bicubic")])
@pytest.mark.parametrize("flip", [True, False])
def test_preprocess_matches_transformers_image_processor(hw, resample, flip):
    with optional("pillow"):
        from PIL import Image
    with optional("transformers"):
        from transformers.image_utils import PILImageResampling

    pixels = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    proc = hf_processor(size={"shortest_edge": 288}, crop_size={"height": 256, "width": 256},
                        resample=getattr(PILImageResampling, resample.upper()),
                        do_flip_channel_order=flip)
    expected = proc(Image.fromarray(pixels), return_tensors="pt").pixel_values
    ours = preprocess(Image.fromarray(pixels), resample=resample, flip_channel_order=flip)
    assert ours.dtype == torch.float32 and ours.shape == (1, 3, 256, 256)
    assert torch.equal(ours, expected)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    assert torch.equal(preprocess(chw, resample=resample, flip_channel_order=flip), expected)
    batch = preprocess(torch.stack([chw, chw]), resample=resample, flip_channel_order=flip)
    assert torch.equal(batch, expected.expand(2, -1, -1, -1))


def test_preprocess_pads_images_smaller_than_the_crop_like_transformers():
    with optional("pillow"):
        from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (201, 150, 3), dtype=np.uint8)
    proc = hf_processor(do_resize=False, crop_size={"height": 256, "width": 128})
    expected = proc(Image.fromarray(pixels), return_tensors="pt").pixel_values
    ours = preprocess(Image.fromarray(pixels), shortest_edge=0, crop_size=(256, 128))
    assert torch.equal(ours, expected)


def test_preprocess_rejects_what_it_cannot_read():
    with pytest.raises(TypeError, match="uint8"):
        preprocess(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        preprocess(torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="resample"):
        preprocess(torch.zeros(3, 8, 8, dtype=torch.uint8), resample="area")
