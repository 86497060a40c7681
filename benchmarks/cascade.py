"""Stable Cascade sampling loops, ours vs diffusers, on identical random weights, in one process.

Stage C: 20 DDPM steps with classifier-free guidance 4 (the UNet runs on the doubled batch), as the
prior pipeline. Stage B: 10 steps without guidance, then the Stage A decode, as the decoder
pipeline. Runs are interleaved after a warm-up; the numbers are medians. Per stage it reports the
loop time, the time per step, the peak memory the loop adds, the FLOPs of one step (diffusers'
UNet forward: the work; ours skips the step-invariant part), the achieved FLOP/s against the
machine's dense matmul throughput, and ours/diffusers (below 1: we are faster).

    python benchmarks/cascade.py                                   # CPU, float32, the "mid" setup
    python benchmarks/cascade.py --setups tiny --repeats 1         # smoke run (seconds)
    python benchmarks/cascade.py --device cuda --dtype bfloat16 --setups full lite --batches 1 4
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import harness  # first: it puts this checkout on sys.path
import torch

from stable_cascade import StableCascadeUNet
from stable_cascade.nn.fp8 import fp8_supported
from stable_cascade.specs import UNetConfig

Result = dict[str, Any]
SIDES = ("ours", "diffusers")
#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device name, for "% of peak".
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def _twin(unet: StableCascadeUNet) -> StableCascadeUNet:
    """Another instance of ours on the same weight tensors."""
    with torch.device("meta"):
        twin = StableCascadeUNet(unet.config)
    twin.load_state_dict(unet.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


#: What a ``--variants`` entry may combine with "+": set_fast_math, CUDA graphs, regional compile, FP8.
FEATURES = ("fast", "graphs", "regional", "fp8")


def skip_reason(features: set[str], device: torch.device) -> str | None:
    """Why a variant cannot run here, or None."""
    if features & {"graphs", "fp8"} and device.type != "cuda":
        return "no CUDA"
    if "fp8" in features and not fp8_supported(device):
        return "this GPU has no FP8 matmuls (compute capability 9.0 needed)"
    return None


def variant(ours: StableCascadeUNet, features: set[str], args: argparse.Namespace) -> StableCascadeUNet:
    """A twin of ours with the features on; FP8 applies to Stage C only (its big linears)."""
    twin = _twin(ours)
    if "fast" in features:
        twin.set_fast_math()
    if "fp8" in features and not twin.config.is_stage_b:
        twin.enable_fp8()
    if "regional" in features:
        twin.compile(mode=args.compile or "default", dynamic=False, regional=True)
    if "graphs" in features:
        twin.enable_cuda_graphs()
    return twin


def unets(config: UNetConfig, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The UNets to race: diffusers', ours on the same weights and the variants asked for."""
    device = torch.device(args.device)
    theirs, ours = harness.twin_unets(config, device, getattr(torch, args.dtype), seed)
    models: dict[str, Any] = {"ours": ours, "diffusers": theirs}
    if args.fast_math:
        models["ours, fast math"] = _twin(ours)
        models["ours, fast math"].set_fast_math()
    if args.compile and not args.variants:
        name = "ours, regional" if args.regional else "ours, compiled"
        models[name] = _twin(ours)
        models[name].compile(mode=args.compile, dynamic=False, regional=args.regional)
    for spec in args.variants:
        features = set(spec.split("+"))
        if unknown := features - set(FEATURES):
            raise SystemExit(f"unknown variant feature(s) {sorted(unknown)} in {spec!r}; use {FEATURES}")
        if reason := skip_reason(features, device):
            print(f"ours, {spec}: skipped: {reason}")
            continue
        models[f"ours, {spec}"] = variant(ours, features, args)
    return models


