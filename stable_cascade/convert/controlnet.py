"""ControlNet files: the architecture of an original Stage C ControlNet from its keys and shapes.

The released files (``controlnet/{canny,inpainting,super_resolution}.safetensors``) store the
original ``ControlNet`` module's state dict, whose keys are ours too (no key map). The projection
targets (``proj_blocks``) are not in the weights; the released ``[0, 4, 8, 12, 51, 55, 59, 63]`` is
assumed unless the caller says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert.infer import ShapeLike, Shapes, shapes_of
from stable_cascade.specs.controlnet import RELEASED_PROJ_BLOCKS, ControlNetConfig, ControlType

_PROJECTION = re.compile(r"^projections\.(\d+)\.0\.weight$")
_LARGE_BLOCK = re.compile(r"^backbone\.(\d+)\.blocks\.0\.weight$")
_EFFNET_BLOCK = re.compile(r"^backbone\.([1-6])\.(\d+)\.")
#: What each released kind of ControlNet was trained on, by (backbone, input channels).
_CONTROL_TYPES: dict[tuple[str, int], ControlType] = {
    ("effnet", 1): "canny",
    ("effnet", 4): "inpainting",
    ("large", 16): "super_resolution",
}


def is_controlnet(state_dict: Mapping[str, ShapeLike]) -> bool:
    """Whether the keys are those of an original Stage C ControlNet."""
    return "projections.0.0.weight" in state_dict and any(k.startswith("backbone.") for k in state_dict)


def _get(shapes: Shapes, key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source} is not a ControlNet file this library knows: {key} is missing")
    return shapes[key]


def _effnet_fields(shapes: Shapes, source: str) -> dict[str, object]:
    stem = _get(shapes, "backbone.0.0.weight", source)  # (c_stem, c_in, 3, 3)
    depths = [0] * 6
    for key in shapes:
        if match := _EFFNET_BLOCK.match(key):
            stage, block = int(match[1]) - 1, int(match[2])
            depths[stage] = max(depths[stage], block + 1)
    # The last conv of every block sets the stage width: ``block.{last}.0`` (Fused expand 1: ``block.0.0``).
    channels = []
    for stage, depth in enumerate(depths):
        prefix = f"backbone.{stage + 1}.{depth - 1}.block."
        convs = sorted(k for k in shapes if k.startswith(prefix) and k.endswith(".0.weight"))
        if not convs:
            raise CheckpointError(f"{source}: EfficientNet stage {stage + 1} has no blocks")
        channels.append(shapes[convs[-1]][0])
    head = _get(shapes, "backbone.7.0.weight", source)  # (head, c_last, 1, 1)
    return {
        "backbone": "effnet",
        "in_channels": stem[1],
        "embedding_channels": head[0],
        "effnet_stage_channels": tuple(channels),
        "effnet_stage_depths": tuple(depths),
    }


def _large_fields(shapes: Shapes, source: str) -> dict[str, object]:
    first = _get(shapes, "backbone.0.weight", source)  # (hidden, c_in, 1, 1)
    second = _get(shapes, "backbone.2.weight", source)  # (channels, hidden, 1, 1)
    blocks = sorted(int(m[1]) for k in shapes if (m := _LARGE_BLOCK.match(k)))
    last = _get(shapes, f"backbone.{3 + len(blocks)}.weight", source)  # (embedding, channels, 1, 1)
    return {
        "backbone": "large",
        "in_channels": first[1],
        "large_hidden_channels": first[0],
        "large_channels": second[0],
        "large_blocks": len(blocks),
        "embedding_channels": last[0],
    }


def controlnet_config_from_state_dict(
    state_dict: Mapping[str, ShapeLike], source: str = "state dict", proj_blocks: Sequence[int] | None = None
) -> ControlNetConfig:
    """The :class:`ControlNetConfig` of an original ControlNet state dict (tensors or shapes).

    ``proj_blocks`` (one ResBlock call index per projection) defaults to the released targets; its
    length must match the file's number of projections.
    """
    shapes = shapes_of(state_dict)
    if not is_controlnet(shapes):
        raise CheckpointError(
            f"{source} is not a Stage C ControlNet (expected backbone.* and projections.* tensors); "
            "for Stage B/C UNets, Stage A or the EfficientNet encoder use their own classes"
        )
    if "backbone.0.0.weight" in shapes:
        fields = _effnet_fields(shapes, source)
    elif "backbone.2.weight" in shapes and "backbone.3.blocks.0.weight" in shapes:
        fields = _large_fields(shapes, source)
    else:
        first = _get(shapes, "backbone.0.weight", source)  # (4c, c, 3, 3)
        fields = {"backbone": "simple", "in_channels": first[1], "embedding_channels": first[1]}
    count = 1 + max(int(m[1]) for k in shapes if (m := _PROJECTION.match(k)))
    out_channels = shapes["projections.0.2.weight"][0]
    targets = tuple(proj_blocks) if proj_blocks is not None else RELEASED_PROJ_BLOCKS[:count]
    if len(targets) != count:
        raise ValueError(
            f"{source} has {count} projections but proj_blocks lists {len(targets)} targets "
            f"({list(targets)}); give one ResBlock call index per projection"
        )
    if proj_blocks is None and count > len(RELEASED_PROJ_BLOCKS):
        raise ValueError(f"{source} has {count} projections; pass proj_blocks (one index per projection)")
    control_type = _CONTROL_TYPES.get((str(fields["backbone"]), int(fields["in_channels"])))  # type: ignore[call-overload]
    return ControlNetConfig(
        **fields,  # type: ignore[arg-type]
        out_channels=out_channels,
        proj_blocks=targets,
        control_type=control_type,
    )
