"""The training loop shared by every task, on ``accelerate`` (one process, DDP or FSDP).

Per step: the task turns the next batch into inputs (frozen encoders, noise, condition dropout); the
trainee's forward under autocast gives per-sample losses; they are weighted (P2 / adaptive / none),
averaged and back-propagated; gradients are clipped, AdamW steps, the learning rate warms up linearly
(the original ``GradualWarmupScheduler``, then constant), the EMA follows. Every random draw comes from
a seeded per-process generator or the seeded global RNGs (dropout), and the data order from
:class:`~stable_cascade.training.data.BucketBatchSampler`, so a run resumed from a checkpoint
continues bit for bit as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stable_cascade.checkpoint import read_state_dict
from stable_cascade.checkpoint.atomic import atomic_folder
from stable_cascade.training import state as ckpt
from stable_cascade.training.components import Components, load_components
from stable_cascade.training.config import TrainConfig
from stable_cascade.training.data import BucketBatchSampler, bucketed_dataset, collate, find_examples
from stable_cascade.training.ema import EMA
from stable_cascade.training.objective import LossWeights
from stable_cascade.training.registry import make_task
from stable_cascade.training.samples import Sampler
from stable_cascade.training.tasks import Task

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

FINAL = "final"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
#: Settings a resumed run may change without changing what it computes.
_FREE_ON_RESUME = frozenset(
    {
        "steps",
        "resume",
        "output_dir",
        "num_workers",
        "checkpoint_every",
        "sample_every",
        "sample_prompts",
        "log_every",
    }
)


def train(config: TrainConfig, components: Components | None = None, *, task: Task | None = None) -> Path:
    """Train as ``config`` says; returns the exported model folder (``<output_dir>/final``).

    ``components`` gives the models directly (else they are loaded from the paths in ``config``);
    ``task`` a task already built from them (:func:`make_task`), e.g. to evaluate its trainee after.
    The trained modules are trained in place. Under ``accelerate launch`` / ``torchrun`` every
    process calls this; only the main one writes.
    """
    if components is not None and task is not None:
        raise TypeError("pass components or a task built from them, not both")
    # accelerate is the optional "train" extra: imported here, not with the package.
    try:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
    except ImportError as error:
        raise OSError(
            "training needs the 'accelerate' package: pip install 'stable-cascade[train]' "
            "(or pip install accelerate)"
        ) from error

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    _shard_on_cpu(accelerator)
    try:
        return _Run(config, task or components, accelerator).run()
    finally:
        # Let the next train() in this process choose its own mixed precision (the state is global).
        AcceleratorState._reset_state()
        GradientState._reset_state()


class _Run:
    def __init__(
        self, config: TrainConfig, given: Task | Components | None, accelerator: Accelerator
    ) -> None:
        self.config, self.accelerator = config, accelerator
        self.rank, self.main = accelerator.process_index, accelerator.is_main_process
        self.sharded = accelerator.distributed_type == "FSDP"
        _seed_globals(config.seed + self.rank)
        self.generator = torch.Generator().manual_seed(config.seed + 1_000_003 * (self.rank + 1))
        ckpt.check_output_dir(config.output_dir, config.resume, FINAL)  # before any work
        self.resume = ckpt.resolve_resume(config.output_dir, config.resume) if config.resume else None
        self.step = int(ckpt.read_trainer_state(self.resume)["step"]) if self.resume else 0
        examples = find_examples(config.data)  # before loading models: data mistakes fail fast
        if not isinstance(given, Task):
            given = make_task(config, given or load_components(config))
        self.task: Task = given
        unsharded = {"lora": "LoRA trains few weights", "lcm": "its teacher and target run unsharded"}
        if config.task in unsharded and self.sharded:
            raise ValueError(f"{config.task} training with FSDP is not supported ({unsharded[config.task]}); "
                             "use DDP")  # fmt: skip
        if self.sharded and not accelerator.is_fsdp2:
            raise ValueError(
                "FSDP version 1 is not supported (the UNet's blocks compute their conditioning outside "
                "forward, which only FSDP2 gathers weights for); launch with --fsdp_version 2"
            )
        if config.gradient_checkpointing:
            _enable_checkpointing(self.task.trainee)
        dataset, groups = bucketed_dataset(
            examples, config.resolution, config.bucket_ratios, self.task.size_multiple
        )
        first = next(g for g in groups if g)
        self.reference = collate([dataset[i] for i in first[:4]])
        batches = BucketBatchSampler(
            groups, config.batch_size, config.seed, self.rank, accelerator.num_processes, start=self.step
        )
        self.loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=config.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
        )
        logger.info(
            "%d images, %d batches of %d per epoch and process",
            len(examples),
            len(batches),
            config.batch_size,
        )

    def run(self) -> Path:
        config, accelerator, trainee = self.config, self.accelerator, self.task.trainee
        if self.resume is not None:
            self._load_weights(self.resume)
        params = [p for p in trainee.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        warmup = config.warmup_steps
        scheduler = LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        weights = LossWeights(config.loss_weighting)
        model, stepper = accelerator.prepare(trainee, optimizer)
        if self.sharded:
            _gather_in_prepare(trainee)
        self.task.to(accelerator.device)
        ema = EMA(trainee, config.ema_decay) if config.ema_decay > 0 else None
        self.task.begin(ema)
        if self.resume is not None:
            self._load_state(self.resume, model, optimizer, scheduler, weights, ema)
        sampler = (
            Sampler(self.task, self.reference, config.seed) if config.sample_every and self.main else None
        )
        if sampler is not None and self.sharded:
            logger.warning("no sample images while training with FSDP (the sharded model cannot run alone)")
            sampler = None
        progress = tqdm(total=config.steps, initial=self.step, desc=self.task.name, disable=not self.main)
        batches, smoothed, started = iter(self.loader), None, time.perf_counter()
        while self.step < config.steps:
            inputs = self.task.prepare(next(batches), self.generator)
            with accelerator.autocast():
                out = model(**inputs)
            losses: Tensor = out["loss"]  # (B,)
            logsnr: Tensor | None = out.get("logsnr")
            loss = (losses * weights(logsnr)).mean() if logsnr is not None else losses.mean()
            value = float(accelerator.reduce(losses.detach().mean(), reduction="mean"))
            if not math.isfinite(value):  # every process sees the same reduced value and stops
                raise self._diverged(self.step + 1, f"the loss is {value}", float(scheduler.get_last_lr()[0]))
            accelerator.backward(loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            stepper.step()
            scheduler.step()
            stepper.zero_grad(set_to_none=True)
            if logsnr is not None:
                weights.update(accelerator.gather(logsnr.detach()), accelerator.gather(losses.detach()))
            if ema is not None:
                ema.update(trainee, self.step)
            self.step += 1
            smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
            progress.update(1)
            progress.set_postfix(
                loss=f"{value:.4f}", avg=f"{smoothed:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
            )
            if self.step % config.log_every == 0:
                rate = (self.step - progress.initial) / (time.perf_counter() - started)
                logger.info("step %d: loss %.5f (avg %.5f), %.2f it/s", self.step, value, smoothed, rate)
            if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                self._save(model, optimizer, scheduler, weights, ema)
            if sampler is not None and self.step % config.sample_every == 0:
                sampler(self.step, ema)
        progress.close()
        return self._export(model, ema, float(scheduler.get_last_lr()[0]))

    # -- checkpoints -------------------------------------------------------------------------------

    def _model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The trained tensors, full and on the CPU, for the main process (other processes get {});
        a collective under FSDP."""
        live = ckpt.trained_tensors(self.task.trainee)
        if not self.sharded:
            return {name: value.detach().cpu() for name, value in live.items()} if self.main else {}
        values = get_model_state_dict(model, options=_FULL)
        return {name: cast(Tensor, values[name]).detach().cpu() for name in live if name in values}

    def _save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        weights: LossWeights,
        ema: EMA | None,
    ) -> None:
        accelerator, folder = self.accelerator, ckpt.partial_folder(self.config.output_dir, self.step)

        def start() -> None:
            if self.main:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)

        self._written(start, folder)
        self._written(lambda: ckpt.save_rng(folder, self.rank, self.generator), folder)
        model_state = self._model_state(model)
        ema_state = ema.state_dict() if ema is not None and (self.main or self.sharded) else None
        self._check_finite({**model_state, **(ema_state or {})}, float(scheduler.get_last_lr()[0]), folder)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)

        def write() -> None:
            ckpt.save_tensors(folder / "model.safetensors", model_state)
            if ema_state is not None:
                ckpt.save_tensors(folder / "ema.safetensors", ema_state)
            ckpt.save_state(folder, optimizer_state, weights.state_dict())
            ckpt.write_trainer_state(
                folder,
                {
                    "step": self.step,
                    "data_position": self.step,  # batches consumed per process; the sampler resumes there
                    "world_size": accelerator.num_processes,
                    "scheduler": scheduler.state_dict(),
                    "config": self.config.to_dict(),
                },
            )
            logger.info("saved %s", ckpt.publish(folder))

        self._written(write if self.main else lambda: None, folder)

    def _written(self, write: Callable[[], None], partial: Path | None) -> None:
        """Run ``write`` on each process; when it fails on any (a full disk), every process raises an
        ``OSError`` and the ``partial`` checkpoint folder is removed (a collective: a barrier too)."""
        error: OSError | None = None
        try:
            write()
        except OSError as caught:
            error = caught
        flag = torch.tensor(float(error is not None), device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, reduction="sum")) > 0:
            if self.main and partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
            raise error or OSError("writing the checkpoint or the final model failed on another process")

    def _check_finite(self, state: dict[str, Tensor], lr: float, partial: Path | None = None) -> None:
        """Stop before writing weights that hold NaN/Inf (a collective: every process learns of it)."""
        bad = ckpt.non_finite_tensors(state)
        flag = torch.tensor(float(len(bad)), device=self.accelerator.device)
        if float(self.accelerator.reduce(flag, reduction="sum")) > 0:
            if partial is not None and self.main:
                shutil.rmtree(partial, ignore_errors=True)
            where = ", ".join(bad[:3]) or "on another process"
            raise self._diverged(self.step, f"the weights hold NaN/Inf ({where})", lr)

    def _diverged(self, step: int, what: str, lr: float) -> FloatingPointError:
        found = ckpt.checkpoints(self.config.output_dir)
        last = f"resume from {found[-1]}" if found else "start again"
        return FloatingPointError(
            f"training diverged at step {step}: {what}, so it stopped without saving that state (no "
            f"checkpoint, no {FINAL}/); lower the learning rate (now {lr:.2e}), keep grad_clip on, prefer "
            f"bf16 over fp16 and check the data, then {last}"
        )

    def _load_weights(self, folder: Path) -> None:
        state = read_state_dict([folder / "model.safetensors"])
        ckpt.check_resumable(state, folder / "model.safetensors")
        ckpt.assign_tensors(self.task.trainee, state, str(folder))
        logger.info("resuming from %s at step %d", folder, self.step)

    def _load_state(
        self,
        folder: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LambdaLR,
        weights: LossWeights,
        ema: EMA | None,
    ) -> None:
        saved = ckpt.read_trainer_state(folder)
        before, now = saved.get("config", {}), self.config.to_dict()
        changed = sorted(k for k in now if k not in _FREE_ON_RESUME and before.get(k) != now[k])
        if changed:
            logger.warning(
                "resuming with changed settings (%s): the continuation is not exact", ", ".join(changed)
            )
        if saved.get("world_size", 1) != self.accelerator.num_processes:
            raise ValueError(
                f"{folder} was written by {saved.get('world_size')} process(es), this run has "
                f"{self.accelerator.num_processes}; resume with the same number for an exact continuation"
            )
        optimizer_state, weight_state = ckpt.load_state(folder)
        parameters = ckpt.parameters_by_name(model)
        ckpt.check_optimizer_state(optimizer_state, parameters, str(folder / "state.safetensors"))
        set_optimizer_state_dict(
            model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
        )
        scheduler.load_state_dict(saved["scheduler"])
        if weight_state:
            weights.load_state_dict(weight_state)
        if ema is not None:
            path = folder / "ema.safetensors"
            if path.is_file():
                ema_state = read_state_dict([path])
                ckpt.check_resumable(ema_state, path)
                ema.load_state_dict(ema_state)
            else:
                logger.warning("%s has no EMA; the EMA starts from the current weights", folder)
        ckpt.load_rng(folder, self.rank, self.generator)

    def _export(self, model: nn.Module, ema: EMA | None, lr: float) -> Path:
        state = self._model_state(model)
        if ema is not None and (self.main or self.sharded):
            state.update(ema.state_dict())
        self._check_finite(state, lr)
        directory = self.config.output_dir / FINAL

        def export() -> None:
            with atomic_folder(directory, replace=True) as temporary:  # a full disk leaves no part
                self.task.export(temporary, state)
            logger.info("exported %s to %s", self.task.name, directory)

        self._written(export if self.main else lambda: None, None)
        return directory


def _shard_on_cpu(accelerator: Accelerator) -> None:
    """FSDP for CPU processes (gloo), which accelerate leaves unsharded: torch's ``fully_shard`` runs
    there too, so ``accelerate launch --use_fsdp`` on CPUs shards as it does on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()


def _gather_in_prepare(trainee: nn.Module) -> None:
    """The UNet and its blocks compute their conditioning in ``prepare``, outside ``forward``: under
    FSDP a sharded module must gather its weights for it as it does for ``forward``."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    for module in trainee.modules():
        if isinstance(module, FSDPModule) and callable(getattr(module, "prepare", None)):
            register_fsdp_forward_method(module, "prepare")


def _seed_globals(seed: int) -> None:
    """Seed the global RNGs (dropout, anything outside our generator); saved with every checkpoint."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _enable_checkpointing(trainee: nn.Module) -> None:
    """Ours (the UNets) and transformers' models (the text encoder; renamed in transformers 5) name
    the switch differently."""
    for module in trainee.children():
        names = (
            "enable_gradient_checkpointing",
            "activation_checkpointing_enable",
            "gradient_checkpointing_enable",
        )
        for name in names:
            switch = getattr(module, name, None)
            if callable(switch):
                switch()
                break
