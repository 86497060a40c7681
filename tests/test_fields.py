"""The field table walked front end by front end: every field a front end carries (the table says why
where one does not) is given a value that is not its default and reaches the job that front end builds,
and from it the PNG record; records, reruns (``--from-png``) and the infotext give the values back.
(The web page's form and "Reuse parameters": tests/test_server_browser.py.)"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

from stable_cascade.cli.generate import job_of
from stable_cascade.cli.main import build_parser
from stable_cascade.engine import ImageRecord, Job, image_sha256, read_png, save_png
from stable_cascade.fields import BY_NAME, FIELDS, FRONT_ENDS, FrontEnd, infotext
from stable_cascade.fields.schema import form_fields, request_schema

#: A value for every field that is not its default (the model: "full", whose released ControlNets
#: include inpainting; nothing is loaded: jobs are only created and recorded here).
SAMPLE: dict[str, Any] = {
    "prompt": "a red circle",
    "negative_prompt": "blue, dark",
    "emphasis": "no_norm",
    "strength": 0.6,
    "width": 64,
    "height": 72,
    "seed": 11,
    "batch_size": 2,
    "count": 3,
    "preset": "diffusers",
    "prior_steps": 3,
    "prior_guidance": 2.5,
    "prior_sampler": "ddim",
    "prior_shift": 1.5,
    "prior_rescale": 0.3,
    "decoder_steps": 2,
    "decoder_guidance": 1.5,
    "decoder_sampler": "euler_ancestral",
    "decoder_shift": 1.25,
    "decoder_rescale": 0.2,
    "model": "full",
    "dtype": "fp32",
    "controlnet": "inpainting",
    "control_scale": 0.7,
    "control_type": "inpainting",
}
IMAGE_FIELDS = ("input_image", "control_image", "mask")
#: Image prompts: (file, strength) per field (the files: the fixture's).
PROMPTS = {
    "image_prompts": [("prompt_a", 0.5), ("prompt_b", 1.5)],
    "negative_image_prompts": [("prompt_c", 0.25)],
}
MODEL_FILES = ("prior", "decoder", "stage_a", "effnet", "previewer", "components")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An input image, a control image and a mask, model files and a LoRA file (never loaded)."""
    folder = tmp_path_factory.mktemp("fields")
    paths = {}
    images = {"input_image": (200, 30, 30), "control_image": (0, 0, 0), "mask": (255,) * 3}
    images |= {"prompt_a": (10, 200, 10), "prompt_b": (10, 10, 200), "prompt_c": (90, 90, 90)}
    for name, colour in images.items():
        paths[name] = folder / f"{name}.png"
        PIL.Image.new("RGB", (64, 72), colour).save(paths[name])
    for name in (*MODEL_FILES, "loras", "ip_adapters"):
        paths[name] = folder / f"{name}.safetensors"
        paths[name].write_bytes(name.encode())
    return paths


def _encoded(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _check(job: Job, front_end: FrontEnd, files: dict[str, Path], names: str = "") -> None:
    """Every field ``front_end`` carries holds its sample value (images and files: theirs)."""
    for field in FIELDS:
        if not field.carried_by(front_end) or field.kind == "sha256" or field.name == "task":
            continue
        value = getattr(job, field.name)
        if field.name in SAMPLE:
            assert value == SAMPLE[field.name], (front_end, field.name, value)
        elif field.name in ("loras", "ip_adapters"):
            assert [(ref.path, ref.scale) for ref in value] == [(str(files[field.name]), 0.5)], front_end
        elif field.name in PROMPTS:  # the files, or the server's copies of the uploads, with strengths
            wanted = [
                (image_sha256(PIL.Image.open(files[name])), strength)
                for name, strength in PROMPTS[field.name]
            ]
            assert [(ref.sha256, ref.strength) for ref in value] == wanted, (front_end, field.name)
            assert all(image_sha256(PIL.Image.open(ref.path)) == ref.sha256 for ref in value)
        elif field.name in MODEL_FILES:
            assert value == str(files[field.name]), (front_end, field.name)
        elif field.name == "input_image":
            assert value == names or value == files[field.name].name, (front_end, field.name, value)
        else:  # the control image and the mask: their files, or the server's copies of the uploads
            assert value is not None and image_sha256(PIL.Image.open(value)) == image_sha256(
                PIL.Image.open(files[field.name])
            ), (front_end, field.name)
    assert job.input_image_sha256 == image_sha256(PIL.Image.open(files["input_image"]))
    assert job.control_image_sha256 is not None and job.mask_sha256 is not None


def _record_round_trip(job: Job, tmp_path: Path) -> ImageRecord:
    record = ImageRecord(job, index=1, seed=job.seed + 1, width=job.width, height=job.height)
    save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "record.png", record)
    read = read_png(tmp_path / "record.png")
    assert read == record and read.job.to_dict() == job.to_dict()
    return record


