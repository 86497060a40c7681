"""Batch generation on the demo model: PROMPTS files, seeds, batched units, the output folder (images,
manifest, summary), resuming, refused reruns, errors before any model loads, and two processes
(torchrun, gloo) that make exactly the images of one, even when killed part-way and restarted."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from stable_cascade.batch import BatchItem, generate_batch, item_seed, read_items, store
from stable_cascade.batch.plan import plan_items, plan_units
from stable_cascade.cli.main import main
from stable_cascade.engine import Engine, ImageDone, ModelSources, read_png
from stable_cascade.engine.hashing import image_sha256

ROOT = Path(__file__).resolve().parents[1]
DEMO = ModelSources(model="demo")
SETTINGS = {"models": DEMO, "prior_steps": 4, "decoder_steps": 2}
FLAGS = ["--model", "demo", "--prior-steps", "4", "--decoder-steps", "2", "--seed", "7", "--no-progress"]
SLOW = ["--decoder-steps", "20"]  # enough work for a run to be killed in the middle
PROMPTS = "a red circle\n# a comment\n\na blue square\na red circle\na green triangle\na yellow star\n"


def pixels(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: pixels(p) for p in sorted(folder.glob("*.png"))}


def manifest(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(autouse=True)
def no_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


# -- items and seeds -------------------------------------------------------------------------------


def test_txt_skips_blank_lines_and_comments(prompts: Path) -> None:
    items = read_items(prompts)
    assert [i.prompt for i in items] == [
        "a red circle",
        "a blue square",
        "a red circle",
        "a green triangle",
        "a yellow star",
    ]
    assert items[1].where == "prompts.txt:4"


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path: Path) -> None:
    """Spreadsheets and Notepad start UTF-8 files with a BOM: it is dropped from TXT, JSONL and CSV."""
    files = {
        "p.txt": "a red circle\nb\n",
        "p.jsonl": '{"prompt": "a red circle"}\n{"prompt": "b"}\n',
        "p.csv": "prompt\na red circle\nb\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text("\ufeff" + text, encoding="utf-8")
        assert [i.prompt for i in read_items(tmp_path / name)] == ["a red circle", "b"], name


def test_jsonl_and_csv_carry_typed_overrides(tmp_path: Path) -> None:
    (tmp_path / "in.png").write_bytes(b"")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 3, "prior_guidance": 2}\n\n{"prompt": "b", "count": 2}\n')
    assert [(i.prompt, dict(i.overrides)) for i in read_items(jsonl)] == [
        ("a", {"seed": 3, "prior_guidance": 2}),
        ("b", {"count": 2}),
    ]
    table = tmp_path / "p.csv"
    table.write_text('prompt,seed,width,prior_guidance\n"a, with comma",5,,1.5\nb,,64,\n')
    assert [(i.prompt, dict(i.overrides), i.where) for i in read_items(table)] == [
        ("a, with comma", {"seed": 5, "prior_guidance": 1.5}, "p.csv:2"),
        ("b", {"width": 64}, "p.csv:3"),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "sede": 1}\n', "p.jsonl:2: unknown key 'sede'"),
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n', "p.jsonl:3: not a JSON object"),
        ("p.jsonl", '{"prompt": "a", "seed": "1"}\n', "p.jsonl:1: seed must be a whole number"),
        ("p.jsonl", '{"seed": 1}\n', 'p.jsonl:1: the object has no "prompt"'),
        ("p.jsonl", '{"prompt": "a", "task": "img2img", "image": "gone.png"}\n', "p.jsonl:1: image"),
        ("p.csv", "prompt,seed\na,1\nb,x\n", "p.csv:3: seed must be a whole number, got 'x'"),
        ("p.csv", "text\na\n", "p.csv:1: the CSV header has no prompt column"),
        ("p.txt", "# only a comment\n\n", "has no items"),
    ],
)
def test_a_bad_line_is_named(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        read_items(path)
    assert message in str(error.value)


def test_seeds_come_from_the_item_index_and_units_from_the_items_alone(prompts: Path) -> None:
    items = [
        *read_items(prompts),
        BatchItem("own seed", {"seed": 11, "count": 3}),
        BatchItem("x", {"width": 64}),
    ]
    planned = plan_items(items, SETTINGS, 40)
    assert [p.job.seed for p in planned] == [40, 100_040, 200_040, 300_040, 400_040, 11, 600_040]
    assert item_seed(40, 3) == 300_040 and planned[5].files == (
        "000005_0.png",
        "000005_1.png",
        "000005_2.png",
    )
    units = plan_units(planned, 2)
    assert [u.images for u in units] == [
        ((0, 0), (1, 0)),
        ((2, 0), (3, 0)),
        ((4, 0), (5, 0)),
        ((5, 1), (5, 2)),
        ((6, 0),),  # another size: its own unit
    ]
    with pytest.raises(ValueError, match=r"prompts\.txt:5: width must be a multiple of 8"):
        plan_items([*items[:3], BatchItem("bad", {"width": 100}, "prompts.txt:5")], SETTINGS, 40)


# -- one process -----------------------------------------------------------------------------------


def test_a_run_writes_images_manifest_and_summary_and_a_rerun_skips_them(
    prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    summary = generate_batch(prompts, out, settings=SETTINGS, seed=7, batch_size=2, progress=False)
    assert (summary.images, summary.generated, summary.skipped, summary.per_process) == (5, 5, 0, (5,))
    assert summary.texts_encoded == 4 + 1  # four distinct prompts and the empty negative prompt, once each
    lines = manifest(out)
    assert [(e["item"], e["file"], e["seed"]) for e in lines] == [
        (i, f"{i:06d}.png", 7 + 100_000 * i) for i in range(5)
    ]
    for entry in lines:
        path = out / str(entry["file"])
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["record"] == read_png(path).to_dict()
    assert json.loads((out / "summary.json").read_text())["generated"] == 5
    assert {p.name for p in out.glob(".*")} == {store.LOCK}  # no temporary file or journal left
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    refuse_loading(monkeypatch)  # nothing left: no model loads, no unit runs
    again = generate_batch(prompts, out, settings=SETTINGS, batch_size=3, progress=False)  # the stored seed
    assert (again.generated, again.skipped) == (0, 5)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert manifest(out) == lines


def test_an_image_equals_the_engine_run_of_its_record(prompts: Path, tmp_path: Path) -> None:
    """Batch size 1: each image is exactly the image of the job its PNG records, run alone."""
    generate_batch(prompts, tmp_path / "out", settings=SETTINGS, seed=7, progress=False)
    record = read_png(tmp_path / "out" / "000003.png")
    assert record.job.prompt == "a green triangle" and record.seed == 300_007
    (done,) = [e for e in Engine().run(record.single_job()) if isinstance(e, ImageDone)]
    assert np.array_equal(np.asarray(done.image), pixels(tmp_path / "out" / "000003.png"))


def test_img2img_items_and_counts(tmp_path: Path) -> None:
    source = PIL.Image.new("RGB", (128, 128), (200, 30, 30))
    source.save(tmp_path / "red.png")
    items = tmp_path / "items.jsonl"
    items.write_text(
        '{"prompt": "a blue square", "task": "img2img", "image": "red.png", "strength": 0.5}\n'
        '{"prompt": "a red circle", "count": 2, "seed": 3}\n'
    )
    out = tmp_path / "out"
    generate_batch(items, out, settings=SETTINGS, seed=1, batch_size=4, progress=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001_0.png", "000001_1.png"]
    record = read_png(out / "000000.png")
    assert record.job.task == "img2img" and record.job.input_image_sha256 == image_sha256(source)
    assert [read_png(out / f"000001_{k}.png").seed for k in range(2)] == [3, 4]
    (done,) = [e for e in Engine().run(record.single_job(), source) if isinstance(e, ImageDone)]
    assert np.array_equal(np.asarray(done.image), pixels(out / "000000.png"))


def test_an_interrupted_run_finishes_the_same_images(prompts: Path, tmp_path: Path) -> None:
    """Images and manifest lines lost (as when processes are killed) are made again, exactly."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    generate_batch(prompts, whole, settings=SETTINGS, seed=7, batch_size=2, progress=False)
    generate_batch(prompts, cut, settings=SETTINGS, seed=7, batch_size=2, progress=False)
    for name in ("000001.png", "000004.png", "manifest.jsonl"):
        (cut / name).unlink()
    (cut / ".000001.png.123.tmp").write_bytes(b"half an image")
    summary = generate_batch(prompts, cut, settings=SETTINGS, batch_size=2, progress=False)
    assert (summary.generated, summary.skipped) == (2, 3)
    assert pngs(cut).keys() == pngs(whole).keys()
    assert all(np.array_equal(a, pngs(whole)[name]) for name, a in pngs(cut).items())
    assert [e["sha256"] for e in manifest(cut)] == [e["sha256"] for e in manifest(whole)]
    assert {p.name for p in cut.glob(".*")} == {store.LOCK}


