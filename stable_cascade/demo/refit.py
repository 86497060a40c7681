"""The image steps alone on a finished demo cascade (``stable-cascade demo train --images-only``): the
image encoder against its prior's text encoder, Stage C's image phase from its prior, the IP-Adapter on
the result, and the prior's LCM LoRA distilled again from it (Stage B and its LCM LoRA are unchanged:
the text encoder Stage B reads stays as it was). Much cheaper than :func:`train_demo` from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from stable_cascade.checkpoint import read_json_object
from stable_cascade.checkpoint.atomic import atomic_folder, atomic_path, write_text
from stable_cascade.demo.images import (
    image_encoder_step,
    image_prompt_data,
    ip_adapter_config,
    stage_c_image_run,
)
from stable_cascade.demo.lcm import half_lora, lcm_config, timer
from stable_cascade.demo.recipe import stage_c_config
from stable_cascade.demo.settings import DEMO_SIZE, IP_ADAPTER_FILE, LCM_FOLDER, Recipe
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.shapes import write_dataset

logger = logging.getLogger(__name__)
#: The recipe's fields of these steps, recorded in the model's ``training.json``.
IMAGE_FIELDS = ("image_encoder_", "stage_c_image_", "ip_adapter_")


def train_demo_images(out: Path, recipe: Recipe | None = None, model: Path = DEMO_DIR) -> Path:
    """Steps 5 and 8 of the recipe, and the prior's LCM LoRA again, on the demo cascade in ``model`` (the
    shipped one by default); writes ``out/model`` with ``prior/`` (its image encoder in it),
    ``ip_adapter.safetensors``, ``lcm/`` and ``training.json`` (``model``'s, these steps' times added)."""
    recipe = recipe or Recipe()
    out, model = Path(out), Path(model)
    times: dict[str, float] = {}
    start = time.perf_counter()
    data = write_dataset(out / "data", recipe.images, size=DEMO_SIZE, seed=recipe.seed)
    times["data"] = time.perf_counter() - start
    timed = timer(times)
    begin = time.perf_counter()
    encoder = image_encoder_step(recipe, data, model / "prior", out / "image_encoder")
    times["image-encoder"] = time.perf_counter() - begin
    phase = stage_c_config(recipe, data, out / "stage_c_image")
    prior = timed("stage-c-image", *stage_c_image_run(recipe, phase, model / "prior", encoder))
    target = out / "model"
    with atomic_folder(target / "prior", replace=True) as copy:
        shutil.copytree(prior, copy, dirs_exist_ok=True)
    begin = time.perf_counter()
    prompts = image_prompt_data(recipe, out / "image_data")
    times["image-data"] = time.perf_counter() - begin
    base = stage_c_config(recipe, prompts, out / "ip_adapter")
    adapter = timed("ip-adapter", ip_adapter_config(recipe, base, target / "prior"))
    with atomic_path(target / IP_ADAPTER_FILE) as temporary:
        shutil.copy2(adapter / IP_ADAPTER_FILE, temporary)
    lcm = target / LCM_FOLDER
    with atomic_folder(lcm, replace=True) as folder:
        shutil.copytree(model / LCM_FOLDER, folder, dirs_exist_ok=True)  # Stage B's LoRA is unchanged
        final = timed("lcm-c", lcm_config(recipe, "c", data, target, out / "lcm_c"))
        half_lora(final / "lora.safetensors", folder / "prior.safetensors")
        distilled = read_json_object(folder / "training.json")
        distilled["seconds"] = {**distilled.get("seconds", {}), "lcm-c": times["lcm-c"]}
        write_text(folder / "training.json", json.dumps(distilled, indent=2))
    summary = read_json_object(model / "training.json")
    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k.startswith(IMAGE_FIELDS)}
    summary["recipe"] = {**summary.get("recipe", {}), **fields}
    summary["seconds"] = {**summary.get("seconds", {}), **times}
    write_text(target / "training.json", json.dumps(summary, indent=2))
    logger.info(
        "image steps written to %s (%s)", target, ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    return target
