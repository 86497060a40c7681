"""IP-Adapter methods of the prior pipeline, named as diffusers' ``IPAdapterMixin``'s: ``load_ip_adapter``,
``set_ip_adapter_scale``, ``unload_ip_adapter``. Adapters attach to the prior UNet (see
:mod:`stable_cascade.nn.ip_adapter`), so pipelines sharing it share them; image prompts (``images``,
``negative_images``) are their input."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stable_cascade.lora.ip_adapter import load_ip_adapter
from stable_cascade.nn.ip_adapter import IPAdapter, attach_ip_adapter, detach_ip_adapters


def check_ip_scale(scale: object) -> float:
    """An IP-Adapter scale: a finite number (1: as trained, 0: the base model exactly)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(
            f"an IP-Adapter scale must be a finite number (1: as trained, 0: off), got {scale!r}"
        )
    return float(scale)


class IPAdapterMixin:
    """Attach, scale and detach IP-Adapters on the pipeline's ``prior``."""

    prior: Any

    def load_ip_adapter(
        self, path_or_adapter: str | Path | IPAdapter, scale: float = 1.0, adapter_name: str | None = None
    ) -> str:
        """Attach an IP-Adapter (a file, or an :class:`IPAdapter`) at ``scale``; returns its name
        (``adapter_name``, else the file's stem). A file for another architecture, or an adapter whose
        image input differs from those attached, is refused with nothing attached."""
        scale = check_ip_scale(scale)
        adapter = (
            path_or_adapter if isinstance(path_or_adapter, IPAdapter) else load_ip_adapter(path_or_adapter)
        )
        stem = Path(path_or_adapter).stem if not isinstance(path_or_adapter, IPAdapter) else "ip_adapter"
        name = adapter_name if adapter_name is not None else _free_name(stem, self.get_ip_adapters())
        for other, _ in self.prior.ip_adapters.values():
            theirs, ours = other.config, adapter.config
            if (theirs.input, theirs.image_dim) != (ours.input, ours.image_dim):
                raise ValueError(
                    f"IP-Adapter {name} reads image {ours.input} of width {ours.image_dim}, the attached "
                    f"ones {theirs.input} of width {theirs.image_dim}; attach adapters of one image input "
                    "together"
                )
        attach_ip_adapter(self.prior, adapter.to(self.prior.device), name, scale)
        return name

    def get_ip_adapters(self) -> list[str]:
        """The names of the attached IP-Adapters, in attaching order."""
        return list(self.prior.ip_adapters)

    def set_ip_adapter_scale(self, scale: float, adapter_name: str | None = None) -> None:
        """The scale of one IP-Adapter (of all with ``None``); 0 gives the base model exactly."""
        scale = check_ip_scale(scale)
        names = [adapter_name] if adapter_name is not None else self.get_ip_adapters()
        for name in names:
            if name not in self.prior.ip_adapters:
                raise ValueError(
                    f"no IP-Adapter named {name!r} is attached; attached: {self.get_ip_adapters()}"
                )
            self.prior.ip_adapters[name] = (self.prior.ip_adapters[name][0], scale)

    def unload_ip_adapter(self, adapter_names: str | Sequence[str] | None = None) -> None:
        """Detach the named IP-Adapters (all with None): the prior is then exactly as before."""
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        detach_ip_adapters(self.prior, None if names is None else list(names))


def _free_name(stem: str, taken: Sequence[str]) -> str:
    name, number = stem, 1
    while name in taken:
        number += 1
        name = f"{stem}_{number}"
    return name
