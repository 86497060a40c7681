"""ControlNets through the server: the native API's control fields and whole jobs, A1111's ControlNet
extension unit on txt2img and its inpainting mask on img2img (the real server, demo model, 127.0.0.1)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
from serving import PROMPT, ServerProcess, wait_for_job

from stable_cascade.engine import ModelLibrary, image_sha256
from stable_cascade.server.a1111 import job_arguments
from stable_cascade.server.controls import a1111_inpainting
from stable_cascade.server.inputs import Served, checked_job
from stable_cascade.server.store import Store
from stable_cascade.server.uploads import decode_image


def encoded(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def square(left: int = 70) -> PIL.Image.Image:
    pixels = np.zeros((128, 128, 3), np.uint8)
    pixels[32:64, left : left + 32] = 255
    return PIL.Image.fromarray(pixels)


def half_mask() -> PIL.Image.Image:
    mask = np.zeros((128, 128), np.uint8)
    mask[:, 64:] = 255
    return PIL.Image.fromarray(mask)


def test_a1111_mask_maps_to_the_inpainting_controlnet(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", max_queue=5)
    body = {"init_images": [encoded(square())], "mask": encoded(half_mask()), "inpainting_mask_invert": 1}
    upload = decode_image(body["init_images"][0], store, "init_images[0]")
    control = a1111_inpainting(body, upload, store, "full")
    assert control is not None and control.controlnet == "inpainting"
    assert control.image == str(store.inputs_dir / upload.name)
    stored_mask = np.asarray(PIL.Image.open(control.mask or "").convert("L"))
    assert (stored_mask[:, :64] == 255).all() and (stored_mask[:, 64:] == 0).all()  # inverted
    served = Served(store, ModelLibrary(), "full")
    arguments = job_arguments({**body, "width": 128, "height": 128}, served, upload.sha256)
    job = checked_job({**arguments, "controls": [control]}, upload, served)
    assert job.task == "img2img" and job.controls[0].control_type == "inpainting"
    assert job.controls[0].image_sha256 == upload.sha256
    with pytest.raises(ValueError, match="the demo model does not have"):
        a1111_inpainting(body, upload, store, "demo")
    assert a1111_inpainting({"init_images": body["init_images"]}, upload, store, "full") is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("control") / "data") as running:
        yield running


def _pixels(server: ServerProcess, job: dict) -> bytes:
    png = httpx.get(server.url + job["images"][0]["url"], timeout=30).content
    return PIL.Image.open(io.BytesIO(png)).convert("RGB").tobytes()


@pytest.mark.slow
def test_native_jobs_take_control_fields_and_rerun_bit_for_bit(server: ServerProcess) -> None:
    fields = {"prompt": PROMPT, "seed": 4, "prior_steps": 4, "decoder_steps": 2}
    control = {"controlnet": "canny", "control_image": encoded(square()), "control_scale": 0.9}
    answer = httpx.post(f"{server.url}/v1/jobs", json={**fields, **control}, timeout=60)
    assert answer.status_code == 201, answer.text
    first = wait_for_job(server, answer.json()["id"])
    assert first["state"] == "done", first["error"]
    ref = first["job"]
    assert (ref["controlnet"], ref["control_scale"], ref["control_image_sha256"]) == (
        "canny",
        0.9,
        image_sha256(square()),
    )
    again = httpx.post(f"{server.url}/v1/jobs", json={"job": first["job"]}, timeout=60).json()
    plain = httpx.post(f"{server.url}/v1/jobs", json=fields, timeout=60).json()
    again, plain = wait_for_job(server, again["id"]), wait_for_job(server, plain["id"])
    assert _pixels(server, again) == _pixels(server, first) != _pixels(server, plain)
    for body, expected in (
        ({**fields, "controlnet": "canny"}, "'controlnet' needs 'control_image'"),
        ({**fields, "control_image": control["control_image"]}, "control fields need 'controlnet'"),
        ({**fields, **control, "controlnet": "/etc/x.safetensors"}, "the server runs these by name"),
        ({**fields, **control, "controlnet": "inpainting"}, "demo model has no inpainting"),
        ({"job": {**first["job"], "control_image": "/etc/hosts"}}, "as uploads"),
        ({"job": first["job"], "control_image": encoded(square(10))}, "sha256 differs"),
    ):
        refused = httpx.post(f"{server.url}/v1/jobs", json=body, timeout=60)
        assert refused.status_code == 422 and expected in refused.json()["detail"], refused.text


@pytest.mark.slow
def test_a1111_controlnet_unit_and_mask(server: ServerProcess) -> None:
    url = f"{server.url}/sdapi/v1"
    body = {"prompt": PROMPT, "seed": 5, "width": 128, "height": 128, "steps": 4}
    unit = {"input_image": encoded(square()), "module": "canny", "weight": 0.7, "model": "any"}
    scripts = {"alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False}]}}}
    answers = [httpx.post(f"{url}/txt2img", json=b, timeout=120) for b in ({**body, **scripts}, body)]
    assert all(a.status_code == 200 for a in answers), answers[0].text
    images = [PIL.Image.open(io.BytesIO(base64.b64decode(a.json()["images"][0]))) for a in answers]
    record = json.loads(images[0].info["stable_cascade"])
    assert record["job"]["controlnet"] == "canny" and record["job"]["control_scale"] == 0.7
    assert (
        images[0].tobytes() != images[1].tobytes()
        and "alwayson_scripts" not in answers[0].json()["parameters"]
    )
    for extra, expected in (
        ({"args": [{**unit, "module": "depth"}]}, "module 'depth' is not supported"),
        ({"args": [unit, unit]}, "one ControlNet unit per request"),
        ({"args": [{"module": "canny"}]}, "needs input_image"),
    ):
        refused = httpx.post(
            f"{url}/txt2img", json={**body, "alwayson_scripts": {"controlnet": extra}}, timeout=60
        )
        assert refused.status_code == 422 and expected in refused.json()["detail"], refused.text
    inpaint = {**body, "init_images": [encoded(square())], "mask": encoded(half_mask())}
    refused = httpx.post(f"{url}/img2img", json=inpaint, timeout=60)
    assert refused.status_code == 422 and "needs an inpainting ControlNet" in refused.json()["detail"]
