"""MobileViTv2 checkpoints of transformers, timm and ml-cvnets in our key names.

Our layout (``MobileViTv2`` / ``MobileViTv2DeepLabV3``)::

    stem.{conv,bn}                                  3×3 s2 conv-BN-SiLU
    stages.{0,1}.{j}.{expand,dw,reduce}.{conv,bn}    inverted residuals
    stages.{2,3,4}.0.{expand,dw,reduce}.{conv,bn}    the stage's downsampling inverted residual
    stages.{2,3,4}.1.conv_kxk.{conv,bn} / conv_1x1   MobileViT block: local representation
    stages.{2,3,4}.1.transformer.{j}.{norm1,attn.qkv_proj,attn.out_proj,norm2,mlp.fc1,mlp.fc2}
    stages.{2,3,4}.1.norm / conv_proj.{conv,bn}
    classifier                                      Linear (classification)
    backbone.* + aspp.{convs.{0-3},pool,project}.{conv,bn} + classifier   (DeepLabV3)

The key correspondences follow the sources' module trees: transformers' ``modeling_mobilevitv2.py``
(and its ml-cvnets converter, ``convert_mlcvnets_to_pytorch.py``), ml-cvnets' ``mobilevit_v2.py``
/ ``mobilevit_block.py`` / ``aspp_block.py``, timm's ``mobilevit.py`` / ``byobnet.py``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from torch import Tensor, nn

from .convert import (
    CheckpointError,
    KeyRules,
    convert_state_dict,
    register_builder,
    register_converter,
    register_transformers_class,
)
from .deeplabv3 import MobileViTv2DeepLabV3
from .mobilevitv2 import MobileViTv2

FAMILY = "mobilevitv2"
_CONV_BN = r"(conv\.weight|bn\.\w+)"  # a conv-BN(-act) unit: the conv's weight, BN's tensors
_BLOCK = r"stages\.([234])\.1"  # the MobileViT block of stages 2-4 (after source renames)

TRANSFORMERS_RULES = KeyRules(
    renames=[(r"^mobilevitv2\.", ""), (r"\.convolution\.", ".conv."),
             (r"\.normalization\.", ".bn."), (r"\.expand_1x1\.", ".expand."),
             (r"\.conv_3x3\.", ".dw."), (r"\.reduce_1x1\.", ".reduce."),
             (r"^encoder\.layer\.(\d)\.", r"stages.\1.")],
    structure=[
        (rf"conv_stem\.{_CONV_BN}", r"stem.\1"),
        (rf"stages\.([01])\.layer\.(\d+)\.(expand|dw|reduce)\.{_CONV_BN}", r"stages.\1.\2.\3.\4"),
        (rf"stages\.([234])\.downsampling_layer\.(expand|dw|reduce)\.{_CONV_BN}",
         r"stages.\1.0.\2.\3"),
        (rf"stages\.([234])\.conv_kxk\.{_CONV_BN}", r"stages.\1.1.conv_kxk.\2"),
        (r"stages\.([234])\.conv_1x1\.conv\.weight", r"stages.\1.1.conv_1x1.weight"),
        (r"stages\.([234])\.transformer\.layer\.(\d+)\.layernorm_before\.(weight|bias)",
         r"stages.\1.1.transformer.\2.norm1.\3"),
        (r"stages\.([234])\.transformer\.layer\.(\d+)\.attention\.(qkv_proj|out_proj)\.conv\."
         r"(weight|bias)", r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (r"stages\.([234])\.transformer\.layer\.(\d+)\.layernorm_after\.(weight|bias)",
         r"stages.\1.1.transformer.\2.norm2.\3"),
        (r"stages\.([234])\.transformer\.layer\.(\d+)\.ffn\.conv([12])\.conv\.(weight|bias)",
         r"stages.\1.1.transformer.\2.mlp.fc\3.\4"),
        (r"stages\.([234])\.layernorm\.(weight|bias)", r"stages.\1.1.norm.\2"),
        (rf"stages\.([234])\.conv_projection\.{_CONV_BN}", r"stages.\1.1.conv_proj.\2"),
        (r"classifier\.(weight|bias)", r"classifier.\1"),
        (rf"segmentation_head\.aspp\.convs\.([0-3])\.{_CONV_BN}", r"aspp.convs.\1.\2"),
        (rf"segmentation_head\.aspp\.convs\.4\.conv_1x1\.{_CONV_BN}", r"aspp.pool.\1"),
        (rf"segmentation_head\.aspp\.project\.{_CONV_BN}", r"aspp.project.\1"),
        (r"segmentation_head\.classifier\.conv\.(weight|bias)", r"classifier.\1"),
    ],
)

# timm builds MobileViTv2 from ByobNet: stem + stages of BottleneckBlock (inverted residual) and
# MobileVitV2Block, whose inner names are already ours; only the bottleneck convs and the head
# are named differently.
TIMM_RULES = KeyRules(
    renames=[(r"\.conv1_1x1\.", ".expand."), (r"\.conv2_kxk\.", ".dw."),
             (r"\.conv3_1x1\.", ".reduce."), (r"^head\.fc\.", "classifier.")],
    structure=[
        (rf"stem\.{_CONV_BN}", r"\g<0>"),
        (rf"stages\.([01])\.(\d+)\.(expand|dw|reduce)\.{_CONV_BN}", r"\g<0>"),
        (rf"stages\.([234])\.0\.(expand|dw|reduce)\.{_CONV_BN}", r"\g<0>"),
        (rf"{_BLOCK}\.(conv_kxk|conv_proj)\.{_CONV_BN}", r"\g<0>"),
        (rf"{_BLOCK}\.conv_1x1\.weight", r"\g<0>"),
        (rf"{_BLOCK}\.transformer\.\d+\.(norm1|norm2|attn\.qkv_proj|attn\.out_proj|mlp\.fc1|"
         r"mlp\.fc2)\.(weight|bias)", r"\g<0>"),
        (rf"{_BLOCK}\.norm\.(weight|bias)", r"\g<0>"),
        (r"classifier\.(weight|bias)", r"\g<0>"),
    ],
)

# ml-cvnets: ConvLayer2d keeps conv/norm/act in a ``block`` Sequential, as does InvertedResidual;
# segmentation checkpoints prefix the backbone with ``encoder.`` and carry an auxiliary head
# used only in training (transformers' converter drops it too).
CVNETS_RULES = KeyRules(
    ignore=[r"seg_head\.aux_head\..*"],
    renames=[(r"^encoder\.", ""), (r"\.block\.norm\.", ".block.bn."), (r"\.block\.", "."),
             (r"^conv_1\.", "stem."), (r"\.exp_1x1\.", ".expand."), (r"\.conv_3x3\.", ".dw."),
             (r"\.red_1x1\.", ".reduce."), (r"^seg_head\.aspp\.aspp_layer\.", "aspp."),
             (r"^seg_head\.", "")]
    + [(rf"^layer_{i + 1}\.", f"stages.{i}.") for i in range(5)],
    structure=[
        (rf"stem\.{_CONV_BN}", r"\g<0>"),
        (rf"stages\.([01])\.(\d+)\.(expand|dw|reduce)\.{_CONV_BN}", r"\g<0>"),
        (rf"stages\.([234])\.0\.(expand|dw|reduce)\.{_CONV_BN}", r"\g<0>"),
        (rf"{_BLOCK}\.local_rep\.0\.{_CONV_BN}", r"stages.\1.1.conv_kxk.\2"),
        (rf"{_BLOCK}\.local_rep\.1\.conv\.weight", r"stages.\1.1.conv_1x1.weight"),
        (rf"{_BLOCK}\.global_rep\.(\d+)\.pre_norm_attn\.0\.(weight|bias)",
         r"stages.\1.1.transformer.\2.norm1.\3"),
        (rf"{_BLOCK}\.global_rep\.(\d+)\.pre_norm_attn\.1\.(qkv_proj|out_proj)\.conv\.(weight|bias)",
         r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (rf"{_BLOCK}\.global_rep\.(\d+)\.pre_norm_ffn\.0\.(weight|bias)",
         r"stages.\1.1.transformer.\2.norm2.\3"),
        (rf"{_BLOCK}\.global_rep\.(\d+)\.pre_norm_ffn\.1\.conv\.(weight|bias)",
         r"stages.\1.1.transformer.\2.mlp.fc1.\3"),
        (rf"{_BLOCK}\.global_rep\.(\d+)\.pre_norm_ffn\.3\.conv\.(weight|bias)",
         r"stages.\1.1.transformer.\2.mlp.fc2.\3"),
        # the GroupNorm closing global_rep (index = number of layers)
        (rf"{_BLOCK}\.global_rep\.\d+\.(weight|bias)", r"stages.\1.1.norm.\2"),
        (rf"{_BLOCK}\.conv_proj\.{_CONV_BN}", r"stages.\1.1.conv_proj.\2"),
        (r"classifier\.1\.(weight|bias)", r"classifier.\1"),
        (rf"aspp\.convs\.([0-3])\.{_CONV_BN}", r"\g<0>"),
        (rf"aspp\.convs\.4\.aspp_pool\.conv_1x1\.{_CONV_BN}", r"aspp.pool.\1"),
        (rf"aspp\.project\.{_CONV_BN}", r"\g<0>"),
        (r"classifier\.conv\.(weight|bias)", r"classifier.\1"),
    ],
)


def _with_backbone_prefix(rules: KeyRules):
    """Segmentation checkpoints: the backbone's keys go under ``backbone.``."""

    def convert(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = rules(state_dict)
        if not any(k.startswith("aspp.") for k in out):
            return out
        head = ("aspp.", "classifier.")
        return {k if k.startswith(head) else f"backbone.{k}": v for k, v in out.items()}

    return convert


def _has(keys: Collection[str], *fragments: str) -> bool:
    return all(any(f in k for k in keys) for f in fragments)


def build_from_state_dict(sd: Mapping[str, Tensor], **kwargs) -> nn.Module:
    """Our MobileViTv2 (classifier, or DeepLabV3 when ``aspp.*`` keys exist) for converted keys.

    Width, classes and ASPP channels come from the weights; ``kwargs`` override or add the rest.
    """
    seg = any(k.startswith("aspp.") for k in sd)
    width_key = ("backbone." if seg else "") + "stages.4.0.reduce.conv.weight"
    if width_key not in sd:
        raise CheckpointError(f"cannot infer the MobileViTv2 width: {width_key} is missing")
    width = sd[width_key].shape[0] / 512  # the last stage has 512·α channels
    if seg:
        for key in ("classifier.weight", "aspp.project.conv.weight"):
            if key not in sd:
                raise CheckpointError(f"cannot infer the DeepLabV3 head: {key} is missing")
        kwargs.setdefault("num_classes", sd["classifier.weight"].shape[0])
        kwargs.setdefault("aspp_channels", sd["aspp.project.conv.weight"].shape[0])
        return MobileViTv2DeepLabV3(width, **kwargs)
    kwargs.setdefault("num_classes", sd["classifier.weight"].shape[0] if "classifier.weight" in sd
                      else 0)
    return MobileViTv2(width, **kwargs)


# transformers fixes these; our model builds only the released architecture.
_HF_FIXED = {"num_channels": 3, "expand_ratio": 2.0, "conv_kernel_size": 3, "ffn_multiplier": 2,
             "n_attn_blocks": (2, 4, 3), "base_attn_unit_dims": (128, 192, 256),
             "layer_norm_eps": 1e-5}


def _from_hf(hf_model: nn.Module, *, fused: bool = True, backend: str = "auto") -> nn.Module:
    cfg = hf_model.config
    bad = {k: getattr(cfg, k) for k, v in _HF_FIXED.items()
           if (tuple(getattr(cfg, k)) if isinstance(v, tuple) else getattr(cfg, k)) != v}
    if cfg.hidden_act not in ("swish", "silu"):
        bad["hidden_act"] = cfg.hidden_act
    if bad:
        raise ValueError(f"from_transformers supports the released MobileViTV2 architecture "
                         f"({_HF_FIXED}, hidden_act='swish'); this config differs: {bad}")
    # transformers dilates L4 and L5 for output_stride 8, L5 for 16, and nothing for any other
    # value: the backbone then has the classifier's stride, 32.
    output_stride = cfg.output_stride if cfg.output_stride in (8, 16) else 32
    common = dict(fused=fused, backend=backend, odd_size="floor", dilate_block_conv=False,
                  patch_size=cfg.patch_size, attn_dropout=cfg.attn_dropout,
                  ffn_dropout=cfg.ffn_dropout)
    if type(hf_model).__name__ == "MobileViTV2ForSemanticSegmentation":
        model = MobileViTv2DeepLabV3(
            cfg.width_multiplier, cfg.num_labels, output_stride,
            aspp_channels=cfg.aspp_out_channels, atrous_rates=tuple(cfg.atrous_rates),
            aspp_dropout=cfg.aspp_dropout_prob, classifier_dropout=cfg.classifier_dropout_prob,
            **common)
    else:
        model = MobileViTv2(cfg.width_multiplier, cfg.num_labels, output_stride=output_stride,
                            **common)
    sd = convert_state_dict(hf_model.state_dict(), "transformers", family=FAMILY, model=model)
    model.load_state_dict(sd)
    return model


register_converter(FAMILY, "transformers", _with_backbone_prefix(TRANSFORMERS_RULES),
                   detect=lambda keys: _has(keys, "attention.qkv_proj.convolution."),
                   model_defaults={"odd_size": "floor", "dilate_block_conv": False})
register_converter(FAMILY, "timm", TIMM_RULES,
                   detect=lambda keys: _has(keys, "attn.qkv_proj.", "conv1_1x1."))
register_converter(FAMILY, "cvnets", _with_backbone_prefix(CVNETS_RULES),
                   detect=lambda keys: _has(keys, "pre_norm_attn.1.qkv_proj."))
register_converter(FAMILY, "mvit2", dict,
                   detect=lambda keys: _has(keys, "attn.qkv_proj.", ".expand.conv."))
register_builder(FAMILY, build_from_state_dict)
for _name in ("MobileViTV2ForImageClassification", "MobileViTV2ForSemanticSegmentation"):
    register_transformers_class(_name, _from_hf)
