"""Specification of the SwiftFormer models and ``EfficientAdditiveAttention``: the published
configurations, parity with transformers (the softmax variant), checkpoints of the original code,
timm and transformers, fused vs unfused, and ``fuse_``."""

import pytest
import torch
import torch.nn.functional as F
from fixtures.hf_mobilevitv2 import randomize_, rel_err
from fixtures.optional import importorskip, optional
from torch import nn

import mvit2_kernels.models.swiftformer_checkpoints  # noqa: F401  (registers the family)
from mvit2_kernels.models import convert_state_dict, from_transformers, fuse_, load_pretrained
from mvit2_kernels.models.swiftformer import (
    CONFIGS,
    SwiftFormer,
    swiftformer_l1,
    swiftformer_l3,
    swiftformer_s,
    swiftformer_xs,
)
from mvit2_kernels.nn import EfficientAdditiveAttention

# The paper's parameter counts (millions) of the released configurations (docs/design.md §3).
PARAMS = {"xs": 3.5, "s": 6.1, "l1": 12.1, "l3": 28.5}
FACTORIES = {"xs": swiftformer_xs, "s": swiftformer_s, "l1": swiftformer_l1, "l3": swiftformer_l3}
SMALL = {"depths": [2, 1, 1, 2], "embed_dims": [16, 24, 32, 40]}  # fast, every block kind


def hf_config(num_labels=7, **config):
    with optional("transformers"):
        from transformers import SwiftFormerConfig

    return SwiftFormerConfig(num_labels=num_labels, **{**SMALL, **config})


def hf_class():
    with optional("transformers"):
        from transformers import SwiftFormerForImageClassification

    return SwiftFormerForImageClassification


def hf_swiftformer(num_labels=7, **config):
    return randomize_(hf_class()(hf_config(num_labels, **config)).eval())


def ours_small(variant="normalize", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = SwiftFormer(SMALL["depths"], SMALL["embed_dims"], 7, variant=variant, **kwargs)
    return randomize_(model, seed).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_configuration_is_the_published_one(name):
    with optional("transformers"):
        from transformers import SwiftFormerConfig, SwiftFormerForImageClassification

    depths, dims = CONFIGS[name]
    with torch.device("meta"):
        m = FACTORIES[name](variant="normalize")
        hf = SwiftFormerForImageClassification(
            SwiftFormerConfig(depths=list(depths), embed_dims=list(dims), num_labels=1000)
        )
    assert [len(s.blocks) for s in m.stages] == list(depths)
    assert [s.blocks[-1].attn.dim for s in m.stages] == list(dims)
    n = sum(p.numel() for p in m.parameters())
    assert n == sum(p.numel() for p in hf.parameters())
    assert round(n / 1e6, 1) == PARAMS[name]


@pytest.mark.parametrize("fused", [True, False])
def test_from_transformers_reproduces_its_logits(x, fused):
    hf = hf_swiftformer()
    ours = from_transformers(hf, fused=fused)
    assert all(s.blocks[-1].attn.variant == "softmax" for s in ours.stages)
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).logits) <= 1e-4


def test_additive_attention_module_reproduces_transformers():
    with optional("transformers"):
        from transformers import SwiftFormerConfig
        from transformers.models.swiftformer.modeling_swiftformer import (
            SwiftFormerEfficientAdditiveAttention,
        )

    torch.manual_seed(0)
    hf = SwiftFormerEfficientAdditiveAttention(SwiftFormerConfig(), dim=24)
    ours = EfficientAdditiveAttention(24, variant="softmax")
    ours.load_state_dict(hf.state_dict())
    assert ours.scale_factor == hf.scale_factor
    t = torch.randn(3, 50, 24)
    torch.testing.assert_close(ours(t), hf(t))