def max_differences(runs: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """Each run's largest absolute difference from ours (same inputs, same seed); ours: its own scale."""
    outputs = {name: run().float() for name, run in runs.items()}
    reference = outputs["ours"]
    differences = {name: (out - reference).abs().max().item() for name, out in outputs.items()}
    differences["ours"] = reference.abs().max().item()
    return differences


def bench_prior(setup: harness.Setup, models: dict[str, Any], batch: int, args: argparse.Namespace) -> Result:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    steps, guidance = 20, 4.0
    cond, uncond = harness.prior_conditioning(setup.prior, batch, device, dtype)
    x = harness.latents(setup.prior, batch, setup.prior_size, device, dtype)

    def loop(name: str) -> Callable[[], object]:
        run = harness.diffusers_loop if name == "diffusers" else harness.ours_loop
        return lambda: run(models[name], cond, uncond, x, steps, guidance)

    runs = {name: loop(name) for name in models}
    # One step's UNet call: the doubled batch [cond; uncond].
    doubled = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()}
    x2, r2 = torch.cat([x, x]), torch.full((2 * batch,), 0.5, device=device, dtype=dtype)
    ours, theirs = models["ours"], models["diffusers"]
    with torch.inference_mode():
        first: dict[str, float] = {}
        samples = harness.interleaved(runs, args.repeats, device, first_calls=first)
        memory = {name: harness.peak_memory(run, device) for name, run in runs.items()}
        differences = max_differences(runs)
        cache = ours.prepare(x2.shape[-2:], **doubled)
        flops = {
            "diffusers": harness.count_flops(lambda: theirs(x2, r2, **doubled)),
            "ours": harness.count_flops(lambda: ours(x2, r2, cache=cache)),
        }
    return {
        "stage": "C",
        "what": f"{steps} steps, CFG {guidance} (UNet batch {2 * batch}), latent {x.shape[-2]}x{x.shape[-1]}",
        "batch": batch,
        "steps": steps,
        "loop_s": harness.medians(samples),
        "loop_best_s": harness.bests(samples),
        "loop_samples_s": samples,
        "first_call_s": first,
        "step_ms": {k: v / steps * 1e3 for k, v in harness.medians(samples).items()},
        "peak_mib": memory,
        "max_abs_diff": differences,
        "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
    }


