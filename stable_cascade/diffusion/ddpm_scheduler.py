"""``DDPMWuerstchenScheduler``: diffusers' Stable Cascade scheduler, same numerics and config files.

Continuous timesteps t ∈ [1, 0]; each step takes the DDPM posterior from t to the next timestep with
the clamped cosine ᾱ of :func:`~stable_cascade.diffusion.cosine.alpha_cumprod`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, overload

import torch
from torch import Tensor

from stable_cascade.checkpoint import PretrainedConfigMixin
from stable_cascade.diffusion.cosine import alpha_cumprod
from stable_cascade.diffusion.noise import Generators
from stable_cascade.diffusion.samplers import ddpm_posterior
from stable_cascade.diffusion.timesteps import diffusers_timesteps
from stable_cascade.specs import SchedulerConfig


@dataclass
class DDPMWuerstchenSchedulerOutput:
    """What :meth:`DDPMWuerstchenScheduler.step` returns (diffusers' output class has this field)."""

    prev_sample: Tensor


class DDPMWuerstchenScheduler(PretrainedConfigMixin):
    """Drop-in for diffusers ``DDPMWuerstchenScheduler``: bit-identical steps and the same seeded draws.

    ``DDPMWuerstchenScheduler(scaler=1.0, s=0.008)`` works as in diffusers; ``from_pretrained`` and
    ``save_pretrained`` read and write diffusers' ``scheduler_config.json``.
    """

    config_class: ClassVar[type[SchedulerConfig]] = SchedulerConfig
    config_name: ClassVar[str] = "scheduler_config.json"
    #: Standard deviation of the initial noise.
    init_noise_sigma: ClassVar[float] = 1.0
    config: SchedulerConfig

    def __init__(self, config: SchedulerConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.config = self.resolve_config(config, kwargs)
        self.timesteps = torch.empty(0)  # (steps + 1,) once set_timesteps ran
        self._following = torch.empty(0)  # (steps + 1,) timesteps[i + 1], the last one repeated

    def scale_model_input(self, sample: Tensor, timestep: Tensor | None = None) -> Tensor:
        """The sample unchanged: this scheduler needs no input scaling (diffusers API)."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Set ``self.timesteps`` to ``linspace(1, 0, num_inference_steps + 1)`` or to ``timesteps``.

        Exactly one of the two is required. Custom timesteps must be strictly decreasing values in
        [0, 1]; like diffusers' own, they are stored as float32. A denoising loop runs over all but
        the last timestep.
        """
        self.timesteps = diffusers_timesteps(num_inference_steps, timesteps, device)
        self._following = torch.cat([self.timesteps[1:], self.timesteps[-1:]])

    def previous_timestep(self, timestep: Tensor | float) -> Tensor:
        """The timestep after ``timestep`` in ``self.timesteps`` (nearest match), shaped like it.

        As in diffusers only the first element is looked up. Unlike diffusers this needs no host
        sync; the last timestep maps to itself (a step from it returns the sample unchanged) where
        diffusers raises an IndexError.
        """
        if self.timesteps.numel() == 0:
            raise RuntimeError("call set_timesteps(...) before stepping")
        t = torch.as_tensor(timestep)
        first = t.reshape(-1)[0].to(self.timesteps.device)
        index = (self.timesteps - first).abs().argmin()  # 0-dim, stays on the device
        return self._following.index_select(0, index.view(1)).reshape(()).expand(t.shape)

    @overload
    def step(
        self,
        model_output: Tensor,
        timestep: Tensor | float,
        sample: Tensor,
        generator: Generators | None = None,
        return_dict: Literal[True] = True,
    ) -> DDPMWuerstchenSchedulerOutput: ...

    @overload
    def step(
        self,
        model_output: Tensor,
        timestep: Tensor | float,
        sample: Tensor,
        generator: Generators | None = None,
        *,
        return_dict: Literal[False],
    ) -> tuple[Tensor]: ...

    def step(
        self,
        model_output: Tensor,
        timestep: Tensor | float,
        sample: Tensor,
        generator: Generators | None = None,
        return_dict: bool = True,
    ) -> DDPMWuerstchenSchedulerOutput | tuple[Tensor]:
        """One DDPM posterior step from ``timestep`` to the next timestep (diffusers' formula).

        ``model_output`` is the predicted noise ε; ``timestep`` holds 1 or B equal values (a scalar
        works too). The result has ``model_output``'s dtype. Noise is drawn as diffusers draws it, also
        on the last step where it is then not added, so the generators end in diffusers' state.
        """
        device = model_output.device
        t = _batch_timesteps(timestep, sample).to(device)
        prev_t = self.previous_timestep(t).to(device)
        s, scaler = self.config.s, self.config.scaler
        alpha_t, alpha_prev = alpha_cumprod(t, s, scaler), alpha_cumprod(prev_t, s, scaler)
        prev_sample = ddpm_posterior(sample, model_output, alpha_t, alpha_prev, prev_t, generator)
        if not return_dict:
            return (prev_sample,)
        return DDPMWuerstchenSchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | float) -> Tensor:
        """``√ᾱ(t)·x0 + √(1−ᾱ(t))·noise`` in ``original_samples``' dtype, as diffusers."""
        view = (-1,) + (1,) * (original_samples.ndim - 1)
        t = _batch_timesteps(timesteps, original_samples).to(original_samples.device)
        alpha = alpha_cumprod(t, self.config.s, self.config.scaler).view(view)
        noisy = alpha.sqrt() * original_samples + (1 - alpha).sqrt() * noise
        return noisy.to(original_samples.dtype)


def _batch_timesteps(timestep: Tensor | float, sample: Tensor) -> Tensor:
    """``timestep`` as a (1,) or (B,) tensor for a sample of batch B."""
    t = torch.as_tensor(timestep).reshape(-1)
    if t.shape[0] not in (1, sample.shape[0]):
        raise ValueError(
            f"timestep must hold 1 or {sample.shape[0]} (the batch size) values, got shape "
            f"{tuple(torch.as_tensor(timestep).shape)}"
        )
    return t
