"""LCM: consistency distillation (``stable-cascade train lcm``) on tiny models, its LoRAs and the ``lcm``
preset. The toy problem: a tiny Stage C taught two latents (+1 and −1 everywhere) under one caption, so
its one-step x0 prediction is their blurry mean while its 50-step ODE ends near one of them; distillation
must move the student's 1- and 2-step samples towards the teacher's 50-step ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from test_training import Launcher, components, launcher, one_thread, write_images  # noqa: F401  (fixtures)

import tiny
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.diffusion.presets import StageSettings
from stable_cascade.lora import load_lora_file, read_lora_metadata
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.prior import StableCascadePriorPipeline
from stable_cascade.sampling.loop import run_stage
from stable_cascade.specs import SchedulerConfig
from stable_cascade.training import TrainConfig, make_task, train
from stable_cascade.training.components import load_components
from stable_cascade.training.consistency import Level, ddim_step, distance, grid_pair, guidance_scales, guided
from stable_cascade.training.data import bucketed_dataset, collate, find_examples
from stable_cascade.training.lcm_task import LCMDistillation

STAGES = {"c": "prior", "b": "decoder"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_images(folder, [(96, 96), (80, 112)])
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prior/`` and ``decoder/`` pipeline folders of tiny random models (with the EfficientNet encoder)."""
    folder = tmp_path_factory.mktemp("teachers")
    parts = components(folder, fresh_prior=False)
    tiny.randomize_(parts.decoder, 1, scale=0.1)  # type: ignore[arg-type]
    common = {"tokenizer": parts.tokenizer, "text_encoder": parts.text_encoder, "effnet": parts.effnet}
    scheduler = DDPMWuerstchenScheduler()
    StableCascadePriorPipeline(prior=parts.prior, scheduler=scheduler, **common).save_pretrained(
        folder / "prior"
    )
    StableCascadeDecoderPipeline(
        decoder=parts.decoder, vqgan=parts.stage_a, scheduler=scheduler, **common
    ).save_pretrained(folder / "decoder")
    return folder


def lcm_config(teachers: Path, data: Path, output: Path, stage: str = "c", **changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "resolution": 64,
        "batch_size": 2,
        "steps": 2,
        "lr": 1e-2,
        "ema_decay": 0.0,
        "checkpoint_every": 1000,
        "log_every": 1000,
        "lcm_teacher_steps": 8,
        "lora_rank": 2,
    }
    values.update(changes)
    teacher = teachers / STAGES[stage]
    return TrainConfig(task="lcm", data=data, output_dir=output, teacher=teacher, lcm_stage=stage, **values)  # type: ignore[arg-type]


def student_eps(unet: StableCascadeUNet, seed: int = 0) -> torch.Tensor:
    cfg = unet.config
    generator = torch.Generator().manual_seed(seed)
    size = (4, 16, 16) if cfg.is_stage_b else (16, 2, 2)
    cond = {"clip_text_pooled": torch.randn(2, 1, cfg.clip_text_pooled_in_channels, generator=generator)}
    if cfg.is_stage_b:
        cond["effnet"] = torch.randn(2, 16, 2, 2, generator=generator)
    else:
        cond["clip_text"] = torch.randn(2, 5, cfg.clip_text_in_channels, generator=generator)  # type: ignore[arg-type]
    with torch.no_grad():
        return unet.eval()(
            torch.randn(2, *size, generator=generator), torch.tensor([0.9, 0.3]), **cond
        ).sample


# -- the pieces -----------------------------------------------------------------------------------


