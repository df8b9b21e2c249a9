"""Specification of checkpoint conversion: transformers, timm and ml-cvnets MobileViTv2 weights
load into our models and reproduce transformers' outputs; bad checkpoints fail with the keys.

timm and ml-cvnets cannot be installed here: their key names and shapes come from
``fixtures/mobilevitv2_keys.json``, derived from their source (``make_mobilevitv2_keys.py``).
Since every library registers modules in forward order, a transformers model's tensors relabelled
in order with those names are that model's weights in timm's / ml-cvnets' format.
"""

import pytest
import torch
from fixtures.hf_mobilevitv2 import (
    hf_classifier,
    hf_segmenter,
    randomize_,
    rel_err,
    relabel_in_order,
    source_keys,
)
from fixtures.optional import optional
from torch import nn

from mvit2_kernels.models import (
    CheckpointError,
    MobileViTv2,
    MobileViTv2DeepLabV3,
    convert_state_dict,
    from_transformers,
    fuse_,
    load_pretrained,
    mobilevitv2,
)
from mvit2_kernels.nn import SeparableAttention


@pytest.fixture(scope="module")
def hf_050():
    """transformers MobileViTV2-0.5 with 1000 classes, like the released checkpoints."""
    return hf_classifier(0.5, num_labels=1000)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 128)  # 2×4 at the last stage: no odd sizes


def hf_logits(hf, x):
    with torch.no_grad():
        return hf(x).logits


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt", ".pth"])
def test_load_pretrained_reads_local_files_and_reproduces_transformers(hf_050, x, tmp_path,
                                                                      suffix):
    path = tmp_path / f"model{suffix}"
    sd = {k: v.contiguous() for k, v in hf_050.state_dict().items()}
    if suffix == ".safetensors":
        with optional("safetensors"):
            from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    ours = load_pretrained(path, source="transformers")
    assert isinstance(ours, MobileViTv2) and not ours.training
    assert ours.classifier.out_features == 1000 and ours.width == 0.5
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(hf_050, x)) <= 1e-4


@pytest.mark.parametrize("source, entry", [("timm", "timm_mobilevitv2_050"),
                                           ("cvnets", "cvnets_mobilevitv2_050")])
def test_timm_and_cvnets_classifier_checkpoints(hf_050, x, source, entry):
    sd = relabel_in_order(hf_050.state_dict(), source_keys(entry))
    # their resize-on-odd-sizes differs from transformers' floor only at odd sizes (none here)
    ours = load_pretrained(sd, source=source)
    assert ours.stages[4][1].odd_size == "resize"
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(hf_050, x)) <= 1e-4


def test_cvnets_deeplabv3_checkpoint_drops_the_auxiliary_head():
    hf = hf_segmenter(0.5, num_labels=21, output_stride=16)
    keys = source_keys("cvnets_mobilevitv2_050_deeplabv3_voc")
    sd = relabel_in_order(hf.state_dict(), keys, skip=("seg_head.aux_head.",))
    ours = load_pretrained(sd, source="cvnets", dilate_block_conv=False, odd_size="floor")
    assert isinstance(ours, MobileViTv2DeepLabV3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(hf, x)) <= 1e-4


def test_transformers_segmentation_checkpoint_and_defaults(tmp_path):
    hf = hf_segmenter(0.5, output_stride=16, aspp_out_channels=64)
    ours = load_pretrained(hf.state_dict(), source="transformers")
    # transformers' numerics by default: floor, undilated block conv
    assert ours.backbone.stages[4][1].odd_size == "floor"
    assert ours.backbone.stages[4][1].conv_kxk.conv.dilation == (1, 1)
    x = torch.randn(1, 3, 80, 80)  # 5×5 in the last stages
    with torch.no_grad():
        assert rel_err(ours(x), hf_logits(hf, x)) <= 1e-4


def test_fixture_keys_match_the_models_layer_by_layer():
    # the derived key lists line up with transformers tensor by tensor (shapes asserted inside)
    hf = hf_classifier(0.5, num_labels=1000).state_dict()
    for entry in ("timm_mobilevitv2_050", "cvnets_mobilevitv2_050"):
        assert len(relabel_in_order(hf, source_keys(entry))) == len(hf)


def test_convert_maps_transformers_keys_to_ours(hf_050):
    converted = convert_state_dict(hf_050.state_dict(), "transformers")
    assert list(converted) == list(mobilevitv2(0.5).state_dict())  # same keys, same order
    hf_key = "mobilevitv2.encoder.layer.2.transformer.layer.0.attention.qkv_proj.convolution"
    assert (converted["stages.2.1.transformer.0.attn.qkv_proj.weight"].data_ptr()
            == hf_050.state_dict()[f"{hf_key}.weight"].data_ptr())  # renamed, not copied


