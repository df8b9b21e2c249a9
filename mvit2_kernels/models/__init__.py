"""Models with the fused attention, checkpoint conversion and preprocessing.

``mobilevitv2(width)`` / ``mobilevitv2_deeplabv3(width)`` build MobileViTv2 classifiers and
segmenters; ``load_pretrained`` / ``convert_state_dict`` read transformers, timm and ml-cvnets
checkpoints; ``swiftformer_xs/s/l1/l3`` build SwiftFormer; ``from_transformers`` converts a
transformers model; ``fuse_`` upgrades one in place.
"""

from . import mobilevitv2_checkpoints as _mobilevitv2_checkpoints  # noqa: F401  (registers)
from . import swiftformer_checkpoints as _swiftformer_checkpoints  # noqa: F401  (registers)
from .convert import (
    CheckpointError,
    KeyRules,
    convert_state_dict,
    from_transformers,
    load_pretrained,
    read_checkpoint,
    register_builder,
    register_converter,
    register_transformers_class,
)
from .deeplabv3 import MobileViTv2DeepLabV3, mobilevitv2_deeplabv3
from .fuse import fuse_, register_swapper
from .mobilevitv2 import MobileViTv2, mobilevitv2
from .preprocess import preprocess
from .swiftformer import SwiftFormer, swiftformer_l1, swiftformer_l3, swiftformer_s, swiftformer_xs

__all__ = [
    "CheckpointError",
    "KeyRules",
    "MobileViTv2",
    "MobileViTv2DeepLabV3",
    "SwiftFormer",
    "convert_state_dict",
    "from_transformers",
    "fuse_",
    "load_pretrained",
    "mobilevitv2",
    "mobilevitv2_deeplabv3",
    "preprocess",
    "read_checkpoint",
    "register_builder",
    "register_converter",
    "register_swapper",
    "register_transformers_class",
    "swiftformer_l1",
    "swiftformer_l3",
    "swiftformer_s",
    "swiftformer_xs",
]
