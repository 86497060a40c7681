"""NaN/Inf guards of the sampling loop: recorded on the device per step, read once after sampling."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from stable_cascade.diffusion.timesteps import NoiseModel
from stable_cascade.nn.unet import StableCascadeUNet

Conditioning = Mapping[str, Tensor]


class FiniteWatch:
    """A noise model that records, per step, whether its prediction was free of NaN and Inf.

    The records stay on the device (one () bool tensor per step, the only work added to a step), so
    watching costs no host synchronisation; :func:`check_finite_run` reads them once, after sampling.
    """

    def __init__(self, eps_model: NoiseModel) -> None:
        self.eps_model = eps_model
        self.finite: list[Tensor] = []  # per call: () bool

    def __call__(self, x: Tensor, ratio: Tensor) -> Tensor:
        eps = self.eps_model(x, ratio)
        self.finite.append(torch.isfinite(eps).all())
        return eps

    def first_bad(self, device: torch.device) -> Tensor:
        """() int64 on ``device``: the first call whose prediction held NaN/Inf, -1 if none did."""
        if not self.finite:
            return torch.full((), -1, dtype=torch.int64, device=device)
        bad = ~torch.stack(self.finite).to(device)
        return torch.where(bad.any(), bad.to(torch.int64).argmax(), -1)


def stage_name(unet: StableCascadeUNet) -> str:
    return "Stage B (decoder)" if unet.config.is_stage_b else "Stage C (prior)"


def non_finite_error(unet: StableCascadeUNet, step: int | None, steps: int) -> FloatingPointError:
    """The one-line error of a stage that produced NaN/Inf: at ``step`` (0-based) of ``steps``, or in
    its result (``step=None``); the advice fits the stage, its dtype and its device."""
    stage = stage_name(unet)
    where = f"at step {step + 1} of {steps}" if step is not None else f"after {steps} steps"
    if unet.dtype != torch.float16:
        advice = "check its weights and any LoRA applied to it, or run it in torch.float32"
    elif not unet.config.is_stage_b and unet.fp16_safety is None:
        advice = (
            "float16 overflows in the full Stage C: call unet.enable_fp16_safety(), or use torch.bfloat16"
        )
    else:
        advice = f"{stage} overflows in float16 here; run it in torch.bfloat16 or torch.float32"
    if unet.dtype == torch.float16 and unet.device.type == "cpu":
        advice += " (on CPU, use torch.float32: float16 there is slow and imprecise)"
    return FloatingPointError(
        f"{stage} produced NaN/Inf {where} in {unet.dtype} on {unet.device.type}; {advice}"
    )


def all_finite(*tensors: Tensor) -> Tensor:
    """A () bool tensor on the tensors' device: whether every value is finite (no host read)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def check_finite_run(
    unet: StableCascadeUNet,
    cond: Conditioning,
    inputs_finite: Tensor,
    watch: FiniteWatch,
    out: Tensor,
    steps: int,
) -> None:
    """Raise ``FloatingPointError`` naming the stage and the cause when the conditioning or starting
    latents (a broken encoder or LoRA upstream), a prediction, or the result held NaN/Inf.

    The three checks are read from the device in one go, after sampling.
    """
    first_bad = watch.first_bad(inputs_finite.device)
    flags = torch.stack([~inputs_finite, first_bad, ~torch.isfinite(out).all()])
    inputs_bad, bad_step, out_bad = (int(v) for v in flags.to(torch.int64).tolist())
    if inputs_bad:
        bad = sorted(name for name, value in cond.items() if not bool(torch.isfinite(value).all()))
        what = f"the conditioning of {stage_name(unet)} ({', '.join(bad)})" if bad else "the starting latents"
        raise FloatingPointError(
            f"{what} held NaN/Inf before sampling; check what made it (text or image encoder, the previous "
            "stage, the latents passed in), its weights and any LoRA applied to it"
        )
    if bad_step >= 0 or out_bad:
        raise non_finite_error(unet, bad_step if bad_step >= 0 else None, steps)
