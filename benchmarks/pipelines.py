"""Whole pipeline calls, ours vs diffusers, on identical random weights, interleaved in one process.

What a user calls: ``StableCascadePriorPipeline``, ``StableCascadeDecoderPipeline`` and
``StableCascadeCombinedPipeline`` of both libraries, built from the same configurations with the
same weight tensors (the UNets and Stage A through ``harness.twin_*``; one random CLIP text encoder
and one tokenizer shared by both sides). Each call includes the text encoding, the latents, the
sampling loop, for the decoder the Stage A decode and the conversion to the output type. Calls are
interleaved after a warm-up; the table gives medians, ours / diffusers (below 1: we are faster), the
same of each side's fastest round (on a shared machine the least disturbed one) and the largest
output difference. Then one more call of ours per pipeline runs under
``stable_cascade.sampling.phases.record_phases`` and prints where its time went, by phase.

Setups: ``mid`` is the issue's configuration (Stage B: 4 levels, 64–256 channels, from 12×12 image
embeddings to a 512² image; Stage C: 2 levels of width 512, 12×12); ``lite`` is closer to Stage B
lite (its 4 levels, attention from level 1 on and repeat mappers, at half its width and ~40 % of its
depth; 6×6 embeddings to a 256² image; Stage C: lite's width 1536, 3 + 3 blocks); ``tiny`` checks the
script in seconds. Defaults: 5 steps per stage, no guidance, PIL output, fp32.

    python benchmarks/pipelines.py                                  # CPU, mid and lite, 5 rounds
    python benchmarks/pipelines.py --setups tiny --repeats 1        # smoke run
    python benchmarks/pipelines.py --device cuda --dtype bfloat16 --batches 1 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import harness  # first: it puts this checkout on sys.path
import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

import stable_cascade
from stable_cascade import (
    DDPMWuerstchenScheduler,
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
)
from stable_cascade.checkpoint.atomic import write_text
from stable_cascade.sampling.phases import record_phases
from stable_cascade.specs import UNET_VARIANTS

PIPELINES = ("prior", "decoder", "combined")
SIDES = ("ours", "diffusers")
PROMPT = "a photograph of a red fox in the snow, highly detailed"
TOKENIZER = Path(stable_cascade.__file__).parent / "demo" / "model" / "prior" / "tokenizer"


@dataclasses.dataclass(frozen=True)
class PipelineSetup:
    cascade: harness.Setup  # the three models (its latent sizes are not used here)
    image: int  # the image side; Stage C's latent is ceil(image / 42.67), Stage B's image / 4
    text_layers: int = 2  # of the shared random CLIP text encoder (CLIP bigG's width, 1280)


SETUPS: dict[str, PipelineSetup] = {
    "mid": PipelineSetup(harness.SETUPS["mid"], 512),
    "lite": PipelineSetup(
        dataclasses.replace(
            harness.SETUPS["lite"],
            prior=UNET_VARIANTS["prior_lite"].replace(
                down_num_layers_per_block=(1, 2), up_num_layers_per_block=(2, 1)
            ),
            decoder=UNET_VARIANTS["decoder_lite"].replace(
                block_out_channels=(160, 288, 576, 576),
                num_attention_heads=(0, 9, 9, 9),
                down_num_layers_per_block=(2, 4, 6, 4),
                up_num_layers_per_block=(4, 6, 4, 2),
            ),
        ),
        256,
    ),
    "tiny": PipelineSetup(harness.SETUPS["tiny"], 256),
}


# -- building both sides ------------------------------------------------------------------------------


def text_parts(setup: PipelineSetup, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """The tokenizer (the demo's, at CLIP's 77 tokens) and a random CLIP text encoder of the UNets' width."""
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER, model_max_length=77)
    width = setup.cascade.prior.clip_text_in_channels or setup.cascade.prior.clip_text_pooled_in_channels
    heads = max(1, width // 64)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=heads if width % heads == 0 else 1,
        num_hidden_layers=setup.text_layers,
        projection_dim=setup.cascade.prior.clip_text_pooled_in_channels,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    encoder = CLIPTextModelWithProjection(config).to(device, dtype).eval().requires_grad_(False)
    return tokenizer, encoder


def build(setup: PipelineSetup, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    """{side: {pipeline: the pipeline}}; the combined pipelines share their sides' models."""
    theirs_c, ours_c = harness.twin_unets(setup.cascade.prior, device, dtype, seed=0)
    theirs_b, ours_b = harness.twin_unets(setup.cascade.decoder, device, dtype, seed=1)
    theirs_a, ours_a = harness.twin_vqgans(setup.cascade.vqgan, device, dtype, seed=2)
    tokenizer, text_encoder = text_parts(setup, device, dtype)
    sides: dict[str, dict[str, Any]] = {}
    for side, (c, b, a, module, scheduler) in {
        "ours": (ours_c, ours_b, ours_a, stable_cascade, DDPMWuerstchenScheduler),
        "diffusers": (theirs_c, theirs_b, theirs_a, diffusers, diffusers.DDPMWuerstchenScheduler),
    }.items():
        prior = module.StableCascadePriorPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, prior=c, scheduler=scheduler()
        )
        decoder = module.StableCascadeDecoderPipeline(
            decoder=b, tokenizer=tokenizer, text_encoder=text_encoder, scheduler=scheduler(), vqgan=a
        )
        combined = module.StableCascadeCombinedPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            decoder=b,
            scheduler=scheduler(),
            vqgan=a,
            prior_prior=c,
            prior_text_encoder=text_encoder,
            prior_tokenizer=tokenizer,
            prior_scheduler=scheduler(),
        )
        sides[side] = {"prior": prior, "decoder": decoder, "combined": combined}
        for pipe in sides[side].values():
            pipe.set_progress_bar_config(disable=True)  # both: no bar on the benchmark's output
    assert isinstance(sides["ours"]["combined"], StableCascadeCombinedPipeline)
    assert isinstance(sides["ours"]["decoder"], StableCascadeDecoderPipeline)
    assert isinstance(sides["ours"]["prior"], StableCascadePriorPipeline)
    return sides


