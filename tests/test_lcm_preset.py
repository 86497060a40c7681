"""The ``lcm`` preset and the LoRAs it needs: the demo's shipped LCM LoRAs, the user's (``--lora``) for
other models, Stage B LoRAs attached to Stage B for a job only, and one clear line when none fit."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from serving import PROMPT, ServerProcess, wait_for_job
from torch import nn

import tiny
from stable_cascade.batch.items import BatchItem
from stable_cascade.batch.plan import plan_items
from stable_cascade.cli.main import main
from stable_cascade.diffusion.presets import COMBINED_PRESETS, PRESETS
from stable_cascade.engine import Engine, ImageDone, Job, ModelSources, read_png
from stable_cascade.fields import BY_NAME
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.lora import LoRAAdapter, add_lora, save_lora
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.shapes import score
from stable_cascade.training.lcm_task import LCM_TARGETS

SHIPPED = {stage: str(DEMO_DIR / "lcm" / f"{stage}.safetensors") for stage in ("prior", "decoder")}
WRONG_STAGES = {"prior": "decoder", "decoder": "prior"}


def lora(path: Path, stage: str, adapter: str | None = "lcm", seed: int = 0) -> str:
    """A tiny model's LoRA of ``stage`` with random adapters, marked as the LCM trainer marks them."""
    unet = StableCascadeUNet(tiny.TINY_PRIOR if stage == "prior" else tiny.TINY_DECODER)
    add_lora(unet, rank=2, targets=LCM_TARGETS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in unet.modules():
            if isinstance(layer, LoRAAdapter):
                layer.up.copy_(torch.randn(layer.up.shape, generator=generator) * 0.3)
    metadata = {"stage": stage} | ({"adapter": adapter} if adapter else {})
    return str(save_lora(path, unet, metadata=metadata))


def test_the_preset_is_data_and_lcm_is_a_sampler_everywhere() -> None:
    for table in (PRESETS, COMBINED_PRESETS):
        preset = table["lcm"]
        assert preset.adapters == "lcm"
        for stage in (preset.prior, preset.decoder):
            assert (stage.steps, stage.guidance, stage.sampler, stage.schedule) == (
                4,
                1.0,
                "lcm",
                "reference",
            )
    assert "lcm" in BY_NAME["preset"].choices and "lcm" in BY_NAME["decoder_sampler"].choices
    assert BY_NAME["prior_sampler"].choice("LCM", what="sampler") == "lcm"  # AUTOMATIC1111's name


def test_demo_jobs_take_the_shipped_lcm_loras() -> None:
    job = Job.create(prompt="a red circle", model="demo", preset="lcm")
    assert [lora.path for lora in job.loras] == [SHIPPED["prior"], SHIPPED["decoder"]]
    assert (job.prior_steps, job.prior_sampler, job.prior_guidance) == (4, "lcm", 1.0)
    assert (job.decoder_steps, job.decoder_sampler, job.decoder_guidance) == (4, "lcm", 1.0)
    again = Job.from_dict(job.to_dict())
    assert again == job  # a record runs again with the same LoRAs
    given = Job.create(prompt="a red circle", model="demo", preset="lcm", loras=[(SHIPPED["prior"], 0.5)])
    assert [(lora.path, lora.scale) for lora in given.loras] == [
        (SHIPPED["prior"], 0.5),
        (SHIPPED["decoder"], 1.0),
    ]
    assert Job.create(prompt="a red circle", model="demo").loras == ()  # other presets: none


def test_the_users_lcm_loras_serve_other_models(tmp_path: Path) -> None:
    prior, decoder = lora(tmp_path / "p.safetensors", "prior"), lora(tmp_path / "d.safetensors", "decoder")
    message = (
        r"the lcm preset needs LCM LoRAs for Stage C and Stage B, and the full model ships none: distil "
        r"them \(stable-cascade train lcm --stage c\|b --teacher MODEL --data DIR; see the README\) and "
        r"pass --lora prior_lcm.safetensors --lora decoder_lcm.safetensors, or choose another preset"
    )
    with pytest.raises(ValueError, match=message):
        Job.create(prompt="x", preset="lcm")
    style = tiny.lora_file(tmp_path / "style.safetensors", 1)  # not an LCM LoRA: serves no stage
    with pytest.raises(ValueError, match=r"LCM LoRAs for Stage B, .* pass --lora decoder_lcm.safetensors,"):
        Job.create(prompt="x", preset="lcm", loras=[(style, 1.0), (prior, 1.0)])
    job = Job.create(prompt="x", preset="lcm", model="lite", loras=[(prior, 1.0), (decoder, 0.5)])
    assert [(Path(r.path).name, r.scale) for r in job.loras] == [
        ("p.safetensors", 1.0),
        ("d.safetensors", 0.5),
    ]
    distilled = Job.create(prompt="x", preset="lcm", prior=str(tmp_path), decoder=str(tmp_path))
    assert distilled.loras == ()  # fully distilled stages of one's own need none
    demo = Job.create(prompt="x", preset="lcm", model="demo", loras=[(style, 1.0)])
    assert [Path(r.path).name for r in demo.loras] == [
        "style.safetensors",
        "prior.safetensors",
        "decoder.safetensors",
    ]
    with pytest.raises(
        ValueError, match=r"the lcm preset attaches LCM LoRAs, which reconstruct does not take"
    ):
        Job.create(
            task="reconstruct", preset="lcm", model="demo", input_image_sha256="ab", image_size=(64, 64)
        )


def test_the_servers_models_folder_serves_the_users_lcm_loras(tmp_path: Path) -> None:
    """LCM LoRAs are LoRAs: put in the models folder's ``loras/``, a request names them with the lcm
    preset (each file says its stage), and the server serves the job."""
    from stable_cascade.engine import ModelLibrary
    from stable_cascade.server.models import check_served, lora_refs

    (tmp_path / "loras").mkdir()
    lora(tmp_path / "loras" / "lite_lcm_prior.safetensors", "prior")
    lora(tmp_path / "loras" / "lite_lcm_decoder.safetensors", "decoder")
    library = ModelLibrary(tmp_path)
    refs = lora_refs(library, ["lite_lcm_prior", "lite_lcm_decoder:0.5"])
    job = Job.create(prompt="x", preset="lcm", model="lite", loras=refs)
    assert [(Path(r.path).name, r.scale) for r in job.loras] == [
        ("lite_lcm_prior.safetensors", 1.0),
        ("lite_lcm_decoder.safetensors", 0.5),
    ]
    assert (job.prior_sampler, job.decoder_sampler) == ("lcm", "lcm")
    check_served(job, library)


def test_the_command_line_says_what_to_pass(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "a cat", "--preset", "lcm", "-o", str(tmp_path / "x.png")]) == 2
    assert "pass --lora prior_lcm.safetensors --lora decoder_lcm.safetensors" in capsys.readouterr().err


