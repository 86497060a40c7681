"""The server's parts without a running server: settings checks, the A1111 field mapping, the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stable_cascade.cli.main import main
from stable_cascade.engine import ModelLibrary, ModelSources
from stable_cascade.fields.a1111 import sampler as our_sampler
from stable_cascade.fields.a1111 import scheduler
from stable_cascade.server import ServerConfig
from stable_cascade.server.a1111 import job_arguments
from stable_cascade.server.inputs import Served
from stable_cascade.server.models import model_arguments
from stable_cascade.server.store import CANCELLED, DONE, FAILED, MAX_ATTEMPTS, RUNNING, QueueFull, Store


def test_binding_beyond_this_machine_needs_a_key_or_insecure(tmp_path: Path) -> None:
    ServerConfig(host="127.0.0.1", data=tmp_path).validate()
    ServerConfig(host="::1", data=tmp_path).validate()
    with pytest.raises(ValueError, match=r"refusing to serve on 0\.0\.0\.0 without --api-key"):
        ServerConfig(host="0.0.0.0", data=tmp_path).validate()
    ServerConfig(host="0.0.0.0", api_key="k", data=tmp_path).validate()
    ServerConfig(host="0.0.0.0", insecure=True, data=tmp_path).validate()
    for wrong, message in (({"api_key": " "}, "must not be empty"), ({"workers": 0}, "--workers")):
        with pytest.raises(ValueError, match=message):
            ServerConfig(data=tmp_path, **wrong).validate()  # type: ignore[arg-type]


def test_serve_refuses_with_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--data", str(tmp_path), "--model", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refusing to serve on 0.0.0.0" in err


def test_the_parser_imports_neither_the_server_stack_nor_torch() -> None:
    code = "import sys; from stable_cascade.cli.main import build_parser; build_parser(); "
    heavy = "('fastapi', 'uvicorn', 'torch', 'stable_cascade.server')"
    code += f"print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a1111_sampler_and_model_names() -> None:
    names = {"Euler a": "euler_ancestral", "DDIM": "ddim", "DPM++ 2M": "dpmpp_2m", "DDPM": "ddpm"}
    for a1111, ours in names.items():
        assert our_sampler(a1111) == ours == our_sampler(ours) == our_sampler(a1111.lower())
    assert our_sampler("k_euler_a") == "euler_ancestral"
    with pytest.raises(ValueError, match="unknown sampler 'Heun'; expected one of Euler a"):
        our_sampler("Heun")
    # A1111's names with a scheduler suffix: the sampler runs on Stable Cascade's own schedule
    assert our_sampler("DPM++ 2M Karras") == our_sampler("dpm++ 2m exponential") == "dpmpp_2m"
    assert our_sampler("Euler a SGM Uniform") == "euler_ancestral" and our_sampler("DDIM DDIM") == "ddim"
    with pytest.raises(ValueError, match=r"unknown sampler 'Heun Karras'.*a scheduler suffix \(Karras"):
        our_sampler("Heun Karras")
    assert scheduler("karras") == "Karras" and scheduler("sgm_uniform") == "SGM Uniform"
    with pytest.raises(ValueError, match="unknown scheduler 'Wobbly'; expected one of"):
        scheduler("Wobbly")
    library = ModelLibrary()
    assert model_arguments(library, "demo [0123abcd]") == model_arguments(library, "demo")
    assert model_arguments(library, "demo") == {"models": ModelSources(model="demo")}
    with pytest.raises(ValueError, match="unknown model 'sd15'"):
        model_arguments(library, "sd15")


def test_a1111_fields_map_to_job_arguments() -> None:
    body = {
        "prompt": "p",
        "negative_prompt": "n",
        "seed": -1,
        "steps": 12,
        "cfg_scale": 5.0,
        "width": 256,
        "height": 128,
        "batch_size": 2,
        "n_iter": 3,
        "sampler_name": "DPM++ 2M",
        "decoder_guidance": 1.5,
        "override_settings": {"decoder_steps": 7, "sd_model_checkpoint": "demo", "emphasis": "No norm"},
        "enable_hr": False,
        "scheduler": "Karras",
    }
    served = Served(None, ModelLibrary(), "full")  # type: ignore[arg-type]  # no upload here
    arguments = job_arguments(body, served, None)
    assert arguments.pop("models") == ModelSources(model="demo")
    assert arguments == {
        "prompt": "p",
        "negative_prompt": "n",
        "seed": None,
        "prior_steps": 12,
        "prior_guidance": 5.0,
        "width": 256,
        "height": 128,
        "batch_size": 2,
        "count": 3,
        "prior_sampler": "dpmpp_2m",
        "decoder_guidance": 1.5,
        "decoder_steps": 7,
        "emphasis": "no_norm",
    }
    lite = Served(None, ModelLibrary(), "lite")  # type: ignore[arg-type]
    assert job_arguments({"seed": 4}, lite, None)["models"] == ModelSources(model="lite")
    assert job_arguments({"seed": 4}, lite, None)["seed"] == 4
    with pytest.raises(ValueError, match=r"enable_hr .* is not supported"):  # never ignored
        job_arguments({"enable_hr": True}, lite, None)
    with pytest.raises(ValueError, match="unknown scheduler 'Wobbly'"):
        job_arguments({"override_settings": {"scheduler": "Wobbly"}}, lite, None)


def test_store_is_fifo_bounded_and_recovers_running_jobs_in_place(tmp_path: Path) -> None:
    store = Store(tmp_path, max_queue=3)
    ids = [store.add({"n": i}).id for i in range(3)]
    with pytest.raises(QueueFull, match="the queue is full"):
        store.add({"n": 3})
    first = store.claim()
    assert first is not None and first.id == ids[0] and first.state == RUNNING
    assert store.position(store.get(ids[2])) == 1  # type: ignore[arg-type]
    assert store.cancel_queued(ids[1]) and not store.cancel_queued(ids[0])
    store.close()

    reopened = Store(tmp_path, max_queue=3)  # as after a crash: the first job was running
    assert reopened.recover() == 1
    assert [reopened.claim().id, reopened.claim().id] == [ids[0], ids[2]]  # type: ignore[union-attr]
    reopened.finish(ids[0], DONE)
    assert reopened.claim() is None
    assert [reopened.get(i).state for i in ids] == [DONE, CANCELLED, RUNNING]  # type: ignore[union-attr]


def test_a_job_that_keeps_killing_the_server_is_given_up(tmp_path: Path) -> None:
    store = Store(tmp_path, max_queue=3)
    job_id = store.add({}).id
    for _ in range(MAX_ATTEMPTS):
        assert store.claim() is not None
        store.recover()
    assert store.claim() is None
    stored = store.get(job_id)
    assert stored is not None and stored.state == FAILED and "given up" in str(stored.error)


def test_serve_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: stable-cascade serve" in out and "--api-key" in out and "--insecure" in out


def test_info_lists_each_models_controlnets_and_whether_it_is_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import huggingface_hub
    from fastapi.testclient import TestClient

    from stable_cascade.server.app import create_app

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    app = create_app(ServerConfig(model="demo", data=tmp_path / "demo", device="cpu"))
    answer = TestClient(app).get("/v1/info")  # no lifespan: no worker starts
    assert answer.status_code == 200, answer.text
    models = answer.json()["models"]
    assert models["demo"]["controlnets"] == ["canny"]
    assert models["full"]["controlnets"] == ["canny", "inpainting", "super_resolution"]
    assert models["lite"]["controlnets"] == []
    assert models["demo"]["available"] and not models["full"]["available"]  # not downloaded: marked
    assert "default model" not in caplog.text
    create_app(ServerConfig(model="full", data=tmp_path / "full", device="cpu"))
    assert "the default model full is not on this machine" in caplog.text  # said at start


def test_a_requests_fields_are_checked_before_its_images_are_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64
    import io

    import PIL.Image

    from stable_cascade.server import inputs, routes_a1111

    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    decoded: list[str] = []
    monkeypatch.setattr(inputs, "decode_image", lambda *a, **k: decoded.append("native"))
    monkeypatch.setattr(routes_a1111, "decode_image", lambda *a, **k: decoded.append("a1111"))
    store = Store(tmp_path / "data", 10)
    body = {"task": "img2img", "prompt": "x", "width": 100, "image": image}
    served = inputs.Served(store, ModelLibrary(), "demo")
    with pytest.raises(ValueError, match="width must be a multiple of 8"):
        inputs.native_job(body, served)

    class Stub:
        model = "demo"
        library = ModelLibrary()

    Stub.store = store  # type: ignore[attr-defined]
    Stub.served = served  # type: ignore[attr-defined]
    a1111_body = {"prompt": "x", "steps": 0, "init_images": [image]}
    with pytest.raises(ValueError, match="Stage C steps must be between 1 and 1000"):
        routes_a1111._job(Stub(), a1111_body, img2img=True)  # type: ignore[arg-type]
    assert decoded == [] and list(store.inputs_dir.iterdir()) == []
    store.close()


def test_the_hub_hands_each_news_item_on_once_to_each_kind_of_subscriber() -> None:
    import asyncio

    from stable_cascade.server.hub import ALL, Hub

    async def scenario() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        hub = Hub(lambda job_id: 10)  # news up to 10 was posted before anyone subscribed
        hub.bind(asyncio.get_running_loop())
        own, everyone = hub.subscribe("a"), hub.subscribe(ALL)
        assert hub.cursors() == {"a": 10} and hub.everyone() == (10, 10)
        hub.publish("a", 12, {"type": "progress"})
        hub.publish("b", 11, {"type": "started"}, to_job=False)  # committed late, found on a second look
        hub.publish("a", 12, {"type": "progress"}, to_job=False)  # found again: dropped
        hub.publish("a", 13, {"type": "preview"})  # the job's own subscribers only
        hub.publish("a", 9, {"type": "started"})  # before anyone subscribed: dropped
        hub.publish("b", 14, {"type": "done"})
        assert hub.cursors() == {"a": 13} and hub.everyone() == (10, 14)
        await asyncio.sleep(0)
        return [own.get_nowait() for _ in range(own.qsize())], [
            everyone.get_nowait() for _ in range(everyone.qsize())
        ]

    own, everyone = asyncio.run(scenario())
    assert own == [{"type": "progress"}, {"type": "preview"}]
    assert everyone == [
        {"type": "progress", "id": "a"},
        {"type": "started", "id": "b"},
        {"type": "done", "id": "b"},
    ]
