"""LoRA methods of the pipelines, named as diffusers' ``StableDiffusionLoraLoaderMixin``'s.

A pipeline names its UNet and CLIP text encoder in ``lora_components`` (the prior pipeline:
``prior`` and ``text_encoder``; the combined one: ``prior_prior`` and ``prior_text_encoder``, the
models of its ``prior_pipe``). Adapters live on the models (see :mod:`stable_cascade.lora.layers`), so
pipelines sharing a model share its adapters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from torch import nn

from stable_cascade.lora import (
    LoRAWeights,
    adapter_names,
    fuse,
    load_lora_file,
    load_lora_into,
    remove,
    resolve,
    set_scale,
    unfuse,
)
from stable_cascade.lora.formats import LoRAFormatError, Part
from stable_cascade.lora.layers import check_scale
from stable_cascade.nn.unet import StableCascadeUNet


class LoraLoaderMixin:
    """``load_lora_weights``, ``set_lora_scale``, ``fuse_lora``, ``unfuse_lora``, ``unload_lora_weights``."""

    #: The attributes holding the UNet and the CLIP text encoder that LoRAs adapt.
    lora_components: ClassVar[tuple[str, str]] = ("prior", "text_encoder")

    def _lora_models(self) -> dict[Part, nn.Module]:
        unet, text_encoder = (getattr(self, name, None) for name in self.lora_components)
        models: dict[Part, nn.Module] = {}
        if isinstance(unet, nn.Module):
            models["unet"] = unet
        if isinstance(text_encoder, nn.Module):
            models["text_encoder"] = text_encoder
        return models

    def load_lora_weights(
        self, path_or_weights: str | Path | LoRAWeights, adapter_name: str | None = None, scale: float = 1.0
    ) -> str:
        """Attach a LoRA (a file in any supported format, or :class:`LoRAWeights`) as an adapter run at
        ``scale``; returns its name (``adapter_name``, else one made from the file name).

        Every layer of the file must fit the pipeline's models; otherwise nothing is attached and a
        ``ValueError`` names the file, the layers at fault and what was expected.
        """
        weights = path_or_weights
        if not isinstance(weights, LoRAWeights):
            weights = load_lora_file(weights)
        if not (weights.unet or weights.text_encoder):
            raise LoRAFormatError(f"{weights.source} holds no LoRA layers; use a LoRA file that has some")
        check_scale(scale)
        models = self._lora_models()
        taken = self.get_active_adapters()
        name = adapter_name if adapter_name is not None else _free_name(weights.stem, taken)
        if name in taken:
            raise ValueError(f"an adapter named {name!r} is already loaded; pass another adapter_name")
        if weights.text_encoder and "text_encoder" not in models:
            raise ValueError(f"{weights.source} adapts the text encoder, which this pipeline lacks")
        _check_stage(weights, models.get("unet"))
        resolved = {part: resolve(weights, part, model) for part, model in models.items()}
        for part, layers in resolved.items():
            if layers:
                load_lora_into(models[part], layers, name, scale)
        return name

    def get_active_adapters(self) -> list[str]:
        """The names of the loaded adapters, in loading order."""
        names: dict[str, None] = {}
        for model in self._lora_models().values():
            names.update(dict.fromkeys(adapter_names(model)))
        return list(names)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Component name → the adapters on it."""
        attributes = dict(zip(("unet", "text_encoder"), self.lora_components, strict=True))
        return {attributes[part]: adapter_names(model) for part, model in self._lora_models().items()}

    def set_lora_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """The runtime scale of one adapter (of all with ``None``); 0 turns it off exactly."""
        names = self._known([adapter_name]) if adapter_name is not None else None
        for model in self._lora_models().values():
            set_scale(model, scale, names)

    def fuse_lora(self, scale: float | None = None, adapter_names: Sequence[str] | None = None) -> None:
        """Merge adapters into the weights (``W += scale · alpha / rank · up @ down``), so that steps cost
        what they cost without LoRA; ``scale``: instead of each adapter's own. :meth:`unfuse_lora` undoes
        it exactly (the original weights are kept on the CPU meanwhile)."""
        names = self._known(adapter_names) if adapter_names is not None else None
        for model in self._lora_models().values():
            fuse(model, scale, names)

    def unfuse_lora(self) -> None:
        """Restore the weights from before :meth:`fuse_lora`; the adapters run at runtime again."""
        for model in self._lora_models().values():
            unfuse(model)

    def unload_lora_weights(self) -> None:
        """Remove every adapter. Fused ones leave their deltas in the weights (as in diffusers: fuse,
        unload, save is how a merged model is made); call :meth:`unfuse_lora` first to restore them."""
        for model in self._lora_models().values():
            remove(model)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove the named adapters (unfused ones, or all the fused ones together)."""
        names = self._known([adapter_names] if isinstance(adapter_names, str) else adapter_names)
        for model in self._lora_models().values():
            remove(model, names)

    def _known(self, names: Sequence[str]) -> list[str]:
        loaded = self.get_active_adapters()
        unknown = [n for n in names if n not in loaded]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; loaded: {loaded or 'none'}")
        return list(names)


def _check_stage(weights: LoRAWeights, unet: nn.Module | None) -> None:
    """A LoRA whose metadata names a stage goes into that stage's pipeline only."""
    if not isinstance(unet, StableCascadeUNet) or "stage" not in weights.metadata:
        return
    stage = weights.stage
    if (stage == "decoder") != unet.config.is_stage_b:
        names = {"prior": "Stage C (prior)", "decoder": "Stage B (decoder)"}
        other = "decoder" if stage == "decoder" else "prior"
        raise ValueError(
            f"{weights.source} is a {names[stage]} LoRA, this pipeline's UNet is "
            f"{names['decoder' if unet.config.is_stage_b else 'prior']}; load it into the {other} pipeline "
            f"(a combined pipeline's {other}_pipe)"
        )


def _free_name(stem: str, taken: Sequence[str]) -> str:
    """``stem`` as an adapter name (no dots), numbered if taken: ``style``, ``style_2``, …"""
    base = re.sub(r"[^0-9A-Za-z_-]", "_", stem) or "lora"
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}_{number}"
    return name
