"""Shared pieces of the cascade benchmark: setups, twin models, both sampling loops, measurements.

Both implementations get the same random weights (ours is assigned diffusers' tensors, so they are
shared, not copied). Ours samples through ``run_stage``, the loop of our pipelines; diffusers through
the loop body of its ``StableCascadePriorPipeline`` / ``StableCascadeDecoderPipeline`` (UNet call on
the CFG-doubled batch, ``lerp``, ``DDPMWuerstchenScheduler.step``) and its Stage A decode.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers import StableCascadeUNet as DiffusersUNet
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import (
    PaellaVQModel as DiffusersVQ,
)
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, not an installed copy
from stable_cascade import PaellaVQModel, StableCascadeUNet
from stable_cascade.diffusion.presets import StageSettings
from stable_cascade.sampling.loop import run_stage
from stable_cascade.specs import (
    UNET_VARIANTS,
    VQ_VARIANTS,
    SchedulerConfig,
    UNetConfig,
    VQConfig,
)

Tensors = dict[str, torch.Tensor]
_U = UNET_VARIANTS


@dataclasses.dataclass(frozen=True)
class Setup:
    """One cascade to benchmark: the three models and the latent sizes of a generation."""

    prior: UNetConfig
    decoder: UNetConfig
    vqgan: VQConfig
    prior_size: tuple[int, int]  # Stage C latent (also Stage B's effnet input)
    decoder_size: tuple[int, int]  # Stage B latent; the image is 4x larger


SETUPS: dict[str, Setup] = {
    # The real structure scaled down for a CPU: Stage C with two CTA levels at the real 24x24 latent
    # (a 1024x1024 image), Stage B with four levels and repeat mappers at a 128x128 latent (a 512x512
    # image), the real Stage A.
    "mid": Setup(
        UNET_VARIANTS["prior"].replace(
            conditioning_dim=512,
            block_out_channels=(512, 512),
            num_attention_heads=(8, 8),
            down_num_layers_per_block=(2, 4),
            up_num_layers_per_block=(4, 2),
        ),
        UNET_VARIANTS["decoder"].replace(
            block_out_channels=(64, 128, 256, 256),
            num_attention_heads=(0, 0, 4, 4),
            down_num_layers_per_block=(1, 2, 4, 2),
            up_num_layers_per_block=(2, 4, 2, 1),
        ),
        VQ_VARIANTS["vqgan"],
        (24, 24),
        (128, 128),
    ),
    "full": Setup(
        UNET_VARIANTS["prior"], UNET_VARIANTS["decoder"], VQ_VARIANTS["vqgan"], (24, 24), (256, 256)
    ),
    "lite": Setup(
        UNET_VARIANTS["prior_lite"], UNET_VARIANTS["decoder_lite"], VQ_VARIANTS["vqgan"], (24, 24), (256, 256)
    ),
    # For checking the scripts on a CPU in seconds.
    "tiny": Setup(
        UNET_VARIANTS["tiny_prior"],
        UNET_VARIANTS["tiny_decoder"],
        VQ_VARIANTS["tiny_vqgan"],
        (8, 8),
        (32, 32),
    ),
}


diffusers.utils.logging.set_verbosity_error()  # its dtype-cast notices would interleave the tables


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models ------------------------------------------------------------------------------------------


def _randomize_(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Small random values for every parameter (diffusers zero-initialises some gains), on device."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)


def _twins(
    theirs_cls: Any,
    ours_cls: Any,
    config: Any,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    scale: float,
) -> tuple[Any, Any]:
    """diffusers' model with random weights and ours holding the very same tensors."""
    with torch.device(device):
        theirs = theirs_cls(**config.to_dict())
    _randomize_(theirs, seed, scale)
    theirs = theirs.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = ours_cls(config)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return theirs, ours.eval().requires_grad_(False)