def test_every_field_is_a_job_attribute_and_every_front_end_has_a_way_or_a_reason() -> None:
    assert [field.name for field in FIELDS] == list(Job.__dataclass_fields__)
    for field in FIELDS:
        assert all(reason.strip() for reason in field.why_not.values()), field.name
        assert set(field.why_not) <= set(FRONT_ENDS), field.name
        assert not field.carried_by("cli") or field.cli, field.name
        assert not field.carried_by("form") or field.widget, field.name
        assert not field.carried_by("infotext") or field.infotext, field.name
        assert field.carried_by("record"), field.name  # the record is the job
    assert [f["name"] for f in form_fields()] == [f.name for f in FIELDS if f.carried_by("form")]
    schema = request_schema()["properties"]
    assert {f.name for f in FIELDS if f.carried_by("api")} <= set(schema)


def test_the_command_line_carries_every_field_and_reruns_it(files: dict[str, Path], tmp_path: Path) -> None:
    """Including the settings the command line lacked: both stages' samplers, shifts and rescales."""
    argv = ["img2img", str(files["input_image"]), SAMPLE["prompt"], "--lora", f"{files['loras']}:0.5"]
    argv += ["--ip-adapter", f"{files['ip_adapters']}:0.5"]
    for name, prompts in PROMPTS.items():
        for file, strength in prompts:
            argv += [BY_NAME[name].cli[0], f"{files[file]}:{strength}"]
    for field in FIELDS:
        options = [flag for flag in field.cli if flag.startswith("-")]
        if options and field.name in SAMPLE:
            argv += [options[0], str(SAMPLE[field.name])]
        elif options and field.name in files and field.kind not in ("loras", "ip_adapters"):
            argv += [options[0], str(files[field.name])]
    job, _, _ = job_of(build_parser().parse_args(argv))
    assert job.task == "img2img"
    _check(job, "cli", files)
    record = _record_round_trip(job, tmp_path)
    again = ["img2img", str(files["input_image"]), "--from-png", str(tmp_path / "record.png")]
    rerun, _, _ = job_of(build_parser().parse_args(again))
    assert rerun == record.single_job()


def test_automatic1111_requests_and_infotexts_carry_every_field(
    files: dict[str, Path], tmp_path: Path
) -> None:
    from stable_cascade.engine import ModelLibrary
    from stable_cascade.server import a1111
    from stable_cascade.server.controls import a1111_controlnet
    from stable_cascade.server.image_prompts import a1111_image_prompts
    from stable_cascade.server.inputs import Served, checked_job
    from stable_cascade.server.store import Store
    from stable_cascade.server.uploads import decode_image

    store = Store(tmp_path / "data", 10)
    served = Served(store, ModelLibrary(), "lite")
    body: dict[str, Any] = {"override_settings": {}}
    for field in FIELDS:
        if field.name in SAMPLE and field.carried_by("a1111"):
            name = field.a1111 or field.name
            value = SAMPLE[field.name]
            if field.kind == "choice" and field.choice_names:  # A1111's names: "Euler a"
                value = field.name_of(value)
            (body["override_settings"] if field.name.startswith("decoder") else body)[name] = value
    body["n_iter"], body["init_images"] = SAMPLE["count"], [_encoded(files["input_image"])]
    units = [{"module": "ip-adapter_clip_sd15", "input_image": _encoded(files[file]), "weight": strength}
             for file, strength in PROMPTS["image_prompts"]]  # fmt: skip
    body["alwayson_scripts"] = {"controlnet": {"args": units}}
    upload = decode_image(body["init_images"][0], store, "init_images[0]")
    arguments = a1111.job_arguments(body, served, upload.sha256)
    mask = decode_image(_encoded(files["mask"]), store, "mask")
    control_image = str(store.inputs_dir / upload.name)
    controls = {"controlnet": "inpainting", "control_image": control_image}
    controls["mask"] = str(store.inputs_dir / mask.name)
    arguments["image_prompts"] = a1111_image_prompts(body, store)
    assert a1111_controlnet(body, store, served.library) is None  # IP-Adapter units are image prompts
    job = checked_job({**arguments, **controls, "control_scale": 0.7}, upload, served)
    files = {**files, "control_image": files["input_image"]}  # A1111 inpaints the init image
    _check(job, "a1111", files, names="init_images[0]")
    store.close()
    record = _record_round_trip(job, tmp_path)
    text = record.infotext()
    parsed = infotext.parse(text)
    for field in FIELDS:
        if field.carried_by("infotext"):
            expected = record.seed if field.name == "seed" else getattr(job, field.name)
            assert parsed.get(field.name) == expected, (field.name, text)
    a1111_text = "a cat\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x640, Model: lite"
    given = infotext.parse(a1111_text)  # A1111's own text: its keys are Stage C's
    assert given == {"prompt": "a cat", "negative_prompt": "", "prior_steps": 30, "prior_guidance": 7.0,
                     "prior_sampler": "euler_ancestral", "seed": 5, "width": 512, "height": 640,
                     "model": "lite"}  # fmt: skip