def bench_decoder(
    setup: harness.Setup, models: dict[str, Any], vqgans: dict[str, Any], batch: int, args: argparse.Namespace
) -> Result:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    steps = 10
    cond = harness.decoder_conditioning(setup.decoder, batch, setup.prior_size, device, dtype)
    x = harness.latents(setup.decoder, batch, setup.decoder_size, device, dtype)

    def stage_b(name: str) -> Callable[[], torch.Tensor]:
        run = harness.diffusers_loop if name == "diffusers" else harness.ours_loop
        return lambda: run(models[name], cond, None, x, steps, 0.0)

    def vqgan(name: str) -> Any:
        return vqgans["diffusers" if name == "diffusers" else "ours"]

    loops = {name: stage_b(name) for name in models}
    runs = {name: (lambda n=name: harness.decode(vqgan(n), loops[n]())) for name in models}
    decodes = {name: (lambda n=name: harness.decode(vqgan(n), x)) for name in SIDES}
    tile = max(8, min(x.shape[-2:]) // 2)
    tiled = {"ours": lambda: harness.decode(vqgans["ours"], x, tile_size=tile)}
    r = torch.full((batch,), 0.5, device=device, dtype=dtype)
    ours, theirs = models["ours"], models["diffusers"]
    timed = {
        **{f"B+A|{n}": run for n, run in runs.items()},
        **{f"B|{n}": run for n, run in loops.items()},
        **{f"A|{n}": run for n, run in {**decodes, "ours, tiled": tiled["ours"]}.items()},
    }
    with torch.inference_mode():
        first: dict[str, float] = {}
        samples = harness.interleaved(timed, args.repeats, device, first_calls=first)  # same rounds
        part = {
            kind: {k.split("|")[1]: v for k, v in samples.items() if k.startswith(kind + "|")}
            for kind in ("B+A", "B", "A")
        }
        seconds, loop_s, decode_s = (harness.medians(part[kind]) for kind in ("B+A", "B", "A"))
        memory = {name: harness.peak_memory(run, device) for name, run in runs.items()}
        differences = max_differences(runs)
        decode_memory = {name: harness.peak_memory(run, device) for name, run in decodes.items()}
        decode_memory["ours, tiled"] = harness.peak_memory(tiled["ours"], device)
        cache = ours.prepare(x.shape[-2:], **cond)
        flops = {
            "diffusers": harness.count_flops(lambda: theirs(x, r, **cond)),
            "ours": harness.count_flops(lambda: ours(x, r, cache=cache)),
        }
        decode_flops = harness.count_flops(decodes["diffusers"])
    return {
        "stage": "B+A",
        "what": f"{steps} steps, no CFG (batch {batch}), latent {x.shape[-2]}x{x.shape[-1]}, then Stage A",
        "batch": batch,
        "steps": steps,
        "loop_s": seconds,
        "loop_best_s": harness.bests(part["B+A"]),
        "loop_samples_s": part["B+A"],
        "first_call_s": {k.split("|")[1]: v for k, v in first.items() if k.startswith("B+A|")},
        "stage_b_s": loop_s,
        "step_ms": {k: v / steps * 1e3 for k, v in loop_s.items()},
        "stage_a_s": decode_s,
        "stage_a_tile": tile,
        "peak_mib": memory,
        "max_abs_diff": differences,
        "stage_a_peak_mib": decode_memory,
        "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
        "stage_a_gflop": decode_flops / 1e9,
    }


def run_setup(name: str, args: argparse.Namespace, ceiling: float) -> list[Result]:
    """Every requested stage and batch of one setup; each stage's models are built once."""
    setup, device = harness.SETUPS[name], torch.device(args.device)
    results = []
    for stage in args.stages:
        if stage == "c":
            models = unets(setup.prior, args, seed=0)
            bench: Callable[[int], Result] = lambda b, m=models: bench_prior(setup, m, b, args)  # noqa: E731
        else:
            models = unets(setup.decoder, args, seed=1)
            theirs_a, ours_a = harness.twin_vqgans(setup.vqgan, device, getattr(torch, args.dtype), seed=2)
            vqgans = {"ours": ours_a, "diffusers": theirs_a}
            bench = lambda b, m=models, v=vqgans: bench_decoder(setup, m, v, b, args)  # noqa: E731
        for batch in args.batches:
            result = {"setup": name, **bench(batch)}
            print_result(result, ceiling)
            results.append(result)
        del models, bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def print_result(result: dict[str, Any], ceiling: float) -> None:
    """One table per stage: a column per implementation, then each of ours over diffusers'."""
    names = list(result["loop_s"])
    ours = [n for n in names if n != "diffusers"]
    work = result["gflop_per_step"]["diffusers"]  # the useful work of one step
    print(f"\nStage {result['stage']}: {result['what']}")
    header = "".join(f"{n:>17}" for n in names) + "".join(f"{n + ' / diff.':>24}" for n in ours)
    print(f"  {'':34}{header}")

    def row(label: str, values: dict[str, float], fmt: str = "{:17.1f}", ratios: bool = True) -> None:
        cells = "".join(fmt.format(values[n]) if n in values else f"{'':>17}" for n in names)
        base = values.get("diffusers") if ratios else None
        ratios = "".join(f"{values[n] / base:24.3f}" if n in values and base else f"{'':>24}" for n in ours)
        print(f"  {label:34}{cells}{ratios}")

    row(
        f"loop, median of {len(next(iter(result['loop_samples_s'].values())))} (s)",
        result["loop_s"],
        "{:17.3f}",
    )
    row("loop, best run (s)", result["loop_best_s"], "{:17.3f}")
    row("first call: compile/capture (s)", result["first_call_s"], "{:17.3f}")
    if "stage_a_s" in result:
        row("  Stage B alone (s)", result["stage_b_s"], "{:17.3f}")
        row("  Stage A decode alone (s)", result["stage_a_s"], "{:17.3f}")
    row("time per UNet step (ms)", result["step_ms"])
    row("peak memory added (MiB)", result["peak_mib"])
    row("max |output - ours| (ours: max |out|)", result["max_abs_diff"], "{:17.2e}", ratios=False)
    row("GFLOP per step executed", result["gflop_per_step"], "{:17.2f}")
    achieved = {n: work / (ms / 1e3) for n, ms in result["step_ms"].items()}
    row("useful GFLOP/s per step", achieved)
    row(
        f"% of mm ceiling ({ceiling / 1e9:.0f} GFLOP/s)",
        {n: 100 * a * 1e9 / ceiling for n, a in achieved.items()},
    )
    if "stage_a_gflop" in result:
        decode = {n: result["stage_a_gflop"] / s for n, s in result["stage_a_s"].items() if n in names}
        row("Stage A GFLOP/s", decode)
        row("Stage A peak memory added (MiB)", result["stage_a_peak_mib"])
        tiled, whole = result["stage_a_s"]["ours, tiled"], result["stage_a_s"]["ours"]
        peak, whole_peak = result["stage_a_peak_mib"]["ours, tiled"], result["stage_a_peak_mib"]["ours"]
        print(
            f"  ours, Stage A in {result['stage_a_tile']}² latent tiles: {tiled:.3f} s ({tiled / whole:.2f}x "
            f"untiled), peak {peak:.1f} MiB ({peak / whole_peak:.2f}x untiled)"
        )


def cascade_summary(results: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seconds per image and images per second of the whole cascade, per setup and batch."""
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    rows = []
    by_key: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for result in results:
        by_key.setdefault((result["setup"], result["batch"]), {})[result["stage"]] = result
    for (setup, batch), stages in by_key.items():
        if {"C", "B+A"} - set(stages):
            continue
        for side in stages["C"]["loop_s"]:
            if side not in stages["B+A"]["loop_s"]:
                continue
            total = stages["C"]["loop_s"][side] + stages["B+A"]["loop_s"][side]
            theirs = stages["C"]["loop_s"]["diffusers"] + stages["B+A"]["loop_s"]["diffusers"]
            c = stages["C"]
            c_flops = c["gflop_per_step"]["diffusers"] * 1e9 / (c["step_ms"][side] / 1e3)
            rows.append(
                {
                    "setup": setup,
                    "batch": batch,
                    "side": side,
                    "s_per_image": total / batch,
                    "images_per_s": batch / total,
                    "speedup_vs_diffusers": theirs / total,
                    "stage_c_tflops": c_flops / 1e12,
                    "stage_c_pct_of_peak": 100 * c_flops / (peak * 1e12) if peak else None,
                }
            )
    print(f"\nWhole cascade on {name} (dense {args.dtype} peak: {peak or 'n/a'} TFLOP/s)")
    for row in rows:
        pct = f"{row['stage_c_pct_of_peak']:.1f}%" if row["stage_c_pct_of_peak"] is not None else "n/a"
        print(
            f"  {row['setup']:5} batch {row['batch']}  {row['side']:28} {row['s_per_image']:7.3f} s/image  "
            f"{row['speedup_vs_diffusers']:5.2f}x diffusers  {row['images_per_s']:6.3f} images/s  "
            f"Stage C {row['stage_c_tflops']:7.2f} TFLOP/s ({pct} of peak)"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", nargs="+", default=["mid"], choices=sorted(harness.SETUPS))
    parser.add_argument("--stages", nargs="+", default=["c", "ba"], choices=["c", "ba"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fast-math", action="store_true", help="also time ours with unet.set_fast_math()")
    parser.add_argument("--compile", metavar="MODE", help="also time ours with unet.compile(mode=MODE)")
    parser.add_argument("--regional", action="store_true", help="with --compile: compile block by block")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        metavar="A+B",
        help=f"also time ours with these features combined, e.g. fast+graphs ({', '.join(FEATURES)}; "
        "regional compiles in --compile's mode, default 'default'; fp8: Stage C only)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for the dtype")
    parser.add_argument("--json", help="write all numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    # CPUs without bfloat16 matmul units take minutes for 4096^3 in bfloat16: measure a smaller one there.
    n = 4096 if device.type == "cuda" or dtype == torch.float32 else 1024
    ceiling = harness.matmul_ceiling(device, dtype, n)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, medians of {args.repeats} interleaved runs")
    print(f"dense {args.dtype} matmul ceiling ({n}^3 mm): {ceiling / 1e9:.0f} GFLOP/s")
    results = [result for name in args.setups for result in run_setup(name, args, ceiling)]
    summary = cascade_summary(results, args)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(
                {"ceiling_flops": ceiling, "args": vars(args), "results": results, "summary": summary},
                file,
                indent=2,
            )


if __name__ == "__main__":
    main()
