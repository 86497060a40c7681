"""Low-rank adapters on ``nn.Linear`` layers: add, attach, scale, fuse, unfuse and remove them.

A layer with adapters becomes a :class:`LoRALinear` in place (its class is swapped, as
``torch.nn.utils.parametrize`` does, so the module object, its weight ``Parameter`` and any hooks on
it stay the same). Its output is ``x @ W.T + b + Σ scale · alpha / rank · (x @ down.T) @ up.T`` over
its unfused adapters; fusing adds ``scale · alpha / rank · up @ down`` to ``W`` (after keeping a copy
of ``W`` on the CPU, which unfusing copies back, so the round trip is exact).

Adapter weights are not part of the host model's ``state_dict`` (saving a model writes its base or
fused weights only); :func:`lora_state_dict` collects them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Stage C attention projections (queries, keys, values, output) and each attention block's mapper
#: of the CLIP tokens, in the diffusers ``StableCascadeUNet`` layout.
DEFAULT_UNET_TARGETS: tuple[str, ...] = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "kv_mapper.1",
)
#: The attention projections of transformers' ``CLIPTextModelWithProjection``.
DEFAULT_TEXT_TARGETS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)


def check_scale(scale: float) -> None:
    """A LoRA scale must be a finite number (0 turns the adapter off)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"a LoRA scale must be a finite number (1.0: as trained, 0: off), got {scale!r}")


class LoRAAdapter(nn.Module):
    """One low-rank update ``Δy = scale · alpha / rank · (x @ down.T) @ up.T`` of a linear layer."""

    def __init__(self, down: Tensor, up: Tensor, alpha: float, scale: float = 1.0) -> None:
        super().__init__()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise ValueError(
                "a LoRA needs down (rank, in) and up (out, rank) with rank ≥ 1, got "
                f"{tuple(down.shape)}, {tuple(up.shape)}"
            )
        check_scale(scale)
        if not math.isfinite(alpha):
            raise ValueError(f"a LoRA's alpha must be finite, got {alpha}")
        self.down = nn.Parameter(down)  # (rank, in)
        self.up = nn.Parameter(up)  # (out, rank)
        self.alpha = float(alpha)
        self.scale = float(scale)
        self.fused = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def factor(self, scale: float | None = None) -> float:
        """``scale · alpha / rank``: what multiplies ``up @ down``."""
        return (self.scale if scale is None else scale) * self.alpha / self.rank

    def delta_weight(self, scale: float | None = None) -> Tensor:
        """``factor · up @ down`` (out, in), in float32."""
        return (self.up.detach().float() @ self.down.detach().float()) * self.factor(scale)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        down: Tensor = self.down
        up: Tensor = self.up
        if down.device != x.device:  # attached after sequential offload placed the model's hooks
            down, up = down.to(x.device), up.to(x.device)
        h = F.linear(F.linear(x.to(down.dtype), down), up)  # (..., out)
        return (h * self.factor()).to(x.dtype)

    def extra_repr(self) -> str:
        out, rank, inp = self.up.shape[0], self.rank, self.down.shape[1]
        return f"{inp} -> {rank} -> {out}, alpha={self.alpha:g}, scale={self.scale:g}, fused={self.fused}"

    # Kept out of the host model's state dict: see the module docstring.
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        return None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        return None


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with named adapters in ``lora_adapters`` (made by :func:`attach_adapter`)."""

    lora_adapters: nn.ModuleDict
    lora_original_weight: Tensor | None  # W before the first fuse, on the CPU

    def adapters(self) -> dict[str, LoRAAdapter]:
        return cast(dict[str, LoRAAdapter], dict(self.lora_adapters.items()))

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        for adapter in self.adapters().values():
            if not adapter.fused and adapter.scale != 0:
                out = out + adapter(x)
        return out


def linear_names(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``module`` equal to a target or ending in ``.<target>``."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be a sequence of module names, not the string {targets!r}")
    names = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        linears = [n for n, layer in module.named_modules() if isinstance(layer, nn.Linear)]
        raise ValueError(
            f"no nn.Linear of {type(module).__name__} matches the targets {list(targets)}; its linear "
            f"layers are named like {linears[:4]}"
        )
    return names


def add_lora(
    module: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_UNET_TARGETS,
    adapter: str = "default",
    *,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Freeze ``module`` and give each targeted ``nn.Linear`` a trainable rank-``rank`` adapter.

    ``down`` is initialised as ``nn.Linear`` initialises its weight (Kaiming uniform, a = √5, bound
    1/√in), ``up`` with zeros, so the output is unchanged until training moves ``up`` (as in the
    LoRA paper and PEFT). ``alpha`` defaults to ``rank`` (factor 1). Returns the adapted layers' names.
    """
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    names = linear_names(module, targets)
    layers = {name: module.get_submodule(name) for name in names}
    _check_new_adapter(layers, adapter)
    module.requires_grad_(False)
    for layer in layers.values():
        assert isinstance(layer, nn.Linear)
        weight = layer.weight
        bound = 1 / math.sqrt(layer.in_features)
        down = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
        up = torch.zeros(layer.out_features, rank)
        down, up = down.to(weight.device, weight.dtype), up.to(weight.device, weight.dtype)
        attach_adapter(layer, adapter, LoRAAdapter(down, up, alpha or rank))
    return names