def test_the_native_api_carries_every_field(files: dict[str, Path], tmp_path: Path) -> None:
    from stable_cascade.engine import ModelLibrary
    from stable_cascade.server.inputs import Served, native_job
    from stable_cascade.server.store import Store

    store = Store(tmp_path / "data", 10)
    (tmp_path / "models" / "loras").mkdir(parents=True)  # the server's LoRAs are named, in its folder
    (tmp_path / "models" / "loras" / "ink.safetensors").symlink_to(files["loras"])
    (tmp_path / "models" / "ipadapter").mkdir()  # and so are its IP-Adapters
    (tmp_path / "models" / "ipadapter" / "look.safetensors").symlink_to(files["ip_adapters"])
    served = Served(store, ModelLibrary(tmp_path / "models"), "lite")
    body: dict[str, Any] = {
        "task": "img2img",
        "image": _encoded(files["input_image"]),
        "input_image": "in.png",
    }
    body.update({name: value for name, value in SAMPLE.items() if BY_NAME[name].carried_by("api")})
    body.update(control_image=_encoded(files["control_image"]), mask=_encoded(files["mask"]))
    body["loras"] = [{"name": "ink", "scale": 0.5}]
    body["ip_adapters"] = ["look:0.5"]
    for name, prompts in PROMPTS.items():
        body[name] = [{"image": _encoded(files[file]), "strength": strength} for file, strength in prompts]
    job, _ = native_job(json.loads(json.dumps(body)), served)
    _check(job, "api", files, names="in.png")
    shown = {"job": job.to_dict(), "image": body["image"]}  # a job as GET /v1/jobs/{id} shows it
    again, _ = native_job(shown, served)
    assert again == job
    store.close()


def test_batch_files_carry_every_field(files: dict[str, Path], tmp_path: Path) -> None:
    from stable_cascade.batch.items import COLUMNS, read_items
    from stable_cascade.batch.plan import plan_items

    row = {name: value for name, value in SAMPLE.items() if name in COLUMNS or name == "prompt"}
    row.update(
        task="img2img", input_image="input_image.png", control_image="control_image.png", mask="mask.png"
    )
    prompts = {
        name: [f"{file}.png:{strength}" for file, strength in items] for name, items in PROMPTS.items()
    }
    settings = {"model": "full", "dtype": "fp32", "loras": [(str(files["loras"]), 0.5)]}
    settings["ip_adapters"] = [(str(files["ip_adapters"]), 0.5)]
    settings.update({name: str(files[name]) for name in MODEL_FILES})
    for suffix in (".jsonl", ".csv"):
        items = files["input_image"].parent / f"items{suffix}"
        if suffix == ".jsonl":
            items.write_text(json.dumps({**row, **prompts}) + "\n")
        else:
            text = io.StringIO()
            cells = {name: ";".join(texts) for name, texts in prompts.items()}
            writer = csv.DictWriter(text, fieldnames=[*row, *cells])
            writer.writeheader()
            writer.writerow({**row, **cells})
            items.write_text("\ufeff" + text.getvalue())  # a BOM, as spreadsheets write it
        (planned,) = plan_items(read_items(items), settings, base_seed=1)
        job = planned.job.replace(batch_size=SAMPLE["batch_size"])  # batch makes one image a row
        _check(job, "batch", files)


def test_the_diffusers_preset_is_diffusers_combined_pipelines_everywhere() -> None:
    """The command line, the server and batch runs make jobs: their ``diffusers`` preset is diffusers'
    combined pipeline's 60 + 12 steps, as ``StableCascadeCombinedPipeline(preset="diffusers")``."""
    import inspect

    import diffusers

    from stable_cascade.diffusion.presets import COMBINED_PRESETS

    theirs = inspect.signature(diffusers.StableCascadeCombinedPipeline.__call__).parameters
    steps = (theirs["prior_num_inference_steps"].default, theirs["num_inference_steps"].default)
    job = Job.create(prompt="x", preset="diffusers")
    assert (job.prior_steps, job.decoder_steps) == steps == (60, 12)
    preset = COMBINED_PRESETS["diffusers"]
    assert (preset.prior.steps, preset.decoder.steps) == steps
    args = build_parser().parse_args(["generate", "x", "--preset", "diffusers"])
    assert (job_of(args)[0].prior_steps, job_of(args)[0].decoder_steps) == steps


@pytest.mark.parametrize(
    "name", [f.name for f in FIELDS if f.kind == "choice" and f.name != "model" and f.carried_by("cli")]
)
def test_a_wrong_choice_gets_the_engines_message_on_the_command_line(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Validation is the engine's: the command line answers a wrong choice with the field's own check
    (which a job runs; the server and batch files answer with it too)."""
    with pytest.raises(ValueError) as engine:
        BY_NAME[name].check("nope")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "x", BY_NAME[name].cli[0], "nope"])
    assert f"{BY_NAME[name].cli[0]}: {engine.value}" in capsys.readouterr().err
