"""diffusers-style ``callback_on_step_end`` support on top of the samplers' step callback."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from stable_cascade.diffusion.timesteps import StepCallback

#: ``callback(pipeline, step_index, timestep, tensors) -> dict`` whose "latents" replaces the latents.
PipelineCallback = Callable[[Any, int, Tensor, dict[str, Any]], Mapping[str, Any] | None]


def check_callback_inputs(names: Sequence[str] | None, allowed: Sequence[str]) -> None:
    unknown = [name for name in names or () if name not in allowed]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs may only name {list(allowed)}; got unknown {unknown}"
        )


def step_callback(
    pipeline: Any,
    callback: PipelineCallback | None,
    names: Sequence[str] | None,
    tensors: Callable[[], Mapping[str, Any]],
) -> StepCallback | None:
    """Adapt a diffusers callback: it receives the requested tensors ("latents" is the current x,
    "denoised" the step's x0 prediction, the others from ``tensors()``, called once, when first asked
    for) and may return new "latents"."""
    if callback is None:
        return None
    fixed: list[Mapping[str, Any]] = []

    def on_step(i: int, t: Tensor, x: Tensor, x0: Tensor) -> Tensor | None:
        current = {"latents": x, "denoised": x0}
        if not fixed and any(name not in current for name in names or ()):
            fixed.append(tensors())
        kwargs = {name: current[name] if name in current else fixed[0][name] for name in names or ()}
        returned = callback(pipeline, i, t, kwargs) or {}
        return returned.get("latents")

    return on_step
