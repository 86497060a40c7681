"""The native jobs API, the API key and the request limits, against the real server (demo model)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import jsonschema
import PIL.Image
import pytest
from serving import PROMPT, ServerProcess, wait_for_job

from stable_cascade.engine import image_sha256

KEY = "test-key-1234"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("jobs") / "data"
    options = ("--max-queue", "3", "--max-body-mb", "0.5", "--max-images-per-job", "1000")
    with ServerProcess(data, *options, api_key=KEY) as running:
        yield running


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=server.headers, timeout=60)


def _submit(server: ServerProcess, body: dict) -> dict:
    with _client(server) as client:
        answer = client.post("/v1/jobs", json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_a_job_from_fields_runs_and_serves_its_images(server: ServerProcess) -> None:
    job = _submit(
        server, {"prompt": PROMPT, "seed": 7, "batch_size": 2, "prior_steps": 6, "decoder_steps": 4}
    )
    assert job["state"] in ("queued", "running") and job["job"]["width"] == 128  # the demo's size
    done = wait_for_job(server, job["id"])
    assert done["state"] == "done" and [image["seed"] for image in done["images"]] == [7, 8]
    with _client(server) as client:
        png = client.get(done["images"][1]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = PIL.Image.open(io.BytesIO(png.content))
    record = json.loads(image.info["stable_cascade"])
    assert record["seed"] == 8 and record["job"]["prior_steps"] == 6 and image.size == (128, 128)


def test_a_whole_job_reruns_bit_for_bit(server: ServerProcess) -> None:
    first = wait_for_job(server, _submit(server, {"prompt": PROMPT, "seed": 9, "prior_steps": 5})["id"])
    again = wait_for_job(server, _submit(server, {"job": first["job"]})["id"])
    assert again["job"] == first["job"]
    with _client(server) as client:
        pixels = [client.get(job["images"][0]["url"]).content for job in (first, again)]
    assert PIL.Image.open(io.BytesIO(pixels[0])).tobytes() == PIL.Image.open(io.BytesIO(pixels[1])).tobytes()


def test_events_stream_progress_previews_images_then_done(server: ServerProcess) -> None:
    blocker = _submit(server, {"prompt": PROMPT, "count": 3})  # keeps the job queued while we subscribe
    job = _submit(server, {"prompt": PROMPT, "seed": 1, "prior_steps": 5, "decoder_steps": 3, "count": 2})
    kinds: list[str] = []
    positions: list[int] = []
    with _client(server) as client, client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                message = json.loads(line[len("data: ") :])
                kinds.append(message["type"])
                if message["type"] == "queued":
                    positions.append(message["position"])
                if message["type"] == "progress":
                    assert 0 < message["fraction"] <= 1 and message["stage"] in ("prior", "decoder")
                if message["type"] == "preview":
                    assert PIL.Image.open(io.BytesIO(base64.b64decode(message["image"]))).size[0] > 0
    assert kinds[-1] == "done" and kinds.count("image") == 2, kinds
    assert kinds[0] == "queued" and positions[0] == 0 and "started" in kinds
    assert wait_for_job(server, blocker["id"])["state"] == "done"
    assert kinds.count("progress") == 2 * (5 + 3) and "preview" in kinds


def test_img2img_variation_and_image_prompts_of_an_uploaded_image(server: ServerProcess) -> None:
    picture = PIL.Image.new("RGB", (96, 96), "white")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    encoded = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    job = _submit(server, {"task": "img2img", "image": encoded, "seed": 2, "prior_steps": 4, "strength": 0.6})
    assert job["job"]["input_image_sha256"] == image_sha256(picture) and job["job"]["strength"] == 0.6
    done = wait_for_job(server, job["id"])
    assert done["state"] == "done", done["error"]
    prompted = {"prompt": PROMPT, "image_prompts": [{"image": encoded, "strength": 0.5}], "prior_steps": 4}
    for body in ({"task": "variation", "image": encoded, "prior_steps": 4}, prompted):  # the demo's encoder
        job = _submit(server, body)
        done = wait_for_job(server, job["id"])
        assert done["state"] == "done", done["error"]
    assert [p["strength"] for p in job["job"]["image_prompts"]] == [0.5]


def test_a_job_that_fails_while_running_does_not_stop_the_worker(server: ServerProcess) -> None:
    # the server runs offline (HF_HUB_OFFLINE=1): the lite model cannot be downloaded
    failed = wait_for_job(server, _submit(server, {"prompt": PROMPT, "model": "lite"})["id"])
    assert failed["state"] == "failed" and failed["error"], failed
    # in the user's words: no exception class names, no command-line flags
    assert "Error" not in failed["error"] and "--" not in failed["error"], failed["error"]
    assert "this server has no copy of it" in failed["error"], failed["error"]
    done = wait_for_job(server, _submit(server, {"prompt": PROMPT, "prior_steps": 3})["id"])
    assert done["state"] == "done"
    log = server.log.read_text()  # one line per request and per change of a job's state
    assert "POST /v1/jobs 201" in log and f"GET /v1/jobs/{done['id']} 200" in log
    for state in ("queued (", "started", "done after"):
        assert f"job {done['id']} {state}" in log, state
    assert f"job {failed['id']} failed: " in log


def test_cancel_a_running_and_a_queued_job(server: ServerProcess) -> None:
    running = _submit(server, {"prompt": PROMPT, "count": 200, "prior_steps": 10})
    queued = _submit(server, {"prompt": PROMPT, "seed": 4})
    with _client(server) as client:
        assert client.get(f"/v1/jobs/{queued['id']}").json()["position"] == 0
        assert client.delete(f"/v1/jobs/{queued['id']}").status_code == 202
        assert client.delete(f"/v1/jobs/{running['id']}").status_code == 202
        assert wait_for_job(server, running["id"])["state"] == "cancelled"
        assert client.get(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
        again = client.delete(f"/v1/jobs/{queued['id']}")
        assert again.status_code == 409 and "already finished" in again.json()["detail"]
        assert client.get("/v1/jobs/nope").status_code == 404


def test_a_full_queue_answers_429(server: ServerProcess) -> None:
    first = _submit(server, {"prompt": PROMPT, "count": 200, "prior_steps": 10})
    with _client(server) as client:
        while client.get(f"/v1/jobs/{first['id']}").json()["state"] == "queued":
            pass
        ids = [_submit(server, {"prompt": PROMPT})["id"] for _ in range(3)]  # --max-queue 3
        full = client.post("/v1/jobs", json={"prompt": PROMPT})
        assert full.status_code == 429 and "queue is full" in full.json()["detail"]
        for job_id in [first["id"], *ids]:
            client.delete(f"/v1/jobs/{job_id}")


def test_bad_requests_get_a_clear_4xx(server: ServerProcess) -> None:
    with _client(server) as client:
        cases = [
            (client.post("/v1/jobs", content=b"{not json"), 400, "not valid JSON"),
            (client.post("/v1/jobs", json=[1, 2]), 422, "must be a JSON object"),
            (
                client.post("/v1/jobs", json={"prompt": PROMPT, "colour": "red"}),
                422,
                "unknown field(s) colour",
            ),
            (client.post("/v1/jobs", json={"width": 100000, "height": 128}), 422, "width"),
            (client.post("/v1/jobs", json={"prior_steps": 2.5}), 422, "Stage C steps must be a whole number"),
            (client.post("/v1/jobs", json={"task": "img2img", "image": "%%%"}), 422, "not valid base64"),
            (client.post("/v1/jobs", json={"job": {"prompt": PROMPT, "oops": 1}}), 422, "oops"),
            (client.post("/v1/jobs", json={"prompt": "x" * 600_000}), 413, "larger than"),
            (client.post("/v1/jobs", json={"loras": ["nope:0.5"]}), 422, "unknown LoRA 'nope'"),
            (client.post("/v1/jobs", json={"job": {"loras": [{"path": "/x.safetensors"}]}}), 422, "LoRA"),
        ]
    for answer, status, text in cases:
        assert answer.status_code == status, answer.text
        assert text in answer.json()["detail"], answer.json()


def test_the_documented_request_schema_takes_what_the_server_takes(server: ServerProcess) -> None:
    """``/docs`` shows the schema of ``POST /v1/jobs``: bodies the server takes fit it, and bodies it
    refuses do not (lists where lists go, the queue's ``priority``, no unknown names)."""
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schema = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    taken = [
        {"prompt": PROMPT, "seed": 3, "prior_steps": 2, "decoder_steps": 2, "priority": 5},
        {"prompt": PROMPT, "loras": [], "ip_adapters": [], "prior_steps": 2, "decoder_steps": 2},
        {"prompt": PROMPT, "negative_prompt": "blurry", "prior_guidance": 2.0, "decoder_sampler": "ddpm",
         "prior_steps": 2, "decoder_steps": 2, "width": 128, "height": 128},
    ]  # fmt: skip
    refused = [
        {"prompt": PROMPT, "ip_adapters": "look:0.8"},
        {"prompt": PROMPT, "loras": "look:0.8"},
        {"prompt": PROMPT, "priority": 1001},
        {"prompt": PROMPT, "prior_steps": 0},
        {"prompt": PROMPT, "no_such_field": 1},
    ]
    with _client(server) as client:
        for body in taken:
            jsonschema.validate(body, schema)
            answer = client.post("/v1/jobs", json=body)
            assert answer.status_code == 201, answer.text
            wait_for_job(server, answer.json()["id"])  # the queue holds 3
        for body in refused:
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(body, schema)
            answer = client.post("/v1/jobs", json=body)
            assert answer.status_code == 422, (body, answer.text)


def test_the_key_guards_everything_but_the_page(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/static/app.js").status_code == 200
    for path in ("/docs", "/openapi.json", "/docs-assets/swagger-ui.css"):  # the API's shape, no data
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    assert httpx.get(f"{server.url}/v1/events").status_code == 401
    for path in ("/v1/jobs", "/sdapi/v1/sd-models", "/v1/info", "/controlnet/model_list"):
        answer = httpx.get(server.url + path)
        assert answer.status_code == 401 and "API key" in answer.json()["detail"]
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="stable-cascade"'  # what to send
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(server.url + path, headers=server.headers).status_code == 200
        assert (
            httpx.get(server.url + path, auth=("anyone", KEY)).status_code == 200
        )  # A1111 clients' basic auth
        assert httpx.get(server.url + path, auth=("anyone", "wrong")).status_code == 401


def test_webuiapi_with_the_key_as_its_password(server: ServerProcess) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="me", password=KEY)
    result = api.txt2img(prompt=PROMPT, seed=1, width=128, height=128, steps=4)
    assert result.image.size == (128, 128)
