"""CPU offloading without accelerate: whole models moved explicitly, or leaf modules moved by hooks.

Model offload (diffusers' ``enable_model_cpu_offload``) keeps every model on the CPU and moves the one
a pipeline is about to use to the execution device. Sequential offload (``enable_sequential_cpu_offload``)
keeps all weights on the CPU and moves each leaf module's own tensors to the execution device just for
its ``forward``; code that reads a module's weights outside its ``forward`` (such as
``PaellaVQModel.quantize``) must activate it itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

CPU = torch.device("cpu")
OffloadMode = Literal["model", "sequential"]


@dataclasses.dataclass
class Offload:
    """A pipeline's offload state: the mode, the execution device and the hooks to remove."""

    mode: OffloadMode
    device: torch.device
    hooks: list[RemovableHandle] = dataclasses.field(default_factory=list)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def execution_device(method: str, gpu_id: int | None, device: torch.device | str | None) -> torch.device:
    """The device offloaded models run on: ``device``, else ``cuda:{gpu_id or 0}``."""
    if device is not None:
        if gpu_id is not None:
            raise ValueError(f"{method} takes gpu_id or device, not both (got {gpu_id!r} and {device!r})")
        return torch.device(device)
    if not torch.cuda.is_available():
        raise ValueError(
            f"{method} moves models to a CUDA GPU while they run, but CUDA is not available; pass "
            "device='cpu' to exercise offloading on the CPU (for tests), or do not enable offload"
        )
    return torch.device("cuda", gpu_id or 0)


def place(module: nn.Module, device: torch.device) -> None:
    """Move a whole model (every parameter and buffer) to ``device``."""
    module.to(device)


def owns_tensors(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters or buffers itself (not only through its children)."""
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Move the module's own parameters and buffers, keeping the ``Parameter`` objects."""
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in module.named_buffers(recurse=False):
        setattr(module, name, buffer.to(device))


def attach_sequential_hooks(models: Iterable[nn.Module], device: torch.device) -> list[RemovableHandle]:
    """Forward hooks that bring each tensor-owning submodule to ``device`` for its forward and back after."""

    def to_device(module: nn.Module, args: Any) -> None:
        move_own_tensors(module, device)

    def to_cpu(module: nn.Module, args: Any, output: Any) -> None:
        move_own_tensors(module, CPU)

    hooks: list[RemovableHandle] = []
    for model in models:
        for module in model.modules():
            if owns_tensors(module):
                hooks.append(module.register_forward_pre_hook(to_device))
                hooks.append(module.register_forward_hook(to_cpu, always_call=True))  # even on errors
    return hooks