def calls(
    setup: PipelineSetup, pipes: dict[str, Any], batch: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Callable[[], Any]]:
    """One argument-free call per pipeline, with the same arguments and a fresh seeded generator."""
    prompts = [PROMPT] * batch
    side = -(-setup.image * 100 // 4267)  # ceil(image / 42.67): Stage C's latent side
    generator = torch.Generator("cpu").manual_seed(7)
    embeddings = torch.randn(batch, 16, side, side, generator=generator).to(device, pipes["prior"].dtype)
    steps, guidance = args.steps, args.guidance

    def seeded() -> torch.Generator:
        return torch.Generator("cpu").manual_seed(0)

    size = {"height": setup.image, "width": setup.image}
    return {
        "prior": lambda: (
            pipes["prior"](
                prompts, **size, num_inference_steps=steps, guidance_scale=guidance, generator=seeded()
            ).image_embeddings
        ),
        "decoder": lambda: (
            pipes["decoder"](
                embeddings,
                prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=seeded(),
                output_type=args.output_type,
            ).images
        ),
        "combined": lambda: (
            pipes["combined"](
                prompts,
                **size,
                prior_num_inference_steps=steps,
                num_inference_steps=steps,
                prior_guidance_scale=guidance,
                decoder_guidance_scale=guidance,
                generator=seeded(),
                output_type=args.output_type,
            ).images
        ),
    }


# -- measuring -----------------------------------------------------------------------------------------


def as_array(images: Any) -> np.ndarray:
    if isinstance(images, list):
        return np.stack([np.asarray(image, dtype=np.float32) for image in images])
    if isinstance(images, torch.Tensor):
        return images.float().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def breakdown(run: Callable[[], Any], device: torch.device) -> tuple[float, dict[str, float]]:
    """One call of ours under the phase recorder: its total seconds and seconds per phase."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    with record_phases(sync) as phases:
        harness.synchronize(device)
        start = time.perf_counter()
        run()
        harness.synchronize(device)
        total = time.perf_counter() - start
    return total, phases.totals()


def bench(
    name: str, batch: int, args: argparse.Namespace, sides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    setup, device = SETUPS[name], torch.device(args.device)
    runs = {side: calls(setup, sides[side], batch, args, device) for side in SIDES}
    results: dict[str, Any] = {"setup": name, "batch": batch, "pipelines": {}}
    with torch.inference_mode():
        for pipeline in args.pipelines:
            timed = {side: runs[side][pipeline] for side in SIDES}
            samples = harness.interleaved(timed, args.repeats, device)
            seconds, best = harness.medians(samples), harness.bests(samples)
            outputs = {side: as_array(run()) for side, run in timed.items()}
            total, phases = breakdown(timed["ours"], device)
            results["pipelines"][pipeline] = {
                "seconds": seconds,
                "samples": samples,
                "ratio": seconds["ours"] / seconds["diffusers"],
                "best_s": best,
                "best_ratio": best["ours"] / best["diffusers"],
                "max_abs_diff": float(np.abs(outputs["ours"] - outputs["diffusers"]).max()),
                "breakdown_total_s": total,
                "phases_s": phases,
            }
            print_pipeline(name, batch, pipeline, results["pipelines"][pipeline])
    return results


def print_pipeline(name: str, batch: int, pipeline: str, result: dict[str, Any]) -> None:
    seconds, n = result["seconds"], len(result["samples"]["ours"])
    print(
        f"\n{name}, batch {batch}, {pipeline}: ours {seconds['ours']:.3f} s, diffusers "
        f"{seconds['diffusers']:.3f} s (medians of {n}), ours / diffusers {result['ratio']:.3f} (of the "
        f"fastest rounds: {result['best_ratio']:.3f}), max |ours - diffusers| {result['max_abs_diff']:.2e}"
    )
    total, phases = result["breakdown_total_s"], result["phases_s"]
    print(f"  ours, one more call by phase ({total * 1e3:.1f} ms in all):")
    rest = total - sum(phases.values())
    for phase, value in [*phases.items(), ("rest of the call (arguments, latents, hand-over)", rest)]:
        print(f"    {phase:50} {value * 1e3:9.2f} ms  {100 * value / total:5.1f} %")


def summary(results: list[dict[str, Any]]) -> None:
    header = "setup  batch  pipeline   ours s   diffusers s   ours / diffusers"
    print(f"\n{header}   fastest: ours s  diffusers s  ratio")
    for result in results:
        for pipeline, r in result["pipelines"].items():
            s = r["seconds"]
            print(
                f"{result['setup']:6} {result['batch']:5}  {pipeline:9} {s['ours']:7.3f} "
                f"{s['diffusers']:12.3f} {r['ratio']:18.3f} {r['best_s']['ours']:17.3f} "
                f"{r['best_s']['diffusers']:12.3f} {r['best_ratio']:6.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=["mid", "lite"], choices=sorted(SETUPS))
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="per stage")
    parser.add_argument("--guidance", type=float, default=1.0, help="both stages (> 1: CFG)")
    parser.add_argument("--output-type", default="pil", choices=["pil", "np", "pt"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write all numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, {where}, {args.dtype}, "
        f"{args.steps} steps per stage, guidance {args.guidance}, output {args.output_type}, medians of "
        f"{args.repeats} interleaved rounds; load average at the start: {load:.2f}; OMP_WAIT_POLICY: "
        f"{os.environ.get('OMP_WAIT_POLICY', 'not set')}"
    )
    results = []
    for name in args.setups:
        sides = build(SETUPS[name], device, dtype)
        results += [bench(name, batch, args, sides) for batch in args.batches]
        del sides
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary(results)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.2f}")
    if args.json:
        write_text(args.json, json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