def attach_adapter(layer: nn.Linear, name: str, adapter: LoRAAdapter) -> None:
    """Add ``adapter`` to ``layer`` under ``name``, turning the layer into a :class:`LoRALinear`."""
    _check_new_adapter({"layer": layer}, name)
    expected = (layer.out_features, layer.in_features)
    got = (adapter.up.shape[0], adapter.down.shape[1])
    if got != expected:
        raise ValueError(
            f"adapter {name!r} maps {got[1]} -> {got[0]} features, the layer {expected[1]} -> {expected[0]}"
        )
    if not isinstance(layer, LoRALinear):
        if type(layer) is not nn.Linear:
            raise TypeError(f"only plain nn.Linear layers take adapters, not {type(layer).__name__}")
        layer.__class__ = LoRALinear
        lora_layer = cast(LoRALinear, layer)
        lora_layer.lora_adapters = nn.ModuleDict()
        lora_layer.lora_original_weight = None
    cast(LoRALinear, layer).lora_adapters[name] = adapter


def _check_new_adapter(layers: dict[str, nn.Module], name: str) -> None:
    if not name or "." in name:
        raise ValueError(f"an adapter name must be non-empty and without dots, got {name!r}")
    taken = [n for n, x in layers.items() if isinstance(x, LoRALinear) and name in x.lora_adapters]
    if taken:
        raise ValueError(f"adapter {name!r} already exists (on {taken[0]}); remove it or pick another name")


def lora_layers(module: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every layer of ``module`` that has adapters, with its name."""
    for name, layer in module.named_modules():
        if isinstance(layer, LoRALinear):
            yield name, layer


def adapter_names(module: nn.Module) -> list[str]:
    """The names of the adapters in ``module``, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(module):
        names.update(dict.fromkeys(layer.lora_adapters))
    return list(names)


def _adapters(module: nn.Module, names: Sequence[str] | None) -> Iterator[tuple[LoRALinear, LoRAAdapter]]:
    for _, layer in lora_layers(module):
        for name, adapter in layer.adapters().items():
            if names is None or name in names:
                yield layer, adapter


def set_scale(module: nn.Module, scale: float, names: Sequence[str] | None = None) -> None:
    """Set the runtime scale of the named adapters (all with ``None``); fused ones cannot change."""
    check_scale(scale)
    for _, adapter in _adapters(module, names):
        if adapter.fused:
            raise ValueError("a fused adapter's scale is fixed in the weights: unfuse it first")
        adapter.scale = float(scale)


def lora_state_dict(module: nn.Module, adapter: str = "default") -> dict[str, Tensor]:
    """``<layer>.lora_down.weight`` (rank, in), ``<layer>.lora_up.weight`` (out, rank) and
    ``<layer>.alpha`` (a float32 scalar) for each layer of ``module`` with adapter ``adapter``."""
    tensors: dict[str, Tensor] = {}
    for name, layer in lora_layers(module):
        lora = layer.adapters().get(adapter)
        if lora is not None:
            tensors[f"{name}.lora_down.weight"] = lora.down.detach()
            tensors[f"{name}.lora_up.weight"] = lora.up.detach()
            tensors[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
    if not tensors:
        present = adapter_names(module)
        raise ValueError(f"{type(module).__name__} has no adapter {adapter!r}; it has {present or 'none'}")
    return tensors


@torch.no_grad()
def fuse(module: nn.Module, scale: float | None = None, names: Sequence[str] | None = None) -> None:
    """Merge the named unfused adapters (all with ``None``) into their layers' weights:
    ``W += factor · up @ down`` in float32, with ``scale`` instead of each adapter's own if given."""
    if scale is not None:
        check_scale(scale)
    for _, layer in lora_layers(module):
        todo = [a for n, a in layer.adapters().items() if not a.fused and (names is None or n in names)]
        if not todo:
            continue
        weight = layer.weight
        if layer.lora_original_weight is None:
            layer.lora_original_weight = weight.detach().to("cpu", copy=True)
        fused = weight.to(torch.float32, copy=True)
        for adapter in todo:
            fused += adapter.delta_weight(scale).to(weight.device)
        weight.copy_(fused)
        for adapter in todo:
            adapter.fused = True
            adapter.scale = adapter.scale if scale is None else float(scale)


@torch.no_grad()
def unfuse(module: nn.Module) -> None:
    """Copy back every fused layer's original weight (exactly) and run its adapters at runtime again."""
    for _, layer in lora_layers(module):
        original = layer.lora_original_weight
        if original is not None:
            layer.weight.copy_(original)
            layer.lora_original_weight = None
        for adapter in layer.adapters().values():
            adapter.fused = False


def remove(module: nn.Module, names: Sequence[str] | None = None) -> None:
    """Remove the named adapters (all with ``None``); a layer left without adapters is a plain
    ``nn.Linear`` again. Fused adapters may only go all together: their deltas then stay in the
    weights (as diffusers' ``unload_lora_weights`` after ``fuse_lora``)."""
    for name, layer in list(lora_layers(module)):
        adapters = layer.adapters()
        going = [n for n in adapters if names is None or n in names]
        staying = [n for n in adapters if n not in going]
        if staying and any(adapters[n].fused for n in going):
            raise ValueError(f"{name}: fused adapters {going} cannot be removed alone; unfuse first")
        for n in going:
            del layer.lora_adapters[n]
        if not staying:
            del layer.lora_adapters
            del layer.lora_original_weight
            cast(nn.Module, layer).__class__ = nn.Linear
