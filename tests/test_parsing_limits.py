"""Reading what users and other tools wrote stays cheap and says what is wrong in one line: infotexts
(linear time, capped), their ``Model:``, batch files' headers and deeply nested JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import PIL.Image
import pytest
from PIL.PngImagePlugin import PngInfo

from stable_cascade.batch.items import read_items
from stable_cascade.batch.store import check_settings, read_entries
from stable_cascade.engine import read_png
from stable_cascade.fields import infotext


def test_an_infotext_is_read_in_linear_time_and_capped() -> None:
    long_line = "Steps: 20, " + "x" * 79_000  # a key that never ends: quadratic for a regex scan
    start = time.perf_counter()
    values = infotext.parse("a cat\n" + long_line)
    assert values["prior_steps"] == 20 and time.perf_counter() - start < 1.0
    many = "Steps: 20, " + ", ".join(f"Key {i}: {i}" for i in range(8000))  # 80 k characters of pairs
    start = time.perf_counter()
    assert infotext.parse("a cat\n" + many)["prior_steps"] == 20
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match=r"has 250,000 characters; at most 210,000 are read"):
        infotext.parse("a" * 250_000)


def test_a_rerun_of_an_infotext_alone_takes_its_model(tmp_path: Path) -> None:
    text = "a red circle\nSteps: 5+3, Sampler: ddim, CFG scale: 3.0+1.0, Seed: 9, Size: 128x128, Model: demo"
    text += ", Shift: 3.0"
    info = PngInfo()
    info.add_text("parameters", text)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "other.png", pnginfo=info)
    record = read_png(tmp_path / "other.png")
    job = record.job
    assert (job.model, job.prior_steps, job.decoder_steps, job.prior_sampler) == ("demo", 5, 3, "ddim")
    assert record.seed == 9 and (job.prior_shift, job.decoder_shift) == (3.0, 1.0)  # one shift: Stage C's


def test_a_csv_header_naming_a_column_twice_is_an_error(tmp_path: Path) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,seed,seed\na,1,2\n")
    with pytest.raises(ValueError, match=r"p.csv:1: the CSV header names seed twice"):
        read_items(prompts)


def test_deeply_nested_json_in_a_batch_folder_is_one_line(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "batch.json").write_text(deep)
    seed, error = check_settings(tmp_path, {}, None)
    assert seed is None and error is not None and "is not a batch run's settings" in error
    (tmp_path / "manifest.jsonl").write_text(deep + "\n" + json.dumps({"file": "000000.png"}) + "\n")
    assert list(read_entries(tmp_path)) == ["000000.png"]


def test_a_size_below_the_models_smallest_is_refused_before_loading() -> None:
    from stable_cascade.engine import Job

    assert Job.create(prompt="x", model="demo", width=32, height=32).width == 32
    with pytest.raises(ValueError, match="full model makes images of at least 64 pixels a side, got 64x48"):
        Job.create(prompt="x", model="full", width=64, height=48)
