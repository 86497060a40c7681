"""Gaussian noise drawn from user generators exactly as diffusers draws it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator]


def randn(
    shape: Sequence[int],
    generator: Generators | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise of ``shape`` on ``device``, the same draw as diffusers' ``randn_tensor``.

    A CPU generator with a non-CPU ``device`` draws on the CPU and moves the result, so a seed gives
    the same noise on every device. A sequence of generators draws one batch item per generator: item
    i of ``shape[0]`` comes from ``generator[i]``. Without a generator, torch's global RNG is used.
    """
    target = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(shape)
    if isinstance(generator, torch.Generator) or generator is None:
        draw_device = _draw_device(generator, target)
        return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(target)
    generators = list(generator)
    if not shape or len(generators) != shape[0]:
        batch = shape[0] if shape else "no batch dimension"
        raise ValueError(
            f"got {len(generators)} generators for a batch of {batch} (shape {shape}); pass one "
            "torch.Generator per batch item, or a single generator for the whole batch"
        )
    draw_devices = {_draw_device(g, target) for g in generators}
    if len(draw_devices) != 1:
        raise ValueError("all generators of the list must be on the same device")
    draw_device = draw_devices.pop()
    # (1, *shape[1:]) per generator, concatenated into (B, *shape[1:]).
    items = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype) for g in generators]
    return torch.cat(items).to(target)


def _draw_device(generator: torch.Generator | None, target: torch.device) -> torch.device:
    """Where the draw happens: ``target``, except the CPU for a CPU generator."""
    if generator is None:
        return target
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected a torch.Generator, got {type(generator).__name__}")
    kind = generator.device.type
    if kind == target.type:
        return target
    if kind == "cpu":
        return torch.device("cpu")
    raise ValueError(
        f"cannot draw {target.type} noise with a {kind} generator; create the generator on "
        f"'{target.type}' or on 'cpu' (a CPU generator gives the same noise on every device)"
    )
