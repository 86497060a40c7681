"""A LoRA's layers matched to a model's ``nn.Linear`` layers, checked, and attached as adapters.

Named formats match by name with dots and underscores alike (kohya writes ``down_blocks_0_2_…``) and
with the names other layouts give the Stage C attention: ComfyUI's and kohya's
``attention.attn.to_{q,k,v}`` / ``attention.attn.out_proj`` are our ``attention.to_{q,k,v}`` /
``attention.to_out.0``. Stability's numbered ``weights.<i>`` follow the traversal of its
``modules/lora.py`` ``apply_lora`` with ``module_filters=['.attn']`` (the setting of all its LoRA
configs): ``named_modules`` meets each attention block's ``nn.MultiheadAttention`` (LoRA on the packed
``in_proj_weight``), then its ``out_proj`` (LoRA on ``weight``); the trainer then lists the ``LoRA``
modules in ``modules()`` order, where each module's ``parametrizations`` come after its other children,
so per block ``out_proj`` is ``2k`` and ``in_proj`` (rows q, k, v) is ``2k + 1``, blocks in layer order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import cast

from torch import nn

from stable_cascade.lora.formats import LoRAFormatError, LoRALayer, LoRAWeights, Part
from stable_cascade.lora.layers import LoRAAdapter, adapter_names, attach_adapter
from stable_cascade.nn.layers import AttnBlock
from stable_cascade.nn.unet import StableCascadeUNet

_ALIASES = (
    (re.compile(r"\.attention\.(to_[qkv])$"), r".attention.attn.\1"),
    (re.compile(r"\.attention\.to_out\.0$"), r".attention.attn.out_proj"),
)


def _flat(name: str) -> str:
    return name.replace(".", "_")


def describe(model: nn.Module) -> str:
    if isinstance(model, StableCascadeUNet):
        stage = "Stage B (decoder)" if model.config.is_stage_b else "Stage C (prior)"
        return f"{stage} with channels {list(model.config.block_out_channels)}"
    return type(model).__name__


def resolve(weights: LoRAWeights, part: Part, model: nn.Module) -> dict[str, LoRALayer]:
    """The ``part`` layers of ``weights`` keyed by the names of ``model``'s layers, shapes checked."""
    layers = weights.part(part)
    if not layers:
        return {}
    resolved = _by_order(weights, model) if weights.format == "stability" else _by_name(weights, part, model)
    wrong = []
    for name, layer in resolved.items():
        weight = cast(nn.Linear, model.get_submodule(name)).weight
        if tuple(weight.shape) != layer.shape:
            got, expected = f"{layer.shape[1]} -> {layer.shape[0]}", f"{weight.shape[1]} -> {weight.shape[0]}"
            wrong.append(f"{name}: LoRA {got}, model {expected}")
    if wrong:
        raise LoRAFormatError(
            f"{weights.source} does not fit this {describe(model)}: {len(wrong)} layer(s) have other sizes "
            f"({'; '.join(wrong[:3])}); it was made for another model (e.g. Stage C lite vs full, or Stage B)"
        )
    return resolved


def _by_name(weights: LoRAWeights, part: Part, model: nn.Module) -> dict[str, LoRALayer]:
    index: dict[str, str] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear):
            index[_flat(name)] = name
            for pattern, alias in _ALIASES:
                index[_flat(pattern.sub(alias, name))] = name
    resolved: dict[str, LoRALayer] = {}
    unknown, repeated = [], []
    for key, layer in weights.part(part).items():
        name = index.get(_flat(key))
        if name is None:
            unknown.append(key)
        elif name in resolved:
            repeated.append(key)
        resolved[name or key] = layer
    if unknown or repeated:
        example = next(iter(index.values()), "?")
        shown = {"stable-cascade": f"{part}.{example}", "kohya": f"{_kohya_prefix(part)}{_flat(example)}"}
        problem = (
            f"{len(unknown)} {part} layer(s) match no linear layer of this {describe(model)}: {unknown[:4]}"
            if unknown
            else f"layers {repeated[:4]} repeat others under another name"
        )
        raise LoRAFormatError(
            f"{weights.source}: {problem}; expected layer names like {shown.get(weights.format, example)} "
            "(is it a LoRA for another model?)"
        )
    return resolved


def _kohya_prefix(part: Part) -> str:
    return "lora_prior_unet_" if part == "unet" else "lora_prior_te_"


def _by_order(weights: LoRAWeights, model: nn.Module) -> dict[str, LoRALayer]:
    """Stability's ``weights.<i>``: per attention block, ``out_proj`` then the packed q/k/v ``in_proj``."""
    blocks = [name for name, module in model.named_modules() if isinstance(module, AttnBlock)]
    layers = weights.unet
    if len(layers) != 2 * len(blocks):
        raise LoRAFormatError(
            f"{weights.source} has {len(layers)} LoRA layers (weights.0 … weights.{len(layers) - 1}); "
            "Stability's trainer with module_filters ['.attn'] (its configs' setting) makes two per "
            f"attention block (out_proj, then the packed q/k/v in_proj): {2 * len(blocks)} for this "
            f"{describe(model)} with {len(blocks)} attention blocks. Other module_filters are not "
            "supported; a LoRA for another model does not fit"
        )
    resolved: dict[str, LoRALayer] = {}
    for k, block in enumerate(blocks):
        out_proj, in_proj = layers[f"weights.{2 * k}"], layers[f"weights.{2 * k + 1}"]
        if in_proj.up.shape[0] % 3 or in_proj.up.shape[0] != 3 * out_proj.up.shape[0]:
            raise LoRAFormatError(
                f"{weights.source}: weights.{2 * k + 1} should be the packed q/k/v in_proj of {block} "
                f"(lora_up of 3 × {out_proj.up.shape[0]} rows), got lora_up {tuple(in_proj.up.shape)}"
            )
        resolved[f"{block}.attention.to_out.0"] = out_proj
        for projection, up in zip(("to_q", "to_k", "to_v"), in_proj.up.chunk(3, dim=0), strict=True):
            resolved[f"{block}.attention.{projection}"] = LoRALayer(in_proj.down, up, in_proj.alpha)
    return resolved


def load_lora_into(
    model: nn.Module,
    layers: Mapping[str, LoRALayer],
    adapter: str,
    scale: float = 1.0,
    trainable: bool = False,
) -> list[str]:
    """Attach ``layers`` (as :func:`resolve` returns them) to ``model`` as adapter ``adapter``; the
    tensors are copied to each layer's device and dtype. Returns the adapted layers' names."""
    if adapter in adapter_names(model):
        raise ValueError(f"{describe(model)} already has adapter {adapter!r}; remove it or pick a new name")
    for name, layer in layers.items():
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        device, dtype = linear.weight.device, linear.weight.dtype
        lora = LoRAAdapter(
            layer.down.detach().to(device, dtype, copy=True),
            layer.up.detach().to(device, dtype, copy=True),
            layer.alpha,
            scale,
        )
        lora.requires_grad_(trainable)
        attach_adapter(linear, adapter, lora)
    return list(layers)
