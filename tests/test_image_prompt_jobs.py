"""Image prompts as job fields: the job's references (each image's sha256, a strength), the command line's
``--image-prompt FILE[:STRENGTH]``, the native API's uploads, the A1111 ControlNet extension's
IP-Adapter units, batch files; every mistake (an unreadable or oversized image, a strength that is not
finite, a model without an image encoder, files the server must not read) is one clear line."""

from __future__ import annotations

import base64
import dataclasses
import struct
import zlib
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

from stable_cascade.cli.main import build_parser, main
from stable_cascade.engine import Job, ModelLibrary, image_sha256
from stable_cascade.loading.bundles import BUNDLES
from stable_cascade.server.inputs import Served, native_job
from stable_cascade.server.store import Store


@pytest.fixture()
def pictures(tmp_path: Path) -> list[Path]:
    paths = []
    for index, colour in enumerate(("red", "green", "blue")):
        paths.append(tmp_path / f"picture{index}.png")
        PIL.Image.new("RGB", (40, 32), colour).save(paths[-1])
    return paths


def encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_a_job_names_each_image_with_its_pixels_sha256_and_strength(pictures: list[Path]) -> None:
    job = Job.create(
        prompt="a cat",
        model="lite",
        image_prompts=[(pictures[0], 0.5), (str(pictures[1]), 1.0)],
        negative_image_prompts=[(pictures[2], 2.0)],
    )
    digests = [image_sha256(PIL.Image.open(p)) for p in pictures]
    assert [(r.path, r.strength, r.sha256) for r in job.image_prompts] == [
        (str(pictures[0].resolve()), 0.5, digests[0]),
        (str(pictures[1].resolve()), 1.0, digests[1]),
    ]
    assert job.negative_image_prompts[0].sha256 == digests[2]
    again = Job.from_dict(job.to_dict())
    assert again == job
    PIL.Image.new("RGB", (40, 32), "white").save(pictures[0])  # the file changed since
    with pytest.raises(ValueError, match="is not the one the job names") as error:
        Job.create(prompt="a cat", model="lite", image_prompts=list(job.image_prompts))
    one_line(error)


