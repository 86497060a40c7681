"""Checkpoint files: resolution (local or Hub), safetensors I/O and the pretrained-model mixins.

This layer knows no model architecture; models build on it.
"""

from stable_cascade.checkpoint.errors import CheckpointError
from stable_cascade.checkpoint.files import HubOptions, resolve_file, resolve_weights
from stable_cascade.checkpoint.jsonio import parse_json, read_json, read_json_object
from stable_cascade.checkpoint.pretrained import (
    PretrainedConfigMixin,
    PretrainedModel,
    check_state_dict,
    parse_dtype,
)
from stable_cascade.checkpoint.safetensors_io import read_state_dict, save_tensors_file, write_state_dict

__all__ = [
    "CheckpointError",
    "HubOptions",
    "PretrainedConfigMixin",
    "PretrainedModel",
    "check_state_dict",
    "parse_dtype",
    "parse_json",
    "read_json",
    "read_json_object",
    "read_state_dict",
    "resolve_file",
    "resolve_weights",
    "save_tensors_file",
    "write_state_dict",
]
