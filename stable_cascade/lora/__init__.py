"""LoRA for Stable Cascade: low-rank adapters on Stage C (and its CLIP text encoder) or Stage B, our
safetensors format, and the community formats (kohya / OneTrainer, Stability's trainer).

Training: :func:`add_lora` then :func:`save_lora`. Inference: :func:`load_lora_file`, :func:`resolve`
and :func:`load_lora_into`, or the pipelines' ``load_lora_weights``.
"""

from stable_cascade.lora.formats import (
    FORMAT_TAG,
    STAGES,
    LoRAFormat,
    LoRAFormatError,
    LoRALayer,
    LoRAWeights,
    load_lora_file,
    metadata_stage,
    parse_lora,
    read_lora_metadata,
    save_lora,
)
from stable_cascade.lora.layers import (
    DEFAULT_TEXT_TARGETS,
    DEFAULT_UNET_TARGETS,
    LoRAAdapter,
    LoRALinear,
    adapter_names,
    add_lora,
    fuse,
    lora_state_dict,
    remove,
    set_scale,
    unfuse,
)
from stable_cascade.lora.resolve import load_lora_into, resolve

__all__ = [
    "DEFAULT_TEXT_TARGETS",
    "DEFAULT_UNET_TARGETS",
    "FORMAT_TAG",
    "STAGES",
    "LoRAAdapter",
    "LoRAFormat",
    "LoRAFormatError",
    "LoRALayer",
    "LoRALinear",
    "LoRAWeights",
    "adapter_names",
    "add_lora",
    "fuse",
    "load_lora_file",
    "load_lora_into",
    "lora_state_dict",
    "metadata_stage",
    "parse_lora",
    "read_lora_metadata",
    "remove",
    "resolve",
    "save_lora",
    "set_scale",
    "unfuse",
]