def test_wrapped_and_prefixed_checkpoints_and_our_own(hf_050, x):
    sd = hf_050.state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    ours = load_pretrained(wrapped, source="transformers")
    again = load_pretrained(ours.state_dict(), source="mvit2", odd_size="floor",
                            dilate_block_conv=False)
    with torch.no_grad():
        assert rel_err(again(x), hf_logits(hf_050, x)) <= 1e-4


def test_missing_num_batches_tracked_is_not_an_error(hf_050):
    sd = {k: v for k, v in hf_050.state_dict().items() if "num_batches_tracked" not in k}
    model = load_pretrained(sd, source="transformers")
    assert int(model.stem.bn.num_batches_tracked) == 0


# --- bad checkpoints: the errors name the keys -------------------------------------------------


def test_unknown_keys_are_listed(hf_050):
    sd = dict(hf_050.state_dict(), **{"mobilevitv2.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 unknown key\(s\): mobilevitv2\.extra\.weight"):
        convert_state_dict(sd, "transformers")


def test_missing_and_misshapen_keys_are_listed(hf_050):
    sd = dict(hf_050.state_dict())
    del sd["mobilevitv2.encoder.layer.3.layernorm.bias"]
    sd["classifier.bias"] = torch.zeros(999)
    with pytest.raises(CheckpointError) as err:
        convert_state_dict(sd, "transformers")
    msg = str(err.value)
    assert "missing key(s): stages.3.1.norm.bias" in msg
    assert "classifier.bias: (999,) != expected (1000,)" in msg


def test_checkpoint_of_another_width_than_the_model(hf_050):
    with pytest.raises(CheckpointError, match="misshapen"):
        convert_state_dict(hf_050.state_dict(), "transformers", model=mobilevitv2(0.75))


def test_wrong_source_or_family_or_file():
    sd = hf_classifier(0.5).state_dict()
    with pytest.raises(CheckpointError, match="no model family recognises these timm keys"):
        convert_state_dict(sd, "timm")
    with pytest.raises(ValueError, match="unknown source 'keras'"):
        convert_state_dict(sd, "keras")
    with pytest.raises(ValueError, match="no 'transformers' converter registered"):
        convert_state_dict(sd, "transformers", family="resnet")
    with pytest.raises(CheckpointError, match="not tensors: a"):
        convert_state_dict({"a": 1.0}, "transformers")
    with pytest.raises(FileNotFoundError, match="only local files"):
        load_pretrained("/nonexistent/mobilevitv2.safetensors")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="extension"):
        load_pretrained(path)


# --- from_transformers and fuse_ -------------------------------------------------------------


def test_from_transformers_keeps_device_dtype_and_mode():
    hf = hf_classifier(0.5).double().train()
    ours = from_transformers(hf, fused=False, backend="reference")
    assert ours.training and next(ours.parameters()).dtype == torch.float64
    assert all(not m.fused for m in ours.modules() if isinstance(m, SeparableAttention))
    with pytest.raises(TypeError, match="does not know Linear"):
        from_transformers(nn.Linear(2, 2))


def test_fuse_swaps_transformers_attention_in_place_with_the_same_weights(hf_050, x):
    hf = hf_classifier(0.5, num_labels=1000)
    expected = hf_logits(hf, x)
    params = {k: v for k, v in hf.named_parameters()}
    keys = list(hf.state_dict())
    assert fuse_(hf, backend="auto") == 9
    assert fuse_(hf) == 0  # already fused
    assert sum(isinstance(m, SeparableAttention) for m in hf.modules()) == 9
    assert list(hf.state_dict()) == keys  # checkpoints still load
    assert all(p is params[k] for k, p in hf.named_parameters())
    assert rel_err(hf_logits(hf, x), expected) <= 1e-5