def png_claiming(png: bytes, width: int, height: int) -> bytes:
    start = png.index(b"IHDR")
    chunk = b"IHDR" + struct.pack(">II", width, height) + png[start + 12 : start + 17]
    return png[:start] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[start + 21 :]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda p: {"image_prompts": [(p / "missing.png", 1.0)]},
            "image prompt .*missing.png does not exist",
        ),
        (lambda p: {"image_prompts": [(p / "text.png", 1.0)]}, r"text.png is not an image file"),
        (lambda p: {"image_prompts": [(p / "bomb.png", 1.0)]}, r"bomb.png is too large to open safely"),
        (lambda p: {"image_prompts": [(p / "picture0.png", float("nan"))]}, "strength must be a finite"),
        (lambda p: {"image_prompts": [(p / "picture0.png", -1)]}, r"strength must be in \[0, 10\]"),
        (lambda p: {"image_prompts": [(p / "picture0.png", 1.0)] * 17}, "at most 16 images"),
        (lambda p: {"image_prompts": [(p / "picture0.png", 1.0)], "task": "reconstruct"}, "Stage C"),
        (lambda p: {"ip_adapters": [(p / "missing.safetensors", 1.0)]}, "IP-Adapter file .* does not exist"),
    ],
)
def test_bad_image_prompts_get_one_line(pictures: list[Path], make: Any, match: str, tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(png_claiming(pictures[0].read_bytes(), 20_000, 20_000))
    values = {"prompt": "a cat", "model": "lite", **make(tmp_path)}
    with pytest.raises(ValueError, match=match) as error:
        Job.create(**values)
    one_line(error)


def test_a_model_without_an_image_encoder_refuses_image_prompts(
    pictures: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shipped model has one now; a model without (as the demo was before its image steps) is
    refused when the job is made, before any model loads."""
    monkeypatch.setitem(BUNDLES, "demo", dataclasses.replace(BUNDLES["demo"], image_encoder=False))
    for values, what in (
        ({"image_prompts": [(pictures[0], 1.0)]}, "take image prompts"),
        ({"task": "variation", "input_image_sha256": "ab", "image_size": (64, 64)}, "make variations"),
    ):
        with pytest.raises(
            ValueError, match=f"the demo model has no CLIP image encoder, so it cannot {what}"
        ) as error:
            Job.create(**{"prompt": "a cat", "model": "demo", **values})
        one_line(error)
    Job.create(
        prompt="a cat", model="demo", image_prompts=[(pictures[0], 1.0)], prior="some/prior"
    )  # its own


def test_the_command_line_takes_image_prompts_with_strengths(pictures: list[Path]) -> None:
    from stable_cascade.cli.generate import job_of

    argv = ["generate", "a cat", "--model", "lite", "--image-prompt", f"{pictures[0]}:0.25"]
    argv += ["--image-prompt", str(pictures[1]), "--negative-image-prompt", f"{pictures[2]}:1.5"]
    job, _, _ = job_of(build_parser().parse_args(argv))
    assert [r.strength for r in job.image_prompts] == [0.25, 1.0]
    assert job.negative_image_prompts[0].path == str(pictures[2].resolve())


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("{0}:inf", "argument --image-prompt: the strength of '{0}:inf' must be a finite number"),
        ("{0}:-2", "must be >= 0 (0 leaves the image out)"),
        ("{0}:much", "expected FILE or FILE:STRENGTH with a number STRENGTH"),
        ("nowhere.png:1", "argument --image-prompt: image nowhere.png does not exist"),
    ],
)
def test_image_prompt_option_mistakes(
    pictures: list[Path], option: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--model", "lite", "--image-prompt", option.format(pictures[0])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected.format(pictures[0]) in err and len(err.splitlines()) == 1


def test_the_native_api_takes_uploads_and_refuses_paths_and_unknown_adapters(
    pictures: list[Path], tmp_path: Path
) -> None:
    store = Store(tmp_path / "data", 10)
    served = Served(store, ModelLibrary(), "lite")
    try:
        body = {"prompt": "a cat", "image_prompts": [{"image": encoded(pictures[0]), "strength": 0.5}]}
        body["negative_image_prompts"] = [{"image": encoded(pictures[1])}]
        job, _ = native_job(body, served)
        assert Path(job.image_prompts[0].path).parent == store.inputs_dir
        assert (job.image_prompts[0].strength, job.negative_image_prompts[0].strength) == (0.5, 1.0)
        again, _ = native_job({"job": job.to_dict()}, served)  # as GET /v1/jobs/{id} shows it
        assert again == job
        elsewhere = Job.create(prompt="a cat", model="lite", image_prompts=[(pictures[0], 1.0)])
        mistakes: dict[str, Any] = {
            "send image prompts as uploads": {"job": elsewhere.to_dict()},
            "must be a list of": {"prompt": "x", "image_prompts": encoded(pictures[0])},
            "unknown key 'weight' in image_prompts\\[0\\]": {"prompt": "x", "image_prompts": [{"weight": 1}]},
            "image_prompts\\[0\\] needs 'image'": {"prompt": "x", "image_prompts": [{"strength": 1}]},
            "strength of image_prompts\\[0\\] must be a number": {
                "prompt": "x",
                "image_prompts": [{"image": encoded(pictures[0]), "strength": "high"}],
            },
            "image_prompts\\[0\\].image": {"prompt": "x", "image_prompts": [{"image": "bm90IGFuIGltYWdl"}]},
            "takes IP-Adapters by name from its models folder": {
                "job": {**job.to_dict(), "ip_adapters": [{"path": str(pictures[0])}]}
            },
            "unknown IP-Adapter 'look'; expected one of none": {"prompt": "x", "ip_adapters": ["look"]},
        }
        for match, bad in mistakes.items():
            with pytest.raises(ValueError, match=match) as error:
                native_job(bad, served)
            one_line(error)
    finally:
        store.close()


def test_a1111_ip_adapter_units_are_image_prompts(pictures: list[Path], tmp_path: Path) -> None:
    from stable_cascade.server.controls import a1111_controlnet
    from stable_cascade.server.image_prompts import a1111_image_prompts

    store = Store(tmp_path / "data", 10)
    try:
        units = [
            {"module": "ip-adapter_clip_sd15", "input_image": encoded(pictures[0]), "weight": 0.7},
            {"module": "ip-adapter_clip_h", "image": encoded(pictures[1]), "enabled": False},
            {"module": "canny", "input_image": encoded(pictures[2]), "weight": 0.5},
        ]
        body = {"alwayson_scripts": {"controlnet": {"args": units}}}
        (prompt,) = a1111_image_prompts(body, store)
        assert prompt[1] == 0.7 and image_sha256(PIL.Image.open(prompt[0])) == image_sha256(
            PIL.Image.open(pictures[0])
        )
        control = a1111_controlnet(body, store, ModelLibrary())
        assert control is not None and control.controlnet == "canny" and control.scale == 0.5
        with pytest.raises(ValueError, match=r"strength of alwayson_scripts.controlnet.args\[0\] must be in"):
            a1111_image_prompts(
                {"alwayson_scripts": {"controlnet": {"args": [{**units[0], "weight": 99}]}}}, store
            )
    finally:
        store.close()


def test_batch_items_take_image_prompt_columns(pictures: list[Path], tmp_path: Path) -> None:
    from stable_cascade.batch.items import read_items
    from stable_cascade.batch.plan import plan_items

    items = tmp_path / "items.jsonl"
    items.write_text(
        '{"prompt": "a cat", "image_prompts": ["picture0.png:0.5", "picture1.png"]}\n'
        '{"prompt": "a dog", "negative_image_prompts": "picture2.png:2"}\n'
        '{"prompt": "a cow", "image_prompts": ["nowhere.png"]}\n'
    )
    with pytest.raises(ValueError, match=r"items.jsonl:3: image_prompts .*nowhere.png does not exist"):
        read_items(items)
    items.write_text(items.read_text().rsplit("{", 1)[0])
    first, second = plan_items(read_items(items), {"model": "lite"}, base_seed=0)
    assert [(Path(r.path).name, r.strength) for r in first.job.image_prompts] == [
        ("picture0.png", 0.5),
        ("picture1.png", 1.0),
    ]
    assert second.job.negative_image_prompts[0].strength == 2.0


def test_a_worker_reads_image_prompts_from_its_own_host(pictures: list[Path], tmp_path: Path) -> None:
    """A queued job names its image prompt uploads by their paths on the server that took it; a worker
    reads them from its store's inputs (fetched from the database when it is on another host)."""
    from stable_cascade.server.worker import Workers

    store = Store(tmp_path / "worker", 10)
    try:
        upload = store.inputs_dir / "prompt.png"
        upload.write_bytes(pictures[0].read_bytes())
        elsewhere = {"path": "/elsewhere/inputs/prompt.png", "strength": 0.5, "sha256": None}
        workers = Workers(store, [])
        local = workers._local_inputs({"prompt": "a cat", "image_prompts": [elsewhere]})
        assert local["image_prompts"] == [{**elsewhere, "path": str(upload)}]
    finally:
        store.close()
