"""The ``lcm`` task: latent consistency distillation of Stage C or Stage B (:mod:`.consistency`).

The teacher (``--teacher``: the stage's pipeline folder) is frozen. The student starts from it (or from
``--prior``/``--decoder`` of the same architecture) and is either a LoRA on it (the default: adapters on
the attention, the ResBlock MLPs and the timestep modulation; the target is the student itself without
gradients, the teacher the same UNet with the adapters off) or, with ``lcm_full``, the whole UNet, whose
target is the run's EMA of it (``ema_decay``), optionally taking the guidance scale as an extra
timestep condition (``lcm_guidance_embedding``; new mappers start at zero, so the student starts as the
teacher). Each step (``prepare``, without gradients): x0 and the conditioning as the stage's own task
makes them, a start level ``t_n`` and Gaussian noise (the sampler's; Stage B too, which trains on
pyramid noise), the teacher's guided DDIM step to ``t_{n-1}`` and the
target's consistency function there; the trainee's forward gives the student's at ``t_n`` and the
distance. The export is ``final/lora.safetensors`` (marked ``stage`` and ``adapter: lcm``, which the
``lcm`` preset looks for) or the stage's pipeline folder.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from stable_cascade.lora import DEFAULT_UNET_TARGETS, add_lora, save_lora, set_scale
from stable_cascade.lora.resolve import describe
from stable_cascade.nn.unet import StableCascadeUNet, StableCascadeUNetOutput
from stable_cascade.specs import UNetConfig
from stable_cascade.training.components import Components
from stable_cascade.training.config import TrainConfig
from stable_cascade.training.consistency import Level, ddim_step, distance, grid_pair, guidance_scales, guided
from stable_cascade.training.data import Batch
from stable_cascade.training.ema import EMA
from stable_cascade.training.objective import gaussian
from stable_cascade.training.state import assign_tensors
from stable_cascade.training.tasks import Inputs, StageB, StageC, Task
from stable_cascade.training.trainees import Outputs, rebuild

LORA_FILE = "lora.safetensors"
#: LoRA targets of an LCM LoRA: the attention, each ResBlock's MLP and each timestep modulation.
LCM_TARGETS: tuple[str, ...] = (*DEFAULT_UNET_TARGETS, "channelwise.0", "channelwise.4", "mapper")
STAGES: dict[str, tuple[str, str, type[StageC | StageB]]] = {
    "c": ("prior", "Stage C (prior)", StageC),
    "b": ("decoder", "Stage B (decoder)", StageB),
}


class ConsistencyStudent(nn.Module):
    """The student UNet; forward → per-example distance of its consistency function at ``t`` to
    ``target``. Inputs: ``sample`` x_t, ``r`` the UNet's ratio and ``t`` (B,), ``target``, the UNet's
    conditioning (and ``guidance`` with a guidance embedding)."""

    def __init__(self, unet: StableCascadeUNet, loss: str, huber_c: float) -> None:
        super().__init__()
        self.unet, self.loss, self.huber_c = unet, loss, huber_c

    def forward(self, sample: Tensor, r: Tensor, t: Tensor, target: Tensor, **cond: Tensor) -> Outputs:
        out = self.unet(sample, r, **cond)
        assert isinstance(out, StableCascadeUNetOutput)
        prediction = Level.at(t).consistency(sample.float(), out.sample.float())
        return {"loss": distance(prediction, target, self.loss, self.huber_c)}


class LCMDistillation(Task):
    name = "lcm"

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        super().__init__(config, parts)
        field, label, base = STAGES[config.lcm_stage]
        if getattr(parts, field) is None:
            raise ValueError(
                f"--teacher {config.teacher} holds no {label} for --stage {config.lcm_stage}: pass its "
                f"{field} pipeline folder (or choose the other --stage)"
            )
        self.base: StageC | StageB = base(
            config.replace(task=f"stage-{config.lcm_stage}", teacher=None), parts
        )
        self.teacher: StableCascadeUNet = self.base.unet.eval().requires_grad_(False)
        self.student = self._student(parts.student)
        self.trainee = ConsistencyStudent(self.student, config.lcm_loss, config.lcm_huber_c).train()
        self.ema: EMA | None = None

    @property
    def size_multiple(self) -> int:
        return self.base.size_multiple

    def _student(self, given: StableCascadeUNet | None) -> StableCascadeUNet:
        config, teacher = self.config, self.teacher
        if given is not None and _architecture(given) != _architecture(teacher):
            option = "--prior" if config.lcm_stage == "c" else "--decoder"
            raise ValueError(
                f"the teacher (--teacher {config.teacher}) is a {describe(teacher)}, the student ({option}) "
                f"a {describe(given)}: the student must have the teacher's architecture; give one of the "
                f"same configuration, or leave out {option} to start from the teacher"
            )
        embedded = given is not None and "guidance" in given.config.timestep_conditioning_type
        if embedded and not config.lcm_guidance_embedding:
            raise ValueError(
                "the student has a guidance embedding: continue its distillation with --full "
                "--guidance-embedding"
            )
        if not config.lcm_full:
            student = given or teacher
            generator = torch.Generator().manual_seed(config.seed)
            add_lora(student, config.lora_rank, config.lora_alpha, targets=LCM_TARGETS, generator=generator)
            return student
        if config.lcm_guidance_embedding:
            return with_guidance_embedding(given or teacher)
        return copy.deepcopy(given or teacher).requires_grad_(True)

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.base.to(device)
        self.teacher.to(device)

    def begin(self, ema: EMA | None) -> None:
        self.ema = ema

    @torch.no_grad()
    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        images = batch.images.to(self.device)
        x0 = self.base.latents(images)
        cond = self.base.conditioning(batch, images, generator)
        count = x0.shape[0]
        noise = gaussian(tuple(x0.shape), generator).to(self.device)
        start, earlier = (
            level.to(self.device) for level in grid_pair(count, self.config.lcm_teacher_steps, generator)
        )
        scale = guidance_scales(count, *self.config.teacher_guidance, generator).to(self.device)
        sample = start.noised(x0, noise)
        with self._autocast(), self._evaluating():
            eps = self._teacher_eps(sample, start.r, cond, scale)
            earlier_sample = ddim_step(sample, eps.float(), start, earlier)
            if self.config.lcm_guidance_embedding:
                cond = {**cond, "guidance": scale}
            target_eps = self._target(earlier_sample, earlier.r, cond)
        target = earlier.consistency(earlier_sample, target_eps.float())
        return {"sample": sample, "r": start.r, "t": start.t, "target": target, **cond}

    def _teacher_eps(self, sample: Tensor, r: Tensor, cond: Inputs, scale: Tensor) -> Tensor:
        """The teacher's guided ε (both branches in one batch, conditional first)."""
        uncond = self.base.unconditional(cond)
        both = {key: torch.cat([value, uncond[key]]) for key, value in cond.items()}
        with self._adapters_off():
            eps = self.teacher(torch.cat([sample, sample]), torch.cat([r, r]), **both).sample
        eps_cond, eps_uncond = eps.float().chunk(2)
        return guided(eps_cond, eps_uncond, scale)

    def _target(self, sample: Tensor, r: Tensor, cond: Inputs) -> Tensor:
        """ε of the target network: the student itself (LoRA) or its EMA (full distillation)."""
        if not self.config.lcm_full:
            return self.student(sample, r, **cond).sample  # type: ignore[no-any-return]
        assert self.ema is not None, "full distillation runs with an EMA (checked by TrainConfig)"
        weights = {name.removeprefix("unet."): value for name, value in self.ema.shadow.items()}
        return functional_call(self.student, weights, (sample, r), cond).sample  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _adapters_off(self) -> Iterator[None]:
        """The teacher as it was: when it is the student's base, with the LoRA adapters at scale 0."""
        shared = self.teacher is self.student
        if shared:
            set_scale(self.teacher, 0.0)
        try:
            yield
        finally:
            if shared:
                set_scale(self.teacher, 1.0)

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Teacher and target without dropout; the student back in its mode afterwards."""
        training = self.student.training
        self.student.eval()
        try:
            yield
        finally:
            self.student.train(training)

    def _autocast(self) -> Any:
        enabled = self.config.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        field, _, _ = STAGES[self.config.lcm_stage]
        if self.config.lcm_full:
            self.base.pipeline(rebuild(self.student, state, "unet.")).save_pretrained(directory)
            return
        assign_tensors(self.trainee, state, "the final LoRA weights")
        config = self.config
        metadata = {
            "task": "lcm",
            "stage": field,
            "adapter": "lcm",
            "steps": str(config.steps),
            "teacher_steps": str(config.lcm_teacher_steps),
            "teacher_guidance": "{:g}-{:g}".format(*config.teacher_guidance),
        }
        save_lora(directory / LORA_FILE, unet=self.student, metadata=metadata)


def _architecture(unet: StableCascadeUNet) -> UNetConfig:
    """The UNet's config but for a guidance embedding."""
    conditions = tuple(c for c in unet.config.timestep_conditioning_type if c != "guidance")
    return unet.config.replace(timestep_conditioning_type=conditions)


def with_guidance_embedding(unet: StableCascadeUNet) -> StableCascadeUNet:
    """A trainable copy of ``unet`` with ``guidance`` as one more timestep condition, its new mappers
    zero (the output is unchanged until training moves them)."""
    conditions = unet.config.timestep_conditioning_type
    if "guidance" in conditions:
        return copy.deepcopy(unet).requires_grad_(True)
    widened = StableCascadeUNet(unet.config.replace(timestep_conditioning_type=(*conditions, "guidance")))
    widened.to(unet.device, unet.dtype)
    missing, unexpected = widened.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(".mapper_guidance." in name for name in missing), (missing, unexpected)
    with torch.no_grad():
        for name in missing:
            widened.get_parameter(name).zero_()
    return widened.requires_grad_(True)