def test_conflicting_reruns_are_refused(prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate_batch(prompts, out, settings=SETTINGS, seed=7, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(prior.steps is 4 there, 5 now"):
        generate_batch(prompts, out, settings={**SETTINGS, "prior_steps": 5}, progress=False)
    with pytest.raises(ValueError, match="made with --seed 7, not 8"):
        generate_batch(prompts, out, settings=SETTINGS, seed=8, progress=False)
    prompts.write_text(PROMPTS.replace("a blue square", "a blue disc"))
    with pytest.raises(
        ValueError, match=r"prompts.txt:4: .*000001.png was made with other settings \(prompt"
    ):
        generate_batch(prompts, out, settings=SETTINGS, progress=False)
    prompts.write_text(PROMPTS + "a new prompt\n")  # items added: made, the others kept
    summary = generate_batch(prompts, out, settings=SETTINGS, progress=False)
    assert (summary.generated, summary.skipped) == (1, 5)


# -- errors before any model loads ------------------------------------------------------------------


def refuse_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were loaded")

    monkeypatch.setattr("stable_cascade.engine.engine.load_models", refuse)
    monkeypatch.setattr("stable_cascade.batch.sampling.UnitRunner.run", refuse)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_loading(monkeypatch)


@pytest.mark.usefixtures("no_loading")
def test_a_bad_line_fails_before_generation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "a"}\n{"prompt": "b", "prior_steps": 0}\n')
    assert main(["batch", str(items), "-o", str(tmp_path / "out"), *FLAGS]) == 2
    assert "items.jsonl:2: Stage C steps must be between 1 and 1000, got 0" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.usefixtures("no_loading")
def test_an_unwritable_output_fails_before_loading(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "file" / "out"), *FLAGS]) == 2
    assert "cannot write into the output folder" in capsys.readouterr().err


