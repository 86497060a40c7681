"""The ``lora`` task: Stage C's objective (``stage-c``) training low-rank adapters only.

Adapters (:func:`stable_cascade.lora.add_lora`, rank ``lora_rank``, ``alpha`` default = rank) go on the
Stage C attention projections and CLIP-token mappers, and with ``lora_text_encoder`` on the text
encoder's attention projections; the base weights stay frozen. The export is one LoRA file,
``<output_dir>/final/lora.safetensors`` (:func:`stable_cascade.lora.save_lora`; the EMA weights when
the EMA is on), loadable with the pipelines' ``load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from stable_cascade.lora import DEFAULT_TEXT_TARGETS, DEFAULT_UNET_TARGETS, add_lora, save_lora
from stable_cascade.training.state import assign_tensors
from stable_cascade.training.tasks import StageC

LORA_FILE = "lora.safetensors"


class LoRAStageC(StageC):
    name = "lora"

    def _make_trainable(self) -> bool:
        config, generator = self.config, torch.Generator().manual_seed(self.config.seed)
        rank, alpha = config.lora_rank, config.lora_alpha
        add_lora(self.unet, rank, alpha, targets=DEFAULT_UNET_TARGETS, generator=generator)
        if config.lora_text_encoder:
            add_lora(self.text_encoder, rank, alpha, targets=DEFAULT_TEXT_TARGETS, generator=generator)
        return config.lora_text_encoder

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        assign_tensors(self.trainee, state, "the final LoRA weights")
        metadata = {"task": "stage-c lora", "steps": str(self.config.steps)}
        text_encoder = self.text_encoder if self.trained_text else None
        save_lora(directory / LORA_FILE, unet=self.unet, text_encoder=text_encoder, metadata=metadata)
