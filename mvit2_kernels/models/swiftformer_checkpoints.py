"""SwiftFormer checkpoints of the original code, timm and transformers in our key names, and
``from_transformers`` / ``fuse_`` support for SwiftFormer models.

Our layout (``SwiftFormer``)::

    stem.{0,1,3,4}                                    conv-BN-ReLU, twice
    stages.{1,2,3}.downsample.{proj,norm}             3×3 s2 conv-BN between stages
    stages.{i}.blocks.{j}.{dwconv,norm,pwconv1,pwconv2,layer_scale}              ConvEncoder
    stages.{i}.blocks.{last}.local_representation.*   (as a ConvEncoder)
    stages.{i}.blocks.{last}.attn.{to_query,to_key,w_g,proj,final}
    stages.{i}.blocks.{last}.{linear.{norm1,fc1,fc2},layer_scale_1,layer_scale_2}
    norm, head, head_dist

The correspondences follow the sources' module trees: the original ``models/swiftformer.py``
(``network`` alternates stages and downsamplings, ``Proj``, ``dist_head``), timm's
``swiftformer.py`` (its ``checkpoint_filter_fn`` maps the original to timm; ``LayerScale2d``
holds ``gamma``) and transformers' ``modeling_swiftformer.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..nn import EfficientAdditiveAttention
from .convert import (
    CheckpointError,
    KeyRules,
    convert_state_dict,
    register_builder,
    register_converter,
    register_transformers_class,
)
from .fuse import register_swapper
from .swiftformer import SwiftFormer

FAMILY = "swiftformer"
_CONV_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = r"stages\.[0-3]\.blocks\.\d+"

# Our key patterns, which every source reaches after its renames.
_STRUCTURE = [
    (rf"stem\.[0134]\.{_CONV_BN}", r"\g<0>"),
    (rf"stages\.[1-3]\.downsample\.(proj|norm)\.{_CONV_BN}", r"\g<0>"),
    (rf"{_BLOCK}(\.local_representation)?\.(dwconv|norm|pwconv1|pwconv2)\.{_CONV_BN}", r"\g<0>"),
    (rf"{_BLOCK}(\.local_representation)?\.layer_scale", r"\g<0>"),
    (rf"{_BLOCK}\.attn\.(to_query|to_key|proj|final)\.(weight|bias)", r"\g<0>"),
    (rf"{_BLOCK}\.attn\.w_g", r"\g<0>"),
    (rf"{_BLOCK}\.linear\.(norm1|fc1|fc2)\.{_CONV_BN}", r"\g<0>"),
    (rf"{_BLOCK}\.layer_scale_[12]", r"\g<0>"),
    (rf"norm\.{_CONV_BN}", r"\g<0>"),
    (r"(head|head_dist)\.(weight|bias)", r"\g<0>"),
]


def _network_renames(prefix: str, blocks: str) -> list[tuple[str, str]]:
    """``network`` alternates stage i (index 2i) and the downsampling into stage i + 1 (2i + 1)."""
    return [(rf"^{prefix}network\.{2 * i}\.{blocks}", f"stages.{i}.blocks.") for i in range(4)] + [
        (rf"^{prefix}network\.{2 * i + 1}\.", f"stages.{i + 1}.downsample.") for i in range(3)
    ]


ORIGINAL_RULES = KeyRules(
    renames=[
        (r"^patch_embed\.", "stem."),
        (r"^dist_head\.", "head_dist."),
        (r"\.attn\.Proj\.", ".attn.proj."),
        *_network_renames("", ""),
    ],
    structure=_STRUCTURE,
)

TIMM_RULES = KeyRules(renames=[(r"\.(layer_scale(_[12])?)\.gamma$", r".\1")], structure=_STRUCTURE)

TRANSFORMERS_RULES = KeyRules(
    renames=[
        (r"^swiftformer\.patch_embed\.patch_embedding\.", "stem."),
        *_network_renames(r"swiftformer\.encoder\.", r"blocks\."),
        (r"\.depth_wise_conv\.", ".dwconv."),
        (r"\.point_wise_conv([12])\.", r".pwconv\1."),
        (r"^dist_head\.", "head_dist."),
    ],
    structure=_STRUCTURE,
)


def _detect(*fragments: str):
    """A detector: every fragment occurs in some key."""
    return lambda keys: all(any(f in k for k in keys) for f in fragments)


def build_from_state_dict(sd: Mapping[str, Tensor], **kwargs) -> nn.Module:
    """Our SwiftFormer for converted keys: depths, dims, MLP ratio and classes from the weights;
    ``variant`` (which weights cannot tell) from ``kwargs`` or the source's default."""
    if "variant" not in kwargs:
        raise CheckpointError(
            "the attention variant is not in the weights: pass "
            "variant='normalize' (current SwiftFormer, timm) or 'softmax' "
            "(original release, transformers)"
        )
    depths = [
        1
        + max((int(k.split(".")[3]) for k in sd if k.startswith(f"stages.{i}.blocks.")), default=-1)
        for i in range(4)
    ]
    if 0 in depths:
        raise CheckpointError(f"cannot infer the SwiftFormer stages: blocks per stage {depths}")
    last = [f"stages.{i}.blocks.{d - 1}" for i, d in enumerate(depths)]
    dims = [sd[f"{b}.attn.w_g"].shape[0] for b in last]
    hidden = sd[f"{last[0]}.linear.fc1.weight"].shape[0]
    kwargs.setdefault("mlp_ratio", hidden / dims[0])
    kwargs.setdefault("num_classes", sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    return SwiftFormer(depths, dims, **kwargs)


# transformers fixes these in SwiftFormer; the released models all use them.
_HF_FIXED = {
    "num_channels": 3,
    "hidden_act": "gelu",
    "down_patch_size": 3,
    "down_stride": 2,
    "down_pad": 1,
    "use_layer_scale": True,
    "drop_conv_encoder_rate": 0.0,
}


def _from_hf(hf_model: nn.Module, *, fused: bool = True, backend: str = "auto") -> nn.Module:
    cfg = hf_model.config
    bad = {k: getattr(cfg, k) for k, v in _HF_FIXED.items() if getattr(cfg, k) != v}
    dims = list(cfg.embed_dims)
    if len(cfg.depths) != 4 or not all(
        cfg.downsamples[i] or dims[i] != dims[i + 1] for i in range(3)
    ):
        bad.update(depths=cfg.depths, downsamples=cfg.downsamples)
    if bad:
        raise ValueError(
            f"from_transformers supports the released SwiftFormer architecture "
            f"({_HF_FIXED}, four stages, downsampling between them); this config "
            f"differs: {bad}"
        )
    model = SwiftFormer(
        cfg.depths,
        cfg.embed_dims,
        cfg.num_labels,
        variant="softmax",
        mlp_ratio=cfg.mlp_ratio,
        drop_rate=cfg.drop_mlp_rate,
        drop_path_rate=cfg.drop_path_rate,
        layer_scale_init=cfg.layer_scale_init_value,
        bn_eps=cfg.batch_norm_eps,
        fused=fused,
        backend=backend,
    )
    model.load_state_dict(
        convert_state_dict(hf_model.state_dict(), "transformers", family=FAMILY, model=model)
    )
    return model


class SpatialAdditiveAttention(EfficientAdditiveAttention):
    """timm's interface: ``Tensor[B, C, H, W]`` in and out, attention over the H·W tokens."""

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        out = super().forward(x.flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(B, C, H, W)


def _swapper(cls: type[EfficientAdditiveAttention], variant: str, proj: str):
    """A ``fuse_`` swapper: our module holding the source module's own projections and w_g."""

    def swap(module: nn.Module, fused: bool, backend: str) -> nn.Module:
        if isinstance(module, EfficientAdditiveAttention):
            return module  # already ours (timm's class shares our class name)
        new = cls(module.w_g.shape[0], variant=variant, fused=fused, backend=backend)
        new.to_query, new.to_key, new.final = module.to_query, module.to_key, module.final
        new.proj, new.w_g = getattr(module, proj), module.w_g
        return new.train(module.training)

    return swap


register_converter(
    FAMILY,
    "swiftformer",
    ORIGINAL_RULES,
    detect=_detect("attn.Proj.", "network."),
    model_defaults={"variant": "normalize"},
)
register_converter(
    FAMILY,
    "timm",
    TIMM_RULES,
    detect=_detect("attn.w_g", "layer_scale.gamma"),
    model_defaults={"variant": "normalize"},
)
register_converter(
    FAMILY,
    "transformers",
    TRANSFORMERS_RULES,
    detect=_detect("attn.w_g", "swiftformer.encoder.network."),
    model_defaults={"variant": "softmax"},
)
register_converter(
    FAMILY, "mvit2", dict, detect=_detect("attn.w_g", ".local_representation.dwconv.")
)
register_builder(FAMILY, build_from_state_dict)
register_transformers_class("SwiftFormerForImageClassification", _from_hf)
register_swapper(
    "SwiftFormerEfficientAdditiveAttention",  # transformers
    _swapper(EfficientAdditiveAttention, "softmax", "proj"),
)
register_swapper(
    "EfficientAdditiveAttnetion",  # the original code (sic)
    _swapper(EfficientAdditiveAttention, "normalize", "Proj"),
)
register_swapper(
    "EfficientAdditiveAttention", _swapper(SpatialAdditiveAttention, "normalize", "proj")
)  # timm