@pytest.mark.usefixtures("no_loading")
def test_a_second_run_into_the_same_folder_is_refused(prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with store.run_lock(out, hold=True) as busy:  # a run going on in another process
        assert busy is None
        with pytest.raises(ValueError, match="another batch run is writing into"):
            generate_batch(prompts, out, settings=SETTINGS, seed=7, progress=False)
    with store.run_lock(out, hold=True) as busy:  # released when that run ends
        assert busy is None


# -- two processes ----------------------------------------------------------------------------------


def command(prompts: Path, out: Path, processes: int, *extra: str) -> list[str]:
    launch = [sys.executable, "-m", "stable_cascade"]
    if processes > 1:  # --standalone: the rendezvous picks a free port itself
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
        ]
        launch += ["-m", "stable_cascade"]
    return [*launch, "batch", str(prompts), "-o", str(out), *FLAGS, "--batch-size", "2", *extra]


def environment() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**keep, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(prompts: Path, out: Path, processes: int, *extra: str) -> str:
    done = subprocess.run(
        command(prompts, out, processes, *extra),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Eleven items, one of three images, and their images made by one process."""
    folder = tmp_path_factory.mktemp("many")
    prompts = folder / "items.jsonl"
    lines = [{"prompt": f"a {c} {s}"} for c in ("red", "blue", "green") for s in ("circle", "square", "star")]
    lines += [{"prompt": "a red circle", "count": 3}, {"prompt": "a blue star", "prior_steps": 3}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    launch(prompts, folder / "one", 1, *SLOW)
    return prompts, folder / "one"


@pytest.mark.slow
def test_two_processes_make_the_images_of_one(many: tuple[Path, Path], tmp_path: Path) -> None:
    prompts, one = many
    out = tmp_path / "two"
    assert "13 images" in launch(prompts, out, 2, *SLOW)
    made = pngs(out)
    assert made.keys() == pngs(one).keys() and len(made) == 13
    assert all(np.array_equal(made[name], image) for name, image in pngs(one).items())
    assert [e["sha256"] for e in manifest(out)] == [e["sha256"] for e in manifest(one)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and sum(summary["per_process"]) == 13 and min(summary["per_process"]) > 0


@pytest.mark.slow
def test_killed_processes_and_a_rerun_finish_the_set(many: tuple[Path, Path], tmp_path: Path) -> None:
    prompts, one = many
    out = tmp_path / "killed"
    run = subprocess.Popen(
        command(prompts, out, 2, *SLOW), env=environment(), start_new_session=True, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # every process of the run
    run.wait()
    first = {p.name for p in out.glob("*.png")}
    assert 0 < len(first) < 13, first
    assert "decoder_steps is 20 there, 2 now" in _failing(prompts, out)  # other settings: refused
    launch(prompts, out, 2, *SLOW)
    lines = manifest(out)
    assert sorted(e["file"] for e in lines) == sorted(pngs(one)) == sorted(p.name for p in out.glob("*.png"))
    assert len({e["file"] for e in lines}) == 13 and {p.name for p in out.glob(".*")} == {store.LOCK}
    assert all(np.array_equal(image, pixels(out / name)) for name, image in pngs(one).items())


def _failing(prompts: Path, out: Path) -> str:
    done = subprocess.run(
        command(prompts, out, 1), capture_output=True, text=True, env=environment(), timeout=120, check=False
    )
    assert done.returncode == 2
    return done.stderr