def test_the_consistency_pieces() -> None:
    """Grid pairs one step apart, the boundary (identity at t = 0), the exact DDIM step for the true
    noise, guidance per example."""
    generator = torch.Generator().manual_seed(0)
    start, earlier = grid_pair(64, 8, generator)
    n = start.t * 8
    assert torch.allclose(n, n.round()) and n.min() >= 1 and n.max() <= 8
    torch.testing.assert_close(earlier.t, start.t - 1 / 8)
    c_skip, c_out = Level.at(torch.tensor([0.0, 1 / 50])).boundary()
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0) and c_skip[1].item() < 1e-4
    x0, noise = torch.randn(64, 4, 2, 2, generator=generator), torch.randn(64, 4, 2, 2, generator=generator)
    torch.testing.assert_close(
        ddim_step(start.noised(x0, noise), noise, start, earlier), earlier.noised(x0, noise)
    )
    scales = guidance_scales(64, 3.0, 5.0, generator)
    assert 3.0 <= scales.min() < scales.max() <= 5.0
    cond, uncond = torch.ones(64, 4, 2, 2), torch.zeros(64, 4, 2, 2)
    torch.testing.assert_close(guided(cond, uncond, scales), scales.view(-1, 1, 1, 1).expand(-1, 4, 2, 2))
    assert distance(cond, uncond, "l2", 0.001).tolist() == [1.0] * 64
    torch.testing.assert_close(distance(cond, uncond, "huber", 0.5), torch.full((64,), 1.25**0.5 - 0.5))


# -- the trained LoRA ------------------------------------------------------------------------------


