"""Malformed requests get a 4xx with one line, never a 500: every field of both APIs with values of the
wrong type (lists, objects, nested lists, strings for numbers and booleans, booleans, NaN, infinities,
integers beyond 64 bits), malformed JSON, query values beyond 64 bits, and jobs over the images cap.
The server still serves a good request afterwards."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import PIL.Image
import pytest
from serving import PROMPT, ServerProcess, wait_for_job

NUMBERS = (
    "width",
    "height",
    "seed",
    "batch_size",
    "count",
    "prior_steps",
    "prior_guidance",
    "prior_shift",
    "prior_rescale",
    "decoder_steps",
    "decoder_guidance",
    "decoder_shift",
    "decoder_rescale",
)
NAMES = (
    "prompt",
    "negative_prompt",
    "task",
    "preset",
    "prior_sampler",
    "decoder_sampler",
    "model",
    "dtype",
    "emphasis",
)
A1111_NUMBERS = ("width", "height", "seed", "batch_size", "n_iter", "steps", "cfg_scale", "decoder_steps")
A1111_NAMES = (
    "prompt",
    "negative_prompt",
    "sampler_name",
    "preset",
    "decoder_sampler",
    "emphasis",
    "scheduler",
)
WRONG_NUMBERS: tuple[Any, ...] = (
    "20",
    "false",
    True,
    [],
    [[1]],
    {"value": 1},
    float("nan"),
    float("inf"),
    10**30,
)
WRONG_NAMES: tuple[Any, ...] = (5, True, [], [["demo"]], {"name": "demo"}, float("nan"))


def _png() -> str:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _unit(**fields: Any) -> dict[str, Any]:
    """An A1111 txt2img body with one ControlNet extension unit of ``fields``."""
    return {"width": 128, "height": 128, "alwayson_scripts": {"controlnet": {"args": [fields]}}}


def _cases() -> list[tuple[str, str, Any]]:
    """(path, case name, JSON body or raw bytes)."""
    cases: list[tuple[str, str, Any]] = []
    for path, numbers, names in (
        ("/v1/jobs", NUMBERS, NAMES),
        ("/sdapi/v1/txt2img", A1111_NUMBERS, A1111_NAMES),
    ):
        base = {"prompt": PROMPT} if path == "/v1/jobs" else {"prompt": PROMPT, "width": 128, "height": 128}
        for field in numbers:
            cases += [(path, f"{field}={value!r}", {**base, field: value}) for value in WRONG_NUMBERS]
        for field in names:
            cases += [(path, f"{field}={value!r}", {**base, field: value}) for value in WRONG_NAMES]
    image = _png()
    cases += [
        ("/v1/jobs", "image=list", {"task": "img2img", "image": [image]}),
        ("/v1/jobs", "image=int", {"task": "img2img", "image": 5}),
        ("/v1/jobs", "image not base64", {"task": "img2img", "image": "data:image/png;base64,%%"}),
        (
            "/v1/jobs",
            "image not an image",
            {"task": "img2img", "image": base64.b64encode(b"x" * 99).decode()},
        ),
        ("/v1/jobs", "image truncated", {"task": "img2img", "image": image[: len(image) // 2 // 4 * 4]}),
        ("/v1/jobs", "strength=string", {"task": "img2img", "image": image, "strength": "0.5"}),
        ("/v1/jobs", "job=list", {"job": [1, 2]}),
        ("/v1/jobs", "job.width=list", {"job": {"prompt": PROMPT, "width": [128]}}),
        ("/v1/jobs", "job.prior=string", {"job": {"prompt": PROMPT, "prior": "fast"}}),
        ("/v1/jobs", "job.models=list", {"job": {"prompt": PROMPT, "models": ["demo"]}}),
        ("/v1/jobs", "job.controls=object", {"job": {"prompt": PROMPT, "controls": {"a": 1}}}),
        ("/v1/jobs", "controlnet=list", {"controlnet": ["canny"], "control_image": image}),
        (
            "/v1/jobs",
            "control_scale=string",
            {"controlnet": "canny", "control_image": image, "control_scale": "1"},
        ),
        ("/v1/jobs", "control_image=object", {"controlnet": "canny", "control_image": {"data": image}}),
        ("/v1/jobs", "over the images cap", {"prompt": PROMPT, "batch_size": 2, "count": 51}),
        ("/sdapi/v1/txt2img", "over the images cap", {"prompt": PROMPT, "batch_size": 4, "n_iter": 26}),
        ("/sdapi/v1/txt2img", "override_settings=list", {"override_settings": [1]}),
        (
            "/sdapi/v1/txt2img",
            "sd_model_checkpoint=list",
            {"override_settings": {"sd_model_checkpoint": ["demo"]}},
        ),
        ("/sdapi/v1/txt2img", "alwayson_scripts.controlnet=list", {"alwayson_scripts": {"controlnet": [1]}}),
        ("/sdapi/v1/txt2img", "controlnet args=string", {"alwayson_scripts": {"controlnet": {"args": "x"}}}),
        ("/sdapi/v1/txt2img", "controlnet module=list", _unit(module=["canny"], input_image=image)),
        ("/sdapi/v1/txt2img", "controlnet module=object", _unit(module={"a": 1}, input_image=image)),
        ("/sdapi/v1/txt2img", "controlnet enabled='false'", _unit(enabled="false", input_image=image)),
        ("/sdapi/v1/txt2img", "controlnet weight=string", _unit(weight="1", input_image=image)),
        ("/sdapi/v1/txt2img", "controlnet weight=nan", _unit(weight=float("nan"), input_image=image)),
        ("/sdapi/v1/txt2img", "controlnet input_image=list", _unit(input_image=[image])),
        ("/sdapi/v1/txt2img", "sampler_index=list", {"sampler_index": ["Euler a"]}),
        ("/sdapi/v1/txt2img", "sampler_name=0", {"sampler_name": 0}),
        ("/sdapi/v1/txt2img", "sd_model_checkpoint=object", {"sd_model_checkpoint": {"a": 1}}),
        ("/sdapi/v1/options", "options sd_model_checkpoint=list", {"sd_model_checkpoint": ["demo"]}),
        (
            "/v1/jobs",
            "control_type=list",
            {"controlnet": "canny", "control_image": image, "control_type": ["canny"]},
        ),
        ("/v1/jobs", "mask=int", {"controlnet": "canny", "control_image": image, "mask": 5}),
        ("/v1/jobs", "job.controls=[list]", {"job": {"prompt": PROMPT, "controls": [[1]]}}),
        ("/v1/jobs", "job.loras=[object]", {"job": {"prompt": PROMPT, "loras": [{"path": ["x"]}]}}),
        ("/v1/jobs", "job.seed=string", {"job": {"prompt": PROMPT, "seed": "1"}}),
        ("/v1/jobs", "loras=string", {"prompt": PROMPT, "loras": "ink"}),
        ("/v1/jobs", "loras=[int]", {"prompt": PROMPT, "loras": [5]}),
        ("/v1/jobs", "loras=[object without a name]", {"prompt": PROMPT, "loras": [{"scale": 1}]}),
        ("/v1/jobs", "loras=[unknown]", {"prompt": PROMPT, "loras": ["ink:0.5"]}),
        ("/v1/jobs", "lora tag weight=text", {"prompt": f"<lora:ink:heavy> {PROMPT}"}),
        ("/v1/jobs", "5000 brackets", {"prompt": "(" * 5000}),
        ("/sdapi/v1/txt2img", "hypernetwork tag", {"prompt": f"<hypernet:x:1> {PROMPT}"}),
        ("/sdapi/v1/txt2img", "enable_hr='yes'", {"prompt": PROMPT, "enable_hr": "yes"}),
        ("/sdapi/v1/txt2img", "scheduler=list", {"prompt": PROMPT, "scheduler": ["Karras"]}),
        (
            "/sdapi/v1/txt2img",
            "ControlNet twice",
            {"alwayson_scripts": {"ControlNet": {"args": []}, "controlnet": {"args": []}}},
        ),
        ("/sdapi/v1/txt2img", "controlnet model=list", _unit(model=["canny"], input_image=image)),
        ("/sdapi/v1/txt2img", "controlnet model unknown", _unit(model="depth", input_image=image)),
        ("/v1/png-info", "png-info image=int", {"image": 5}),
        ("/v1/png-info", "png-info without image", {}),
        ("/sdapi/v1/png-info", "png-info image not base64", {"image": "%%"}),
        ("/v1/tokens", "tokens prompt=list", {"prompt": [1]}),
        ("/v1/tokens", "tokens model=list", {"prompt": PROMPT, "model": ["demo"]}),
        ("/v1/tokens", "tokens emphasis=5", {"prompt": PROMPT, "emphasis": 5}),
        ("/sdapi/v1/img2img", "init_images=string", {"init_images": image}),
        ("/sdapi/v1/img2img", "init_images=[int]", {"init_images": [5]}),
        (
            "/sdapi/v1/img2img",
            "denoising_strength=list",
            {"init_images": [image], "denoising_strength": [0.5]},
        ),
        ("/sdapi/v1/options", "options=list", [1]),
        ("/v1/jobs", "body=string", "a prompt"),
        ("/v1/jobs", "body=null", None),
        ("/sdapi/v1/txt2img", "body=list", [PROMPT]),
        ("/v1/jobs", "JSON cut short", b'{"prompt": '),
        ("/v1/jobs", "JSON nested 100000 deep", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/jobs", "JSON integer of 5000 digits", b'{"seed": 1' + b"0" * 5000 + b"}"),
        ("/v1/jobs", "not UTF-8", b'{"prompt": "\xff\xfe"}'),
        ("/sdapi/v1/txt2img", "a lone surrogate", b'{"prompt": "\\ud800"}'),
    ]
    return cases


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("fuzz") / "data") as running:
        yield running


def _problem(server: ServerProcess, path: str, name: str, body: Any) -> str | None:
    """What is wrong with the server's answer to ``body`` (None: a 4xx with a one-line detail)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    try:
        answer = httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    except httpx.TransportError as error:
        return f"{path} {name}: {type(error).__name__} {error}"
    json_answer = answer.headers.get("content-type") == "application/json"
    detail = answer.json().get("detail") if json_answer else None
    if 400 <= answer.status_code < 500 and isinstance(detail, str) and "\n" not in detail:
        return None
    return f"{path} {name}: {answer.status_code} {answer.text[:200]}"


