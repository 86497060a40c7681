"""The parts of ``diffusers.DiffusionPipeline``'s interface that the pipelines share beyond loading.

Guidance state read and changed by ``callback_on_step_end`` (``guidance_scale``,
``do_classifier_free_guidance``, ``num_timesteps`` and the settable ``_guidance_scale``), the
attention switches (documented no-ops: every attention block already runs PyTorch's
``scaled_dot_product_attention``, which picks a flash or memory-efficient kernel by itself),
````numpy_to_pil`` and ``name_or_path``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from stable_cascade.sampling.noise_model import LoopControl

logger = logging.getLogger(__name__)


DTypes = torch.dtype | str | Mapping[str, torch.dtype | str] | None


def component_dtype(dtypes: DTypes, name: str) -> torch.dtype | str | None:
    """The dtype for component ``name``: one for all, or diffusers' dict (``name`` else ``"default"``)."""
    if isinstance(dtypes, Mapping):
        return dtypes.get(name, dtypes.get("default"))
    return dtypes


def has_variant(path_or_repo_id: str | Path, variant: str) -> bool:
    """Whether a local pipeline folder has any weights of ``variant`` (``*.fp16.safetensors``, its
    shards or index); True for a Hub repo, whose components report a missing variant themselves."""
    root = Path(path_or_repo_id)
    if not root.is_dir():
        return True
    pattern = re.compile(rf"\.{re.escape(variant)}(\.|-\d)")
    return any(pattern.search(p.name) for p in root.glob("*/*") if p.is_file())


class DiffusersPipelineMixin:
    """diffusers' pipeline attributes and switches; the state lives in :class:`LoopControl`."""

    _loop: LoopControl
    _name_or_path: str | None = None

    @property
    def guidance_scale(self) -> float:
        """The classifier-free guidance scale of the current (or last) call."""
        return self._loop.guidance_scale

    @property
    def _guidance_scale(self) -> float:
        return self._loop.guidance_scale

    @_guidance_scale.setter
    def _guidance_scale(self, value: float) -> None:
        """Set from ``callback_on_step_end``: the next steps use ``value`` (≤ 1: conditional only)."""
        self._loop.guidance_scale = float(value)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """As diffusers: guidance runs when the scale is above 1."""
        return self._loop.guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the current (or last) call (image-to-image: those actually run)."""
        return self._loop.num_timesteps

    @property
    def name_or_path(self) -> str | None:
        """The folder or Hub repo id ``from_pretrained`` loaded (None for a pipeline built in code)."""
        return self._name_or_path

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Accepted for diffusers compatibility; changes nothing (see the module docstring)."""
        logger.info(
            "enable_attention_slicing(%r) changes nothing: attention runs PyTorch's "
            "scaled_dot_product_attention, whose memory-efficient kernels need no slicing",
            slice_size,
        )

    def disable_attention_slicing(self) -> None:
        """Accepted for diffusers compatibility; changes nothing."""
        logger.info("disable_attention_slicing() changes nothing: attention is never sliced")

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Accepted for diffusers compatibility; changes nothing (xformers is not used)."""
        logger.info(
            "enable_xformers_memory_efficient_attention() changes nothing: PyTorch's "
            "scaled_dot_product_attention already selects flash / memory-efficient kernels"
        )

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Accepted for diffusers compatibility; changes nothing."""
        logger.info("disable_xformers_memory_efficient_attention() changes nothing: xformers is not used")

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        """(N, H, W, C) or (H, W, C) floats in [0, 1] → PIL images (C = 1: greyscale), as diffusers."""
        if images.ndim == 3:
            images = images[None, ...]
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"numpy_to_pil takes (N, H, W, C) or (H, W, C) images with C in 1, 3, 4; got {images.shape}"
            )
        pixels = (images * 255).round().astype("uint8")
        if pixels.shape[-1] == 1:
            pixels = pixels[..., 0]  # (N, H, W): mode "L"
        return [PIL.Image.fromarray(image) for image in pixels]
