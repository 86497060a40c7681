"""Original single files ↔ the diffusers layout: key maps, architecture inference and detection.

Depends on specs and checkpoint only; the models' ``from_single_file`` hooks call into it.
"""

from stable_cascade.convert.detect import (
    BUNDLE_PARTS,
    Identity,
    Kind,
    Size,
    expect_kind,
    identify,
    split_bundle,
)
from stable_cascade.convert.infer import (
    ORIGINAL_STAGE_A_SCALE,
    ShapeLike,
    infer_unet_config,
    infer_vq_config,
    released_unet_config,
    shapes_of,
)
from stable_cascade.convert.keys import (
    unet_diffusers_to_original,
    unet_original_to_diffusers,
    vq_diffusers_to_original,
    vq_original_to_diffusers,
)
from stable_cascade.convert.single_file import (
    to_original_state_dict,
    unet_config_from_single_file,
    unet_state_dict_from_single_file,
    vq_config_from_single_file,
    vq_state_dict_from_single_file,
)

__all__ = [
    "BUNDLE_PARTS",
    "ORIGINAL_STAGE_A_SCALE",
    "Identity",
    "Kind",
    "ShapeLike",
    "Size",
    "expect_kind",
    "identify",
    "infer_unet_config",
    "infer_vq_config",
    "released_unet_config",
    "shapes_of",
    "split_bundle",
    "to_original_state_dict",
    "unet_config_from_single_file",
    "unet_diffusers_to_original",
    "unet_original_to_diffusers",
    "unet_state_dict_from_single_file",
    "vq_config_from_single_file",
    "vq_diffusers_to_original",
    "vq_original_to_diffusers",
    "vq_state_dict_from_single_file",
]