def test_a_stage_b_lcm_lora_round_trips_and_knows_its_stage(
    teachers: Path, data: Path, tmp_path: Path
) -> None:
    run = lcm_config(teachers, data, tmp_path / "run", stage="b", sample_every=2)
    task = make_task(run, load_components(run))
    final = train(run, task=task)
    path = final / "lora.safetensors"
    metadata = read_lora_metadata(path)
    assert (metadata["stage"], metadata["adapter"], metadata["teacher_steps"]) == ("decoder", "lcm", "8")
    assert (
        load_lora_file(path).stage == "decoder"
        and (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    )
    decoder = StableCascadeDecoderPipeline.from_pretrained(teachers / "decoder")
    before = student_eps(decoder.decoder)
    decoder.load_lora_weights(path)
    assert isinstance(task, LCMDistillation)
    torch.testing.assert_close(student_eps(decoder.decoder), student_eps(task.student))
    assert not torch.allclose(student_eps(decoder.decoder), before)  # it trained
    prior = StableCascadePriorPipeline.from_pretrained(teachers / "prior")
    with pytest.raises(ValueError, match=r"is a Stage B \(decoder\) LoRA.*load it into the decoder pipeline"):
        prior.load_lora_weights(path)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_resume_continues_bit_identically(teachers: Path, data: Path, tmp_path: Path, full: bool) -> None:
    """A LoRA on Stage B; the whole Stage C with its EMA target (the target network resumes too)."""
    stage, options = ("c", {"lcm_full": True, "ema_decay": 0.9}) if full else ("b", {})
    options.update(checkpoint_every=2, lr=1e-3)
    train(lcm_config(teachers, data, tmp_path / "straight", stage, steps=4, **options))
    train(lcm_config(teachers, data, tmp_path / "resumed", stage, steps=2, **options))
    train(lcm_config(teachers, data, tmp_path / "resumed", stage, steps=4, resume="latest", **options))
    files = ("model", "state", "ema") if full else ("model", "state")
    for name in files:
        straight = load_file(tmp_path / "straight" / "checkpoint-4" / f"{name}.safetensors")
        again = load_file(tmp_path / "resumed" / "checkpoint-4" / f"{name}.safetensors")
        assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    weights = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    assert all(".lora_adapters." in k for k in weights) != full  # a LoRA trains its adapters only
    if full:  # the whole stage, as a pipeline folder
        assert StableCascadePriorPipeline.from_pretrained(tmp_path / "straight" / "final").prior is not None


def test_bf16_and_l2(teachers: Path, data: Path, tmp_path: Path) -> None:
    run = lcm_config(
        teachers, data, tmp_path / "run", mixed_precision="bf16", lcm_loss="l2", checkpoint_every=2
    )
    train(run)
    weights = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


# -- mistakes --------------------------------------------------------------------------------------


def test_a_teacher_of_another_architecture_is_refused_before_training(
    teachers: Path, data: Path, tmp_path: Path
) -> None:
    other = tmp_path / "student"
    StableCascadeUNet(tiny.TINY_PRIOR.replace(block_out_channels=(16, 16))).save_pretrained(other)
    run = lcm_config(teachers, data, tmp_path / "run", prior=other)
    with pytest.raises(
        ValueError,
        match=r"the teacher .* is a Stage C \(prior\) with channels \[32, 32\], the "
        r"student \(--prior\) a Stage C \(prior\) with channels \[16, 16\]",
    ):
        train(run)
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    wrong_stage = lcm_config(teachers, data, tmp_path / "run2").replace(teacher=teachers / "decoder")
    with pytest.raises(
        ValueError, match=r"holds no Stage C \(prior\) for --stage c: pass its prior pipeline"
    ):
        train(wrong_stage)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher": None}, "lcm distils a teacher: pass --teacher MODEL"),
        ({"lcm_guidance_embedding": True}, "use it with --full"),
        ({"lcm_full": True}, "takes its target from the EMA of the student: set --ema-decay"),
        ({"lcm_guidance": (5.0, 2.0)}, "0 <= LOW <= HIGH, got 5.0 2.0"),
        ({"lcm_stage": "a"}, "lcm_stage must be one of c, b"),
        ({"lcm_huber_c": 0.0}, "--huber-c must be a positive number"),
    ],
)
def test_option_mistakes_are_clear(
    data: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {"teacher": tmp_path, "ema_decay": 0.0, **change}
    with pytest.raises(ValueError, match=message):
        TrainConfig(task="lcm", data=data, output_dir=tmp_path, **values)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--teacher is the model LCM distillation learns from"):
        TrainConfig(task="stage-c", data=data, output_dir=tmp_path, teacher=tmp_path)


def test_a_nan_loss_stops_with_a_message(teachers: Path, data: Path, tmp_path: Path) -> None:
    parts = load_components(lcm_config(teachers, data, tmp_path))
    with torch.no_grad():
        parts.prior.clf[1].weight.fill_(float("nan"))  # type: ignore[union-attr]
    with pytest.raises(FloatingPointError, match=r"^training diverged at step 1: the loss is nan"):
        train(lcm_config(teachers, data, tmp_path / "run"), parts)
    assert not (tmp_path / "run" / "final").exists()


# -- guidance as an embedding (full distillation) --------------------------------------------------


def test_guidance_embedding_starts_as_the_teacher_and_samples_in_one_branch(
    teachers: Path, data: Path, tmp_path: Path
) -> None:
    run = lcm_config(
        teachers, data, tmp_path / "run", lcm_full=True, lcm_guidance_embedding=True, ema_decay=0.5
    )
    task = make_task(run, load_components(run))
    assert isinstance(task, LCMDistillation)
    assert task.student.config.timestep_conditioning_type == ("sca", "crp", "guidance")
    torch.testing.assert_close(student_eps(task.student), student_eps(task.teacher))  # zero new mappers
    final = train(run, task=task)
    prior = StableCascadePriorPipeline.from_pretrained(final).prior
    assert "guidance" in prior.config.timestep_conditioning_type
    rows: list[int] = []
    prior.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    cond = {"clip_text_pooled": torch.randn(1, 1, 24), "clip_text": torch.randn(1, 3, 24)}
    settings = StageSettings(2, 3.0, sampler="lcm", schedule="reference", hand_on="x0")
    out = run_stage(prior, cond, None, torch.randn(1, 16, 2, 2), settings, SchedulerConfig())
    assert rows == [1, 1] and torch.isfinite(out).all()  # no unconditional branch, guidance embedded
    with pytest.raises(
        ValueError, match="guidance is the input of a guidance embedding, which this UNet lacks"
    ):
        task.teacher(torch.randn(1, 16, 2, 2), 0.5, guidance=3.0, **cond)


# -- two processes ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_lcm_trains_on_two_processes(launcher: Launcher) -> None:  # noqa: F811
    """DDP (gloo): both processes end with the same LoRA."""
    teacher = str(launcher.folder / "pipeline")
    ends = launcher("lcm", {}, "--teacher", teacher, "--teacher-steps", "4", task="lcm")
    assert ends.keys() == {"0", "1"} and ends["0"] == ends["1"], ends
    trained = launcher.weights("lcm", 3)
    assert trained and all(".lora_adapters." in k for k in trained)
    assert read_lora_metadata(launcher.runs["lcm"] / "final" / "lora.safetensors")["stage"] == "prior"


# -- the toy problem -------------------------------------------------------------------------------


def toy_data(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index, value in enumerate((0, 255)):
        PIL.Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a square")
    return folder


def toy_latents(images: torch.Tensor) -> torch.Tensor:
    """A black image → −1 everywhere, a white one → +1: (B, 16, 2, 2)."""
    return (2 * images.mean(dim=(1, 2, 3)) - 1).view(-1, 1, 1, 1).expand(-1, 16, 2, 2).float()


@pytest.mark.slow
def test_distillation_on_a_toy_problem_learns(tmp_path: Path) -> None:
    toy = toy_data(tmp_path / "data")
    options: dict[str, object] = {
        "resolution": 64,
        "batch_size": 2,
        "checkpoint_every": 10**6,
        "log_every": 10**6,
    }
    teaching = TrainConfig(
        task="stage-c",
        data=toy,
        output_dir=tmp_path / "teacher",
        steps=300,
        lr=3e-3,
        ema_decay=0.0,
        image_conditioning=0.0,
        caption_dropout=0.0,
        **options,
    )  # type: ignore[arg-type]
    teacher_task = make_task(teaching, components(tmp_path))
    teacher_task.latents = toy_latents  # type: ignore[method-assign]
    teacher = train(teaching, task=teacher_task)
    run = TrainConfig(
        task="lcm",
        data=toy,
        output_dir=tmp_path / "lcm",
        teacher=teacher,
        steps=400,
        lr=1e-3,
        lcm_full=True,
        ema_decay=0.95,
        lcm_teacher_steps=8,
        lcm_guidance=(1.0, 1.0),
        caption_dropout=0.0,
        **options,
    )  # type: ignore[arg-type]
    task = make_task(run, load_components(run))
    assert isinstance(task, LCMDistillation)
    task.base.latents = toy_latents  # type: ignore[method-assign]
    dataset, groups = bucketed_dataset(find_examples(toy), 64, (1.0,), task.size_multiple)
    batch = collate([dataset[i] for i in groups[0]])
    cond = task.base.conditioning(batch, batch.images, torch.Generator().manual_seed(0))
    cond = {key: value[:1].expand(16, *value.shape[1:]) for key, value in cond.items()}
    noise = torch.randn(16, 16, 2, 2, generator=torch.Generator().manual_seed(5))

    @torch.no_grad()
    def sample(unet: StableCascadeUNet, steps: int, sampler: str) -> torch.Tensor:
        settings = StageSettings(steps, 1.0, sampler=sampler, schedule="reference", hand_on="x0")
        generator = torch.Generator().manual_seed(1)
        return run_stage(unet.eval(), cond, None, noise, settings, SchedulerConfig(), generator=generator)

    reference = sample(task.teacher, 50, "ddim")  # the teacher's 50-step ODE samples

    def distances() -> list[float]:
        return [float((sample(task.student, k, "lcm") - reference).pow(2).mean().sqrt()) for k in (1, 2)]

    before = distances()
    losses: list[float] = []  # the consistency loss of every step
    task.trainee.register_forward_hook(
        lambda module, args, out: losses.append(float(out["loss"].detach().mean()))
    )
    train(run, task=task)
    assert sum(losses[-100:]) / 100 < 0.8 * sum(losses[:50]) / 50, losses
    assert task.ema is not None
    task.ema.copy_to(task.trainee)  # the exported (EMA) student
    after = distances()
    assert all(a < 0.85 * b for a, b in zip(after, before, strict=True)), (before, after)
