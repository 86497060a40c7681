"""diffusers-style ``callback_on_step_end`` support on top of the samplers' step callback."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from stable_cascade.diffusion.timesteps import StepCallback

if TYPE_CHECKING:
    from stable_cascade.conditioning.text import PromptConditioning

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


def prior_callback_tensors(text: PromptConditioning) -> dict[str, Any]:
    """What a step callback may ask for besides the latents, as diffusers' prior pipeline names it
    (its ``text_encoder_hidden_states``: the hidden states of the guided batch [cond; uncond])."""
    uncond = text.uncond
    hidden = torch.cat([text.cond.hidden, uncond.hidden]) if uncond is not None else text.cond.hidden
    return {"text_encoder_hidden_states": hidden, "negative_prompt_embeds": _negative_hidden(text)}


def decoder_callback_tensors(text: PromptConditioning, effnet: Tensor) -> dict[str, Any]:
    """What a step callback may ask for besides the latents, as diffusers' decoder pipeline names it
    (its ``prompt_embeds_pooled``: the pooled embeddings of the guided batch [cond; uncond])."""
    uncond = text.uncond
    pooled = torch.cat([text.cond.pooled, uncond.pooled]) if uncond is not None else text.cond.pooled
    return {
        "prompt_embeds_pooled": pooled,
        "negative_prompt_embeds": _negative_hidden(text),
        "image_embeddings": effnet,
    }


def _negative_hidden(text: PromptConditioning) -> Tensor | None:
    return text.uncond.hidden if text.uncond is not None else None