def test_fuse_runs_the_whole_layer_on_transformers_projections(monkeypatch):
    """transformers wraps each 1×1 conv in a MobileViTV2ConvLayer (no norm, no activation): the
    swapped module still takes the layer path, reading the wrapped convolutions' weights."""
    import mvit2_kernels.nn as mnn

    hf = hf_classifier(0.5, num_labels=10)
    fuse_(hf)
    calls = []
    real = mnn.separable_attention_layer
    monkeypatch.setattr(mnn, "separable_attention_layer",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    hf_logits(hf, torch.randn(1, 3, 64, 64))
    assert len(calls) == 9


def hf_classifier_class():
    with optional("transformers"):
        from transformers import MobileViTV2Config, MobileViTV2ForImageClassification

    return MobileViTV2ForImageClassification, MobileViTV2Config(width_multiplier=0.5,
                                                                num_labels=10)


def test_fuse_keeps_the_model_initialisable_by_transformers():
    """transformers' init reaches the projections the swapped module keeps (and the module is
    still a ``MobileViTV2LinearSelfAttention``): built on the meta device, fused, materialised
    and initialised, the model gets every parameter transformers gives the unfused model."""
    cls, config = hf_classifier_class()
    models = []
    for fuse in (False, True):
        with torch.device("meta"):
            model = cls(config)
        if fuse:
            assert fuse_(model) == 9
        model.to_empty(device="cpu")
        with torch.no_grad():
            for t in model.state_dict().values():
                t.fill_(float("nan") if t.is_floating_point() else -1)
        torch.manual_seed(0)
        model.init_weights()
        models.append(model)
    unfused, fused = models
    fused_sd = fused.state_dict()
    for name, t in unfused.state_dict().items():
        assert torch.equal(fused_sd[name], t), name
    attn = fused.mobilevitv2.encoder.layer[2].transformer.layer[0].attention
    assert isinstance(attn, SeparableAttention)
    assert isinstance(attn, type(unfused.mobilevitv2.encoder.layer[2].transformer.layer[0]
                                 .attention))


def test_from_pretrained_initialises_missing_projections_of_a_model_fused_in_init(
        tmp_path, poison_empty):
    cls, config = hf_classifier_class()

    class FusedMobileViTV2(cls):
        def __init__(self, config):
            super().__init__(config)
            fuse_(self)

    source = randomize_(cls(config))
    source.save_pretrained(tmp_path, state_dict={
        k: v for k, v in source.state_dict().items() if ".attention.qkv_proj." not in k})
    torch.manual_seed(0)
    expected = cls.from_pretrained(tmp_path).eval()
    torch.manual_seed(0)
    fused = FusedMobileViTV2.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, SeparableAttention) for m in fused.modules()) == 9
    fused_sd = fused.state_dict()
    for name, t in expected.state_dict().items():
        assert torch.equal(fused_sd[name], t), name
    x = torch.randn(1, 3, 64, 64)
    assert rel_err(hf_logits(fused, x), hf_logits(expected, x)) <= 1e-4


class LinearSelfAttention(nn.Module):
    """timm's MobileViTv2 attention (timm/models/mobilevit.py), the self-attention path."""

    def __init__(self, embed_dim, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.qkv_proj = nn.Conv2d(embed_dim, 1 + 2 * embed_dim, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.out_proj = nn.Conv2d(embed_dim, embed_dim, 1)
        self.out_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        q, k, v = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        context = (k * self.attn_drop(torch.softmax(q, dim=-1))).sum(dim=-1, keepdim=True)
        return self.out_drop(self.out_proj(torch.relu(v) * context.expand_as(v)))


def test_fuse_swaps_timm_style_attention_and_keeps_dropouts():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), LinearSelfAttention(8, attn_drop=0.1, proj_drop=0.2))
    model.eval()
    x = torch.randn(2, 4, 4, 9)
    with torch.no_grad():
        expected = model(x)
        assert fuse_(model) == 1
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    swapped = model[1]
    assert isinstance(swapped, SeparableAttention) and swapped.attn_dropout == 0.1
    assert swapped.proj_drop.p == 0.2


def test_fuse_needs_a_model_around_the_attention():
    with pytest.raises(ValueError, match="submodules"):
        fuse_(LinearSelfAttention(4))


def test_fuse_of_an_ml_cvnets_attention_prints_and_computes_like_the_original():
    """ml-cvnets' ``LinearSelfAttention.__repr__`` reads ``self.attn_dropout.p``; the swapped
    module (an instance of both classes) prints with our own repr, and computes the same."""

    class LinearSelfAttention(nn.Module):  # ml-cvnets' layout, reduced to what fuse_ reads
        def __init__(self, embed_dim):
            super().__init__()
            self.embed_dim = embed_dim
            self.qkv_proj = nn.Conv2d(embed_dim, 1 + 2 * embed_dim, 1)
            self.out_proj = nn.Conv2d(embed_dim, embed_dim, 1)
            self.attn_dropout = nn.Dropout(0.0)

        def forward(self, x):
            q, k, v = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
            ctx = (k * torch.softmax(q, dim=-1)).sum(-1, keepdim=True)
            return self.out_proj(torch.relu(v) * ctx)

        def __repr__(self):
            return f"LinearSelfAttention(attn_dropout={self.attn_dropout.p})"

    torch.manual_seed(0)
    model = nn.Sequential(LinearSelfAttention(8))
    x = torch.randn(2, 8, 4, 9)
    with torch.no_grad():
        expected = model(x)
    assert fuse_(model) == 1
    assert "fused=True" in repr(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
