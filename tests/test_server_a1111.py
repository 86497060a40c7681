"""The AUTOMATIC1111-compatible API, driven by ``webuiapi`` (a real A1111 client) against the real
server running the demo model on 127.0.0.1, with a models folder (a checkpoint, a LoRA, a ControlNet)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator

import httpx
import PIL.Image
import PIL.ImageDraw
import pytest
from serving import PROMPT, ServerProcess, models_folder, wait_for_job

from stable_cascade.engine import image_sha256
from stable_cascade.shapes import score

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("a1111")
    with ServerProcess(root / "data", "--models", str(models_folder(root / "models"))) as running:
        yield running


@pytest.fixture
def api(server: ServerProcess) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def _record(image: PIL.Image.Image) -> dict:
    return json.loads(image.info["stable_cascade"])


def test_txt2img_maps_a1111_fields_and_answers_in_a1111_shape(api: webuiapi.WebUIApi) -> None:
    # webuiapi also sends dozens of fields we do not use (enable_hr, restore_faces, ...): ignored
    result = api.txt2img(
        prompt=PROMPT,
        negative_prompt="blue",
        seed=5,
        width=128,
        height=128,
        steps=8,
        cfg_scale=3.5,
        sampler_name="DDIM",
        batch_size=2,
        override_settings={"decoder_steps": 4},
    )
    assert [image.size for image in result.images] == [(128, 128)] * 2
    assert result.info["all_seeds"] == [5, 6] and result.info["seed"] == 5
    assert result.info["sampler_name"] == "DDIM" and result.info["steps"] == 8
    assert len(result.info["infotexts"]) == 2 and "Steps: 8," in result.info["infotexts"][0]
    assert "Stage B steps: 4," in result.info["infotexts"][0]
    assert result.parameters["prompt"] == PROMPT
    record = _record(result.images[1])
    assert record["seed"] == 6 and record["job"]["negative_prompt"] == "blue"
    assert record["job"]["prior_sampler"] == "ddim" and record["job"]["prior_guidance"] == 3.5
    assert record["job"]["decoder_steps"] == 4 and record["job"]["model"] == "demo"
    assert result.images[0].info["parameters"].startswith(PROMPT)
    assert score([result.images[0].convert("RGB")], [PROMPT]).summary()["background"] == 1.0


def test_same_seed_same_image_and_minus_one_is_random(api: webuiapi.WebUIApi) -> None:
    settings = dict(prompt=PROMPT, width=128, height=128, steps=6, sampler_name="Euler a")
    first = api.txt2img(seed=11, **settings)
    again = api.txt2img(seed=11, **settings)
    other = api.txt2img(seed=12, **settings)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.image.tobytes() != other.image.tobytes()
    assert _record(first.image)["job"]["prior_sampler"] == "euler_ancestral"
    randoms = [api.txt2img(seed=-1, **settings).info["seed"] for _ in range(2)]
    assert all(seed >= 0 for seed in randoms) and randoms[0] != randoms[1]


def test_img2img_takes_the_init_image_and_denoising_strength(api: webuiapi.WebUIApi) -> None:
    init = PIL.Image.new("RGB", (128, 128), "white")
    PIL.ImageDraw.Draw(init).ellipse((10, 40, 60, 90), fill="red")
    result = api.img2img(
        images=[init], prompt=PROMPT, seed=3, width=128, height=128, steps=8, denoising_strength=0.5
    )
    job = _record(result.image)["job"]
    assert job["task"] == "img2img" and job["strength"] == 0.5
    assert job["input_image_sha256"] == image_sha256(init)
    assert result.info["denoising_strength"] == 0.5


def test_models_options_and_samplers(api: webuiapi.WebUIApi, server: ServerProcess) -> None:
    assert "demo" in api.util_get_model_names()
    assert api.util_get_current_model() == "demo"
    assert set(api.util_get_sampler_names()) == {"Euler a", "DDIM", "DPM++ 2M", "DDPM", "LCM"}
    api.set_options({"sd_model_checkpoint": "lite", "an_option_we_do_not_have": 1})
    assert api.get_options()["sd_model_checkpoint"] == "lite"
    queued = httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT}).json()  # names no model
    assert queued["job"]["model"] == "lite"
    httpx.delete(f"{server.url}/v1/jobs/{queued['id']}")
    refused = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert refused.status_code == 422 and "unknown model 'nope'" in refused.json()["detail"]
    api.util_set_model("demo")
    assert api.util_get_current_model() == "demo"
    result = api.txt2img(prompt=PROMPT, seed=1, width=128, height=128, steps=4)
    assert _record(result.image)["job"]["model"] == "demo"


def test_bad_fields_get_422_with_the_job_checks_message(server: ServerProcess) -> None:
    url = f"{server.url}/sdapi/v1/txt2img"
    cases = {
        "unknown sampler 'Heun'": {"sampler_name": "Heun"},
        "width": {"width": 129, "height": 128},
        "Stage C steps must be a whole number": {"steps": "many"},
        "prompt": {"prompt": 7},
    }
    for message, fields in cases.items():
        answer = httpx.post(url, json={"width": 128, "height": 128, **fields}, timeout=30)
        assert answer.status_code == 422, (fields, answer.text)
        assert message in answer.json()["detail"], answer.json()
        assert "\n" not in answer.json()["detail"]
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    picture = base64.b64encode(buffer.getvalue()).decode()
    inpaint = {"init_images": [picture], "mask": picture}  # the demo has no inpainting ControlNet
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=inpaint, timeout=30)
    assert answer.status_code == 422 and "needs an inpainting ControlNet" in answer.json()["detail"]


def test_progress_shows_the_running_job_and_interrupt_stops_it(api: webuiapi.WebUIApi) -> None:
    results: list[webuiapi.WebUIApiResult] = []
    settings = dict(prompt=PROMPT, seed=1, width=128, height=128, steps=20, n_iter=40)
    thread = threading.Thread(target=lambda: results.append(api.txt2img(**settings)))
    thread.start()
    deadline = time.monotonic() + 60
    progress = api.get_progress()
    while time.monotonic() < deadline and not (progress["progress"] > 0 and progress["current_image"]):
        time.sleep(0.1)
        progress = api.get_progress()
    assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] >= 1, progress
    assert progress["eta_relative"] > 0 and progress["state"]["sampling_steps"] > 0
    preview = PIL.Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size[0] > 0
    api.interrupt()
    thread.join(60)
    assert not thread.is_alive() and len(results) == 1
    assert len(results[0].images) < 40  # stopped early; the images made so far are returned
    assert api.get_progress()["state"]["job_count"] == 0


def test_pages_other_clients_ask_for_exist(server: ServerProcess) -> None:
    for path in ("scripts", "schedulers", "loras", "upscalers", "sd-vae", "prompt-styles", "hypernetworks"):
        assert httpx.get(f"{server.url}/sdapi/v1/{path}").status_code == 200, path


def _encoded(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _circle(left: bool) -> PIL.Image.Image:
    """White circle on black: a control image whose edges put the object left or right."""
    image = PIL.Image.new("RGB", (128, 128), "black")
    x = 32 if left else 96
    PIL.ImageDraw.Draw(image).ellipse((x - 18, 46, x + 18, 82), fill="white")
    return image


def test_controlnet_units_under_webuiapis_own_key_steer_the_image(api: webuiapi.WebUIApi) -> None:
    """webuiapi sends alwayson_scripts["ControlNet"] (A1111 takes any case); the listings exist."""
    controlnet = webuiapi.ControlNetInterface(api)
    assert controlnet.model_list() == ["canny", "edges"] and api.controlnet_version() == 2
    assert "none" in api.controlnet_module_list() and "canny" in api.controlnet_module_list()
    right = PROMPT.replace("left", "right")
    settings = dict(prompt=right, seed=3, width=128, height=128, steps=12)
    plain = api.txt2img(**settings)
    units = [webuiapi.ControlNetUnit(image=_circle(left=True), module="none", model="edges", weight=1.0)]
    # a fresh alwayson_scripts each time: webuiapi writes the units into its default dict (a mutable
    # default argument), which would send them with every later request
    steered = api.txt2img(controlnet_units=units, alwayson_scripts={}, **settings)
    job = _record(steered.image)["job"]
    assert job["controlnet"].endswith("controlnet") and job["control_type"] == "canny"
    assert steered.image.tobytes() != plain.image.tobytes()
    assert score([steered.image.convert("RGB")], [PROMPT]).summary()["position"] == 1.0  # where the edges are
    canny = [
        webuiapi.ControlNetUnit(image=_circle(left=True), module="canny", model="control_v11p_sd15_canny")
    ]
    made = api.txt2img(controlnet_units=canny, alwayson_scripts={}, **settings)
    assert _record(made.image)["job"]["controlnet"] == "canny"


def test_lora_in_the_prompt_is_the_explicit_field_and_png_info_reads_our_text(
    api: webuiapi.WebUIApi, server: ServerProcess
) -> None:
    assert api.get_loras() == [
        {"name": "ink", "alias": "ink", "path": "loras/ink.safetensors", "metadata": {}}
    ]
    settings = dict(seed=4, width=128, height=128, steps=6, sampler_name="DPM++ 2M Karras")
    tagged = api.txt2img(prompt=f"{PROMPT} <lora:ink:0.8>", **settings)
    plain = api.txt2img(prompt=PROMPT, **settings)
    job = _record(tagged.image)["job"]
    assert job["prompt"] == PROMPT and [lora["scale"] for lora in job["loras"]] == [0.8]
    assert job["prior_sampler"] == "dpmpp_2m" and tagged.info["sampler_name"] == "DPM++ 2M"
    native = {
        "prompt": PROMPT,
        "seed": 4,
        "prior_steps": 6,
        "prior_sampler": "dpmpp_2m",
        "prior_guidance": 7.0,
    }
    explicit = httpx.post(f"{server.url}/v1/jobs", json={**native, "loras": [{"name": "ink", "scale": 0.8}]})
    done = wait_for_job(server, explicit.json()["id"])
    assert done["lora_names"] == ["ink"]
    picture = httpx.get(server.url + done["images"][0]["url"]).content
    assert PIL.Image.open(io.BytesIO(picture)).tobytes() == tagged.image.tobytes() != plain.image.tobytes()
    # PNG Info reads our infotext as AUTOMATIC1111 does: Stage C under its keys, the LoRA in the prompt
    text = tagged.image.info["parameters"]
    read = api.png_info(tagged.image)
    assert read.info == text and read.parameters["Prompt"] == f"{PROMPT} <lora:ink:0.8>"
    expected = {"Steps": "6", "Sampler": "DPM++ 2M", "CFG scale": "7.0", "Seed": "4", "Size-1": "128"}
    assert expected.items() <= read.parameters.items(), read.parameters
    assert read.parameters["Stage B steps"] == str(job["decoder_steps"])
    assert read.parameters["Model"] == "demo" and "stable_cascade" in read.json["items"]


def test_a1111_surface_answers_or_refuses_never_ignores(
    api: webuiapi.WebUIApi, server: ServerProcess
) -> None:
    url = f"{server.url}/sdapi/v1"
    hires = httpx.post(f"{url}/txt2img", json={"prompt": PROMPT, "enable_hr": True, "hr_scale": 2})
    assert hires.status_code == 422 and "enable_hr" in hires.json()["detail"]
    heun = httpx.post(f"{url}/txt2img", json={"prompt": PROMPT, "sampler_name": "Heun Karras"})
    assert heun.status_code == 422 and "Euler a (euler_ancestral)" in heun.json()["detail"]
    memory = api.get_memory()
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0 and "cuda" in memory
    flags = api.get_cmd_flags()
    assert flags["api"] and flags["port"] == server.port and flags["lora_dir"].endswith("loras")
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    titles = api.util_get_model_names()
    assert set(titles) == {"full", "lite", "demo", "democopy"}
    settings = dict(prompt=PROMPT, seed=2, width=128, height=128, steps=4)
    copy = api.txt2img(override_settings={"sd_model_checkpoint": "democopy"}, **settings)
    assert copy.info["sd_model_name"] == "democopy"
    assert copy.image.tobytes() == api.txt2img(**settings).image.tobytes()  # the same weights
    (server.data.parent / "models" / "checkpoints" / "again").symlink_to(
        server.data.parent / "models" / "checkpoints" / "democopy"
    )
    assert "again" not in api.util_get_model_names()
    api.refresh_checkpoints()
    assert "again" in api.util_get_model_names()


def test_skip_drops_the_current_image_only(api: webuiapi.WebUIApi) -> None:
    results: list[webuiapi.WebUIApiResult] = []
    settings = dict(prompt=PROMPT, seed=1, width=128, height=128, steps=30, n_iter=3)
    thread = threading.Thread(target=lambda: results.append(api.txt2img(**settings)))
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and api.get_progress()["state"]["sampling_step"] < 2:
        time.sleep(0.05)
    api.skip()
    thread.join(120)
    assert not thread.is_alive() and len(results) == 1
    assert len(results[0].images) == 2 and results[0].info["all_seeds"] == [1, 2, 3]
    assert [_record(image)["seed"] for image in results[0].images] == [2, 3]  # the first was skipped