def original_attention(dim):
    """The original code's module (its class name and ``Proj`` included), as published."""

    class EfficientAdditiveAttnetion(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_query, self.to_key = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.w_g = nn.Parameter(torch.randn(dim, 1))
            self.scale_factor = dim**-0.5
            self.Proj, self.final = nn.Linear(dim, dim), nn.Linear(dim, dim)

        def forward(self, x):
            query = F.normalize(self.to_query(x), dim=-1)
            key = F.normalize(self.to_key(x), dim=-1)
            A = F.normalize(query @ self.w_g * self.scale_factor, dim=1)
            G = torch.sum(A * query, dim=1)[:, None]
            return self.final(self.Proj(G * key) + query)

    return EfficientAdditiveAttnetion()


def test_additive_attention_module_loads_and_reproduces_the_original_code():
    torch.manual_seed(0)
    original = original_attention(20)
    ours = EfficientAdditiveAttention(20, variant="normalize")
    ours.load_state_dict(original.state_dict())  # "Proj.*" loads into proj
    t = torch.randn(2, 30, 20)
    torch.testing.assert_close(ours(t), original(t))
    assert ours(t).shape == (2, 30, 20)


def test_additive_attention_module_needs_a_known_variant():
    with pytest.raises(TypeError):
        EfficientAdditiveAttention(8)  # no default: the two published variants differ
    with pytest.raises(ValueError, match="variant must be 'normalize' or 'softmax'"):
        EfficientAdditiveAttention(8, variant="sigmoid")


def _original_keys(sd):
    """Our keys under the original code's names: ``network`` alternates stage i (2i) and the
    downsampling into stage i + 1 (2i + 1); ``patch_embed``, ``Proj``, ``dist_head``."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stages":
            i = int(parts[1])
            head = [f"network.{2 * i}"] if parts[2] == "blocks" else [f"network.{2 * i - 1}"]
            k = ".".join(head + parts[3:])
        k = k.replace("stem.", "patch_embed.").replace("attn.proj.", "attn.Proj.")
        out[k.replace("head_dist.", "dist_head.")] = v
    return out


def _timm_keys(sd):
    """Our keys under timm's names: LayerScale2d modules hold ``gamma``."""
    return {
        k + ".gamma" if k.split(".")[-1].startswith("layer_scale") else k: v for k, v in sd.items()
    }


@pytest.mark.parametrize(
    ("source", "rename"), [("swiftformer", _original_keys), ("timm", _timm_keys)]
)
def test_original_and_timm_checkpoints_load_with_the_normalize_variant(x, source, rename):
    ours = ours_small("normalize")
    converted = convert_state_dict(rename(ours.state_dict()), source)
    assert converted.keys() == ours.state_dict().keys()
    loaded = load_pretrained(rename(ours.state_dict()), source)
    assert all(s.blocks[-1].attn.variant == "normalize" for s in loaded.stages)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x))


def test_transformers_checkpoint_loads_with_the_softmax_variant(x, tmp_path):
    hf = hf_swiftformer()
    path = tmp_path / "swiftformer.pt"
    torch.save(hf.state_dict(), path)
    loaded = load_pretrained(path, "transformers")
    with torch.no_grad():
        assert rel_err(loaded(x), hf(x).logits) <= 1e-4


def test_our_checkpoints_need_the_variant():
    sd = ours_small().state_dict()
    with pytest.raises(ValueError, match="pass variant="):
        load_pretrained(sd, "mvit2")
    assert (
        load_pretrained(sd, "mvit2", variant="softmax").stages[0].blocks[-1].attn.variant
        == "softmax"
    )


def test_timm_reproduces_our_model_when_available(x):
    timm = importorskip("timm")
    model = randomize_(timm.create_model("swiftformer_xs", num_classes=7).eval())
    ours = load_pretrained(model.state_dict(), "timm")
    with torch.no_grad():
        assert rel_err(ours(x), model(x)) <= 1e-4


@pytest.mark.parametrize("variant", ["normalize", "softmax"])
def test_fused_and_unfused_models_agree_forward_and_backward(x, variant):
    fused, unfused = ours_small(variant).train(), ours_small(variant, fused=False).train()
    unfused.load_state_dict(fused.state_dict())
    outs = []
    for model in (fused, unfused):
        y = model(x)
        y.square().sum().backward()
        outs.append((y, [p.grad for p in model.parameters()]))
    assert rel_err(outs[0][0], outs[1][0]) <= 1e-4
    # Some gradients are 0 up to rounding (a conv bias before a train-mode BatchNorm): compare
    # each against the scale of all of them.
    scale = max(g.abs().max().item() for g in outs[1][1])
    for g, g_ref in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * scale)


def test_variants_give_different_models(x):
    normalize, softmax = ours_small("normalize"), ours_small("softmax")
    with torch.no_grad():
        assert rel_err(normalize(x), softmax(x)) > 1e-3


def test_heads_are_averaged_and_distilled_training_returns_both(x):
    model = ours_small()
    with torch.no_grad():
        f = model.forward_features(x).mean(dim=(2, 3))
        torch.testing.assert_close(model(x), (model.head(f) + model.head_dist(f)) / 2)
    model.train().distilled_training = True
    cls, dist = model(x)
    assert cls.shape == dist.shape == (2, 7)


def test_fuse_swaps_transformers_attention_in_place_with_the_same_weights(x):
    hf = hf_swiftformer()
    with torch.no_grad():
        expected = hf(x).logits
    w_g = hf.swiftformer.encoder.network[0].blocks[-1].attn.w_g
    assert fuse_(hf, backend="cpu") == 4
    attn = hf.swiftformer.encoder.network[0].blocks[-1].attn
    assert isinstance(attn, EfficientAdditiveAttention) and attn.variant == "softmax"
    assert attn.w_g is w_g
    with torch.no_grad():
        assert rel_err(hf(x).logits, expected) <= 1e-4


