"""Step 7 of the demo recipe: an LCM LoRA per stage, distilled from the finished Stage C and Stage B.

:func:`distil_lcm` runs it inside :func:`~stable_cascade.demo.recipe.train_demo`; :func:`train_demo_lcm`
runs it alone on a finished model (``stable-cascade demo train OUT --lcm-only``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from stable_cascade.checkpoint import save_tensors_file
from stable_cascade.checkpoint.atomic import atomic_folder, write_text
from stable_cascade.demo.configs import train_config
from stable_cascade.demo.settings import DEMO_SIZE, LCM_FOLDER, Recipe
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.shapes import write_dataset
from stable_cascade.training import Components, TrainConfig, train
from stable_cascade.training.config import LCMStage

logger = logging.getLogger(__name__)

#: ``timed(name, config, parts=None)``: a training run, its time recorded under ``name``.
Timed = Callable[..., Path]


def timer(times: dict[str, float]) -> Timed:
    """A ``timed`` that records each run's seconds in ``times``."""

    def timed(name: str, config: TrainConfig, parts: Components | None = None) -> Path:
        begin = time.perf_counter()
        logger.info("training %s", name)
        result = train(config, parts)
        times[name] = time.perf_counter() - begin
        return result

    return timed


def lcm_config(recipe: Recipe, stage: LCMStage, data: Path, model: Path, out: Path) -> TrainConfig:
    """The LCM LoRA of one stage (``c`` or ``b``) of the demo cascade in ``model``: its raw weights (no
    EMA, no warm-up: the run is short), the stage's batch size, its teacher's guidance range."""
    return train_config(
        recipe,
        "lcm",
        data,
        out,
        teacher=model / ("prior" if stage == "c" else "decoder"),
        lcm_stage=stage,
        steps=recipe.lcm_steps,
        lora_rank=recipe.lcm_rank,
        lcm_teacher_steps=recipe.lcm_teacher_steps,
        batch_size=recipe.stage_c_batch_size if stage == "c" else recipe.batch_size,
        effnet_scale=(recipe.effnet_scale, recipe.effnet_scale),
        ema_decay=0.0,
        warmup_steps=0,
    )


def distil_lcm(recipe: Recipe, data: Path, model: Path, out: Path, timed: Timed, folder: Path) -> None:
    """Distil both LCM LoRAs of the demo cascade in ``model`` (the teacher) in ``out/lcm_{c,b}`` and
    write them, in float16, as ``folder/{prior,decoder}.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    stages: tuple[tuple[LCMStage, str], ...] = (("c", "prior"), ("b", "decoder"))
    for stage, name in stages:
        final = timed(f"lcm-{stage}", lcm_config(recipe, stage, data, model, out / f"lcm_{stage}"))
        half_lora(final / "lora.safetensors", folder / f"{name}.safetensors")


def half_lora(source: Path, target: Path) -> None:
    """A copy of a LoRA file with its down/up weights in float16 (half the size; loading casts back)."""
    with safe_open(str(source), framework="pt") as file:
        metadata = dict(file.metadata() or {})
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118  (not a dict)
    halved = {key: value if key.endswith(".alpha") else value.half() for key, value in tensors.items()}
    save_tensors_file(halved, target, metadata)


def train_demo_lcm(out: Path, recipe: Recipe | None = None, model: Path = DEMO_DIR) -> Path:
    """Only step 7 on a finished demo cascade (the shipped one by default): renders the data set under
    ``out`` and writes ``out/model/lcm/`` with the LoRAs and a ``training.json`` of the recipe's LCM
    fields and the times."""
    recipe = recipe or Recipe()
    out = Path(out)
    times: dict[str, float] = {}
    start = time.perf_counter()
    data = write_dataset(out / "data", recipe.images, size=DEMO_SIZE, seed=recipe.seed)
    times["data"] = time.perf_counter() - start
    target = out / "model" / LCM_FOLDER
    with atomic_folder(target, replace=True) as folder:
        distil_lcm(recipe, data, Path(model), out, timer(times), folder)
        fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k.startswith("lcm_") or k == "seed"}
        write_text(folder / "training.json", json.dumps({"recipe": fields, "seconds": times}, indent=2))
    logger.info("LCM LoRAs written to %s (%s)", target, ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return target
