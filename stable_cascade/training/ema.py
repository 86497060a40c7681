"""Exponential moving average of the trained weights (the original's ``generator_ema``).

The original averages parameters and buffers with a fixed ``beta`` after a start step and copies
them before. Here the decay warms up instead, ``min(decay, (1 + step) / (10 + step))``, so the
average follows the weights closely early on and needs no start step. Only trained parameters and
floating-point buffers are averaged (LoRA training keeps no copy of the frozen base).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from stable_cascade.training.state import check_fits, full_tensor, like_local, trained_tensors


def averaged(module: nn.Module) -> dict[str, Tensor]:
    """The live trained parameters and floating-point buffers of ``module``."""
    return {n: t for n, t in trained_tensors(module).items() if t.is_floating_point()}


class EMA:
    """Shadow copies of ``module``'s trained tensors (shards, under FSDP), updated after each step."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: value.detach().clone().float() for name, value in averaged(module).items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Move the average towards ``module``'s current weights; ``step`` counts from 0."""
        weight = 1.0 - self.decay_at(step)
        values = averaged(module)
        for name, shadow in self.shadow.items():
            shadow.lerp_(values[name].detach().float(), weight)

    def state_dict(self) -> dict[str, Tensor]:
        """Full (unsharded) tensors on the CPU; a collective under FSDP: call it on every process."""
        return {name: full_tensor(value).cpu() for name, value in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        check_fits(self.shadow, state, "the EMA state")
        for name, shadow in self.shadow.items():
            shadow.copy_(like_local(state[name], shadow))

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        values = averaged(module)
        for name, shadow in self.shadow.items():
            values[name].data.copy_(shadow.to(values[name].dtype))

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """``module`` holds the averaged weights inside the block, its own ones again after it."""
        values = averaged(module)
        saved = {name: values[name].detach().clone() for name in self.shadow}
        self.copy_to(module)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    values[name].data.copy_(value)