def test_stage_b_loras_go_to_stage_b_for_their_job_only(tmp_path: Path) -> None:
    prior_dir, decoder_dir = tiny.save_pipelines(tmp_path / "models")
    sources = ModelSources(prior=str(prior_dir), decoder=str(decoder_dir))
    decoder_lora = lora(tmp_path / "d.safetensors", "decoder", adapter=None, seed=3)
    settings: dict[str, object] = {"prompt": "a cat", "width": 128, "height": 128, "seed": 7, "dtype": "fp32"}
    settings.update(prior_steps=2, decoder_steps=2, models=sources)
    engine = Engine(device="cpu")

    def image(**values: object) -> np.ndarray:
        job = Job.create(**{**settings, **values})  # type: ignore[arg-type]
        done = [e for e in engine.run(job) if isinstance(e, ImageDone)]
        return np.asarray(done[0].image)

    plain = image()
    adapted = image(loras=[(decoder_lora, 1.0)])
    assert not np.array_equal(plain, adapted)
    decoder = engine.load(sources, "fp32").decoder_pipe.decoder
    assert not any(isinstance(m, nn.Linear) and hasattr(m, "lora_adapters") for m in decoder.modules())
    assert np.array_equal(image(), plain)
    prior_lora = lora(tmp_path / "p.safetensors", "prior")
    lcm = image(preset="lcm", loras=[(prior_lora, 1.0), (lora(tmp_path / "d2.safetensors", "decoder"), 1.0)])
    assert lcm.shape == plain.shape