def twin_unets(
    config: UNetConfig, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[DiffusersUNet, StableCascadeUNet]:
    return _twins(DiffusersUNet, StableCascadeUNet, config, device, dtype, seed, scale=0.02)


def twin_vqgans(
    config: VQConfig, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[DiffusersVQ, PaellaVQModel]:
    return _twins(DiffusersVQ, PaellaVQModel, config, device, dtype, seed, scale=0.05)


# -- inputs and loops ----------------------------------------------------------------------------------


def prior_conditioning(
    config: UNetConfig, batch: int, device: torch.device, dtype: torch.dtype
) -> list[Tensors]:
    """[cond, uncond] text/image embeddings for Stage C (zero image embeddings, as the pipeline)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    branches = []
    for _ in range(2):
        branch = {
            "clip_text": torch.randn(batch, 77, config.clip_text_in_channels or 0, generator=g),
            "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g),
            "clip_img": torch.zeros(batch, 1, config.clip_image_in_channels or 0),
        }
        branches.append({k: v.to(device, dtype) for k, v in branch.items()})
    return branches


def decoder_conditioning(
    config: UNetConfig, batch: int, effnet_size: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> Tensors:
    g = torch.Generator(device="cpu").manual_seed(2)
    cond = {
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g),
        "effnet": torch.randn(batch, config.effnet_in_channels or 0, *effnet_size, generator=g),
    }
    return {k: v.to(device, dtype) for k, v in cond.items()}


def latents(
    config: UNetConfig, batch: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(3)
    return torch.randn(batch, config.in_channels, *size, generator=g).to(device, dtype)


def ours_loop(
    unet: StableCascadeUNet,
    cond: Tensors,
    uncond: Tensors | None,
    x: torch.Tensor,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Our pipelines' loop: ``run_stage`` with diffusers' schedule and DDPM (the 'diffusers' preset)."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    settings = StageSettings(steps, guidance)
    return run_stage(unet, cond, uncond, x, settings, SchedulerConfig(), generator)


def diffusers_loop(
    unet: DiffusersUNet, cond: Tensors, uncond: Tensors | None, x: torch.Tensor, steps: int, guidance: float
) -> torch.Tensor:
    """The denoising loop of diffusers' Stable Cascade pipelines, statement for statement."""
    generator = torch.Generator(device=x.device).manual_seed(0)
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(steps, device=x.device)
    cfg = guidance > 1
    conditioning = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()} if cfg and uncond else cond
    for t in scheduler.timesteps[:-1]:
        ratio = t.expand(x.size(0)).to(x.dtype)
        predicted = unet(
            sample=torch.cat([x] * 2) if cfg else x,
            timestep_ratio=torch.cat([ratio] * 2) if cfg else ratio,
            **conditioning,
            return_dict=False,
        )[0]
        if cfg:
            text, uncond_pred = predicted.chunk(2)
            predicted = torch.lerp(uncond_pred, text, guidance)
        x = scheduler.step(model_output=predicted, timestep=ratio, sample=x, generator=generator).prev_sample
    return x


def decode(vqgan: Any, x: torch.Tensor, **options: Any) -> torch.Tensor:
    """Stage A as both decoder pipelines call it: scale, decode, clamp to [0, 1]."""
    return vqgan.decode(vqgan.config.scale_factor * x, **options).sample.clamp(0, 1)


# -- measurements ------------------------------------------------------------------------------------


def interleaved(
    runs: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    first_calls: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each repetition of each run, after ``warmup`` untimed ones. Every round runs each
    once, in alternating order, so that load from other processes hits all of them alike.
    ``first_calls`` receives the seconds of each run's first call (with compilation, if any)."""
    for name, run in runs.items():
        for i in range(warmup):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if i == 0 and first_calls is not None:
                first_calls[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def bests(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: min(values) for name, values in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def peak_memory(run: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB) the run adds: CUDA allocator peak, or the peak RSS rise on the CPU.

    On the CPU, freed heap memory is returned to the OS first (``malloc_trim``) and a thread samples
    the resident set size every millisecond while ``run`` executes.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if Path("/proc/self/statm").exists():
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = peak = _rss_bytes()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return (max(peak, _rss_bytes()) - base) / 2**20


def _cpu_sdpa_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_flop_count(query, key, value)


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attention in ``run`` (CPU attention counted too)."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops()


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """The machine's dense matmul throughput (FLOP/s) for ``dtype``: the best of a few n x n ``mm``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