def _jobs(server: ServerProcess) -> int:
    return len(httpx.get(f"{server.url}/v1/jobs", params={"limit": 200}, timeout=30).json()["jobs"])


def test_every_malformed_request_gets_a_4xx_with_one_line(server: ServerProcess) -> None:
    before = _jobs(server)
    cases = list(_cases())
    assert len(cases) > 200
    failures = [problem for case in cases if (problem := _problem(server, *case)) is not None]
    assert not failures, f"{len(failures)} malformed requests were not answered 4xx:\n" + "\n".join(failures)
    assert _jobs(server) == before, "no malformed request queued a job"
    good = httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT, "prior_steps": 2, "decoder_steps": 2})
    assert good.status_code == 201 and wait_for_job(server, good.json()["id"])["state"] == "done"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"before": 2**64}, "before must be a job's seq"),
        ({"before": -(2**70)}, "before must be a job's seq"),
        ({"limit": 2**64}, "limit must be between 1 and 200"),
        ({"limit": "ten"}, "query limit: Input should be a valid integer"),
        ({"before": "1e3"}, "query before: Input should be a valid integer"),
    ],
)
def test_list_query_values_beyond_64_bits_or_not_numbers_get_422(
    server: ServerProcess, query: dict[str, Any], message: str
) -> None:
    answer = httpx.get(f"{server.url}/v1/jobs", params=query, timeout=30)
    assert answer.status_code == 422, answer.text
    assert message in answer.json()["detail"] and "\n" not in answer.json()["detail"]


def test_gallery_requests_for_nothing_get_a_4xx(server: ServerProcess) -> None:
    for method, path, params, status in (
        ("GET", "/v1/images.zip", {"ids": ""}, 422),
        ("GET", "/v1/images.zip", {"ids": ",".join(["x"] * 201)}, 422),
        ("GET", "/v1/images.zip", {"ids": "nope"}, 404),
        ("GET", "/v1/images.zip", {}, 422),
        ("DELETE", "/v1/gallery/nope", {}, 404),
    ):
        answer = httpx.request(method, server.url + path, params=params, timeout=30)
        assert answer.status_code == status, (path, params, answer.text)
        assert "\n" not in answer.json()["detail"]


def test_the_images_cap_names_the_option(server: ServerProcess) -> None:
    answer = httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT, "count": 101}, timeout=30)
    assert answer.status_code == 422
    assert "101 images" in answer.json()["detail"] and "--max-images-per-job" in answer.json()["detail"]
    a1111 = httpx.post(
        f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "batch_size": 8, "n_iter": 13}, timeout=30
    )
    assert a1111.status_code == 422 and "104 images" in a1111.json()["detail"]