def test_the_demo_draws_the_prompt_with_the_lcm_preset(tmp_path: Path) -> None:
    """The issue's command, offline: four steps per stage with the shipped LCM LoRAs."""
    prompt = "a red circle on the left, on a white background"
    out = tmp_path / "lcm.png"
    assert (
        main(["generate", prompt, "--model", "demo", "--preset", "lcm", "--seed", "0", "-o", str(out)]) == 0
    )
    image = PIL.Image.open(out).convert("RGB")
    result = score([image], [prompt])
    assert (result.colour, result.shape, result.position, result.background) == (1, 1, 1, 1), result
    job = read_png(out).job
    assert [lora.path for lora in job.loras] == [SHIPPED["prior"], SHIPPED["decoder"]]
    assert (job.preset, job.prior_steps, job.decoder_steps) == ("lcm", 4, 4)


@pytest.mark.slow
def test_the_server_runs_the_lcm_preset_and_the_lcm_sampler(tmp_path: Path) -> None:
    """The native API takes ``preset: lcm`` (the demo's own LoRAs are no files a request names) and
    AUTOMATIC1111 clients ``sampler_name: "LCM"``."""
    with ServerProcess(tmp_path / "data") as server, httpx.Client(base_url=server.url, timeout=120) as client:
        answer = client.post("/v1/jobs", json={"prompt": PROMPT, "preset": "lcm", "seed": 0})
        assert answer.status_code == 201, answer.text
        done = wait_for_job(server, answer.json()["id"])
        assert done["state"] == "done" and done["job"]["prior_sampler"] == "lcm", done
        assert [lora["path"] for lora in done["job"]["loras"]] == [SHIPPED["prior"], SHIPPED["decoder"]]
        body = {"prompt": PROMPT, "sampler_name": "LCM", "steps": 4, "cfg_scale": 1, "seed": 0}
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert (info["sampler_name"], info["steps"]) == ("LCM", 4)
        other = tiny.lora_file(tmp_path / "style.safetensors", 1)  # a file a request names: refused
        job = {**done["job"], "loras": [*done["job"]["loras"], {"path": other, "scale": 1.0, "sha256": None}]}
        named = client.post("/v1/jobs", json={"job": job})
        assert named.status_code == 422 and "LoRAs by name from its models folder" in named.text, named.text


def test_batch_items_take_the_loras_of_their_own_preset(tmp_path: Path) -> None:
    """A run's preset LoRAs are not handed to an item of another preset, and the reverse."""
    style = tiny.lora_file(tmp_path / "style.safetensors", 1)
    items = [BatchItem("a"), BatchItem("b", {"preset": "reference"})]
    planned = plan_items(
        items, {"models": ModelSources(model="demo"), "preset": "lcm", "loras": [(style, 1.0)]}, 0
    )
    assert [Path(lora.path).name for lora in planned[0].job.loras] == [
        "style.safetensors",
        "prior.safetensors",
        "decoder.safetensors",
    ]
    assert [Path(lora.path).name for lora in planned[1].job.loras] == ["style.safetensors"]
    planned = plan_items([BatchItem("c", {"preset": "lcm"})], {"models": ModelSources(model="demo")}, 0)
    assert [lora.path for lora in planned[0].job.loras] == [SHIPPED["prior"], SHIPPED["decoder"]]