def test_fuse_keeps_w_g_initialisable_by_transformers():
    """transformers initialises a module's own parameters by its class
    (``SwiftFormerPreTrainedModel._init_weights``: ``normal_(w_g)`` for its attention). A
    model built on the meta device, fused, materialised and initialised gets every parameter
    transformers gives the unfused model, ``w_g`` included, not the empty memory."""
    models = []
    for fuse in (False, True):
        with torch.device("meta"):
            model = hf_class()(hf_config())
        if fuse:
            assert fuse_(model) == 4
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        torch.manual_seed(0)
        model.init_weights()
        models.append(model)
    unfused, fused = models
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters(), strict=True):
        assert torch.equal(p, q), name
    attn = fused.swiftformer.encoder.network[0].blocks[-1].attn
    assert isinstance(attn, EfficientAdditiveAttention)
    assert isinstance(attn, type(unfused.swiftformer.encoder.network[0].blocks[-1].attn))


def test_from_pretrained_initialises_a_missing_w_g_of_a_model_fused_in_init(tmp_path,
                                                                          poison_empty):
    """``from_pretrained`` builds on the meta device, allocates what the checkpoint lacks with
    ``empty_like`` (NaN here) and initialises it with ``_init_weights``: a model that fuses in
    its ``__init__`` gets the ``w_g`` transformers would draw, not the allocation."""

    class FusedSwiftFormer(hf_class()):
        def __init__(self, config):
            super().__init__(config)
            fuse_(self)

    source = hf_swiftformer()
    source.save_pretrained(tmp_path, state_dict={
        k: v for k, v in source.state_dict().items() if not k.endswith(".w_g")})
    torch.manual_seed(0)
    expected = hf_class().from_pretrained(tmp_path)
    torch.manual_seed(0)
    fused = FusedSwiftFormer.from_pretrained(tmp_path)
    w_g = [(n, p) for n, p in fused.named_parameters() if n.endswith(".w_g")]
    assert len(w_g) == 4
    assert all(isinstance(m, EfficientAdditiveAttention) for n, m in fused.named_modules()
               if n.endswith(".attn"))
    for name, p in w_g:
        assert p.isfinite().all(), name
        assert torch.equal(p, expected.get_parameter(name)), name  # normal_(w_g), same draws
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused(x).logits, expected(x).logits) <= 1e-4


def test_fused_transformers_model_copies_and_pickles(x):
    """The swapped module's class joins ours and transformers' at run time: copies and pickles
    rebuild it."""
    import copy
    import pickle

    hf = hf_swiftformer()
    fuse_(hf)
    with torch.no_grad():
        expected = hf(x).logits
        for clone in (copy.deepcopy(hf), pickle.loads(pickle.dumps(hf))):
            attn = clone.swiftformer.encoder.network[0].blocks[-1].attn
            assert type(attn) is type(hf.swiftformer.encoder.network[0].blocks[-1].attn)
            assert torch.equal(clone(x).logits, expected)


def test_meta_built_model_is_initialised_by_reset_parameters(poison_empty):
    """``to_empty`` + every module's ``reset_parameters`` (FSDP's meta-device initialisation)
    leaves no parameter as the NaN-filled allocation: the layer scales get their init values."""
    with torch.device("meta"):
        model = ours_small(layer_scale_init=0.25)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for name, p in model.named_parameters():
        assert p.isfinite().all(), name
    for i, stage in enumerate(model.stages):
        *encoders, block = stage.blocks
        assert all(torch.equal(e.layer_scale, torch.ones_like(e.layer_scale)) for e in encoders)
        assert torch.equal(block.local_representation.layer_scale,
                           torch.ones_like(block.layer_scale_1)), i
        assert (block.layer_scale_1 == 0.25).all() and (block.layer_scale_2 == 0.25).all(), i


def timm_attention(dim):
    """timm's module (same class name as ours), ``Tensor[B, C, H, W]`` in and out, as published."""

    class EfficientAdditiveAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale_factor = dim**-0.5
            self.to_query, self.to_key = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.w_g = nn.Parameter(torch.randn(dim, 1))
            self.proj, self.final = nn.Linear(dim, dim), nn.Linear(dim, dim)

        def forward(self, x):
            B, _, H, W = x.shape
            x = x.flatten(2).permute(0, 2, 1)
            query = F.normalize(self.to_query(x), dim=-1)
            key = F.normalize(self.to_key(x), dim=-1)
            attn = F.normalize(query @ self.w_g * self.scale_factor, dim=1)
            attn = torch.sum(attn * query, dim=1, keepdim=True)
            out = self.proj(attn * key) + query
            return self.final(out).permute(0, 2, 1).reshape(B, -1, H, W)

    return EfficientAdditiveAttention()


@pytest.mark.parametrize(
    ("module", "shape"), [(original_attention, (2, 9, 12)), (timm_attention, (2, 12, 3, 5))]
)
def test_fuse_swaps_original_and_timm_attention_with_the_normalize_variant(module, shape):
    """The original module works on tokens [B, N, D], timm's on [B, C, H, W]: kept as it is."""
    model = nn.Sequential(module(12))
    t = torch.randn(shape)
    with torch.no_grad():
        expected = model(t)
    assert fuse_(model) == 1
    assert isinstance(model[0], EfficientAdditiveAttention) and model[0].variant == "normalize"
    with torch.no_grad():
        torch.testing.assert_close(model(t), expected)
