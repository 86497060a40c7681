"""The synthetic shapes data set (captions, renders, held-out split, writer), its evaluator and CLI."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest

from stable_cascade.cli.main import main
from stable_cascade.shapes.dataset import (
    ANCHORS,
    COLOURS,
    POSITIONS,
    RGB,
    SHAPES,
    Scene,
    Shape,
    all_scenes,
    caption,
    held_out_prompts,
    parse_caption,
    render,
    split,
    write_dataset,
)
from stable_cascade.shapes.evaluate import Detection, Score, detect, detect_background, score, score_by_kind

Degradation = Callable[[PIL.Image.Image, int], PIL.Image.Image]


def sample(scenes: tuple[Scene, ...], n: int, seed: int = 0) -> list[Scene]:
    return [scenes[i] for i in np.random.default_rng(seed).choice(len(scenes), n, replace=False)]


def renders(scenes: list[Scene], seed: int = 0) -> list[PIL.Image.Image]:
    return [render(s, 128, np.random.default_rng((seed, i))) for i, s in enumerate(scenes)]


def noisy(image: PIL.Image.Image, sigma: float, seed: int) -> PIL.Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + np.random.default_rng(seed).normal(0, sigma, pixels.shape)
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def jpeg(image: PIL.Image.Image, quality: int) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return PIL.Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def blurred(image: PIL.Image.Image, radius: float) -> PIL.Image.Image:
    return image.filter(PIL.ImageFilter.GaussianBlur(radius))


# --- captions -----------------------------------------------------------------------------------


def test_captions_follow_the_grammar_of_the_issue() -> None:
    one = Scene((Shape("circle", "red", "left"),), "white")
    two = Scene((Shape("circle", "red", "left"), Shape("square", "blue", "right")), "black")
    assert caption(one) == "a red circle on the left, on a white background"
    assert caption(two) == "a red circle on the left and a blue square on the right, on a black background"
    three = Scene((Shape("triangle", "orange", "top"), Shape("circle", "green", "center")), "purple")
    assert (
        caption(three)
        == "an orange triangle at the top and a green circle in the center, on a purple background"
    )


def test_every_scene_survives_a_caption_round_trip() -> None:
    scenes = all_scenes()
    assert len(all_scenes(1)) == 3 * 8 * 5 * 7
    assert len(scenes) == len(set(scenes)) == len(set(map(caption, scenes)))
    for scene in scenes:
        assert parse_caption(caption(scene)) == scene


def test_parsing_forgives_case_spaces_and_a_full_stop() -> None:
    scene = parse_caption("  An Orange  square at the bottom, on a BLACK background.\n")
    assert scene == Scene((Shape("square", "orange", "bottom"),), "black")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a pink circle on the left, on a white background", "is not a shapes caption"),
        ("a red circle on the left", "is not a shapes caption"),
        ("a red hexagon on the left, on a white background", "shapes: circle, square, triangle"),
        ("a red circle on the left, on a red background", "invisible"),
        (
            "a red circle on the left and a blue square on the left, on a white background",
            "distinct positions",
        ),
        (
            "a red circle on the left and a blue square on the right and a red circle in the center, on a "
            "white background",
            "is not a shapes caption",
        ),
    ],
)
def test_text_outside_the_grammar_is_a_value_error(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_caption(text)


def test_scenes_check_their_attributes() -> None:
    with pytest.raises(ValueError, match="unknown shape attribute 'pink'"):
        Shape("circle", "pink", "left")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one or two objects; got 0"):
        Scene((), "white")


# --- held-out split -----------------------------------------------------------------------------


def test_held_out_combinations_never_appear_in_training() -> None:
    train, held_out = split()
    seen = {s.combination for s in train}
    seen_objects = {t for s in train for t in s.combination}
    assert held_out and not seen & {s.combination for s in held_out}
    held_singles = [next(iter(s.combination)) for s in held_out if len(s.objects) == 1]
    assert len(set(held_singles)) == round(0.1 * 120) and not seen_objects & set(held_singles)
    # A held-out pair is two objects seen in training, never together.
    for scene in held_out:
        if len(scene.objects) == 2:
            assert scene.combination <= seen_objects


def test_training_has_every_attribute_value_and_every_pair_of_a_held_out_object() -> None:
    train, held_out = split()
    objects = {o.triple for s in train for o in s.objects}
    for index, values in enumerate((SHAPES, COLOURS, POSITIONS)):
        assert {t[index] for t in objects} == set(values)
    assert {s.background for s in train} == set(COLOURS)
    for scene in held_out:
        for shape, colour, position in scene.combination:
            assert any(t[:2] == (shape, colour) for t in objects)
            assert any(t[0] == shape and t[2] == position for t in objects)
            assert any(t[1:] == (colour, position) for t in objects)


def test_the_split_is_deterministic_and_seeded() -> None:
    assert split(seed=0) == split.__wrapped__(0, 0.1)
    assert split(seed=1)[1] != split(seed=0)[1]
    prompts = held_out_prompts("single")
    assert len(prompts) == 12 * 7 and all(len(parse_caption(p).objects) == 1 for p in prompts)
    assert all(len(parse_caption(p).objects) == 2 for p in held_out_prompts("double"))
    with pytest.raises(ValueError, match=r"held_out_fraction must be in \[0, 0.5\]"):
        split(held_out_fraction=0.9)


# --- rendering ----------------------------------------------------------------------------------


def test_renders_are_deterministic_by_seed() -> None:
    scene = parse_caption(
        "a purple triangle at the top and a yellow square on the right, on a green background"
    )
    first, again = (render(scene, 128, np.random.default_rng(7)) for _ in range(2))
    other = render(scene, 128, np.random.default_rng(8))
    assert first.size == (128, 128) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes() != other.tobytes()
    assert render(scene).tobytes() == render(scene).tobytes()  # no rng: the nominal scene


def test_a_render_is_its_background_with_the_objects_at_their_anchors() -> None:
    scene = parse_caption("a red square on the left and a blue circle at the bottom, on a white background")
    pixels = np.asarray(render(scene, 100))
    assert tuple(pixels[0, 0]) == RGB["white"]
    assert tuple(pixels[50, 22]) == RGB["red"] and tuple(pixels[78, 50]) == RGB["blue"]


# --- evaluator ----------------------------------------------------------------------------------


def test_detect_finds_the_objects_and_the_background() -> None:
    scene = parse_caption(
        "an orange triangle on the right and a black circle in the center, on a yellow background"
    )
    image = render(scene, 256, np.random.default_rng(0))
    found = detect(image)
    assert {(d.shape, d.colour, d.position) for d in found} == scene.combination
    for d in found:
        assert np.hypot(*np.subtract(d.centre, ANCHORS[d.position])) < 0.05
    assert detect_background(image) == "yellow"


@pytest.mark.slow
def test_the_evaluator_scores_clean_renders_perfectly() -> None:
    scenes = list(all_scenes(1)) + sample(all_scenes(2), 300)
    scores = score_by_kind(renders(scenes), map(caption, scenes))
    assert set(scores) == {"single", "double", "all"}
    assert scores["single"].images == 840 and scores["double"].objects == 600
    assert scores["all"].summary() == {
        "images": 1140,
        "objects": 1440,
        **dict.fromkeys(
            ("attributes", "colour", "shape", "position", "whole_objects", "background", "count"), 1.0
        ),
    }


DEGRADATIONS: dict[str, Degradation] = {
    "noise": lambda image, seed: noisy(image, 15, seed),
    "blur": lambda image, seed: blurred(image, 1.5),
    "jpeg": lambda image, seed: jpeg(image, 30),
    "all three": lambda image, seed: jpeg(noisy(blurred(image, 1.0), 10, seed), 50),
    "smaller": lambda image, seed: image.resize((64, 64), PIL.Image.Resampling.BILINEAR),
    "larger": lambda image, seed: image.resize((384, 384), PIL.Image.Resampling.BICUBIC),
}


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_the_evaluator_is_robust_to_noise_blur_and_compression(degradation: str) -> None:
    scenes = sample(all_scenes(1), 40, seed=1) + sample(all_scenes(2), 60, seed=2)
    images = [DEGRADATIONS[degradation](image, i) for i, image in enumerate(renders(scenes))]
    scores = score_by_kind(images, map(caption, scenes))
    assert scores["single"].attributes >= 0.95 and scores["double"].attributes >= 0.95
    assert scores["all"].summary()["background"] >= 0.95


def test_wrong_prompts_score_low() -> None:
    def other(obj: Shape) -> Shape:  # every attribute replaced
        shape = SHAPES[(SHAPES.index(obj.shape) + 1) % 3]
        colour = COLOURS[(COLOURS.index(obj.colour) + 1) % 8]
        return Shape(shape, colour, POSITIONS[(POSITIONS.index(obj.position) + 2) % 5])

    scenes = sample(all_scenes(1), 100, seed=3)
    wrong = []
    for s in scenes:
        obj = other(s.objects[0])
        wrong.append(Scene((obj,), next(c for c in COLOURS if c not in (obj.colour, s.background))))
    images = renders(scenes)
    assert score(images, map(caption, wrong)).summary() == {
        "images": 100,
        "objects": 100,
        **dict.fromkeys(("attributes", "colour", "shape", "position", "whole_objects", "background"), 0.0),
        "count": 1.0,
    }
    shuffled = [caption(scenes[(i + 1) % len(scenes)]) for i in range(len(scenes))]
    assert score(images, shuffled).attributes < 0.5


def test_missing_and_extra_objects() -> None:
    blank = PIL.Image.new("RGB", (128, 128), RGB["green"])
    result = score(
        [blank], ["a red circle on the left and a blue square on the right, on a green background"]
    )
    assert (result.objects, result.colour, result.shape, result.position, result.count) == (2, 0, 0, 0, 0)
    assert result.background == 1
    two = render(
        parse_caption("a red circle on the left and a blue square on the right, on a green background")
    )
    result = score([two], ["a blue square on the right, on a green background"])
    assert result.attributes == 1.0 and result.count == 0


def test_score_needs_one_prompt_per_image() -> None:
    image = render(all_scenes(1)[0])
    with pytest.raises(ValueError, match="more prompts than the 1 pairs"):
        score([image], [caption(all_scenes(1)[0])] * 2)
    assert score([], []) == Score()


# --- data set writer ----------------------------------------------------------------------------


def test_write_dataset_writes_pairs_and_a_manifest(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "data", 12, size=64, seed=3)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [f"{i:06d}.{ext}" for i in range(12) for ext in ("png", "txt")] + ["metadata.jsonl"]
    )
    manifest = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in manifest] == [f"{i:06d}.png" for i in range(12)]
    train = {s.combination for s in split()[0]}
    for entry in manifest:
        assert (out / entry["file_name"]).with_suffix(".txt").read_text().strip() == entry["text"]
        assert parse_caption(entry["text"]).combination in train
        with PIL.Image.open(out / entry["file_name"]) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    # Image i depends on the seed and i alone.
    again = write_dataset(tmp_path / "again", 5, size=64, seed=3)
    for i in range(5):
        assert (again / f"{i:06d}.png").read_bytes() == (out / f"{i:06d}.png").read_bytes()
    with pytest.raises(ValueError, match="not an empty folder"):
        write_dataset(out, 1)


def test_write_dataset_held_out_split_and_fractions(tmp_path: Path) -> None:
    out = write_dataset(tmp_path / "held", 30, size=32, two_object_fraction=1.0, split="held-out")
    held = {s.combination for s in split()[1]}
    for text in (out / "metadata.jsonl").read_text().splitlines():
        scene = parse_caption(json.loads(text)["text"])
        assert len(scene.objects) == 2 and scene.combination in held
    with pytest.raises(ValueError, match="two_object_fraction"):
        write_dataset(tmp_path / "x", 1, two_object_fraction=2)
    with pytest.raises(ValueError, match="split must be"):
        write_dataset(tmp_path / "x", 1, split="test")  # type: ignore[arg-type]


def test_the_image_prompt_data_set_leaves_something_to_the_image(tmp_path: Path) -> None:
    """Variations (empty text, the same scene drawn again), recolourings (the image's shape and place, the
    text's colour: the colour word or the whole caption) and text-only examples; the manifest loads with
    its image prompts, and example i depends on the seed and i alone."""
    from stable_cascade.shapes.prompts import PromptMix, write_prompt_dataset
    from stable_cascade.training.data import find_examples

    out = write_prompt_dataset(tmp_path / "data", 60, seed=1)
    examples = find_examples(out)
    assert len(examples) == 60
    kinds: dict[str, int] = {"variation": 0, "colour word": 0, "caption": 0, "text": 0}
    train = {s.combination for s in split()[0]}
    for example in examples:
        with example.image.read() as image:
            target = detect(image)
        if example.prompt is None:
            kinds["text"] += 1
            scene = parse_caption(example.caption)
            assert scene.combination in train and attributes(target) == {o.triple for o in scene.objects}
            continue
        with example.prompt.read() as image:
            shown = detect(image)
        if example.caption == "":
            kinds["variation"] += 1
            assert attributes(shown) == attributes(target)
            continue
        kinds["caption" if " " in example.caption else "colour word"] += 1
        (obj,), (seen,) = target, shown
        assert (seen.shape, seen.position) == (obj.shape, obj.position) and seen.colour != obj.colour
        assert example.caption.split()[1 if " " in example.caption else 0] == obj.colour
    assert all(count > 0 for count in kinds.values()), kinds
    again = write_prompt_dataset(tmp_path / "again", 6, seed=1)
    assert (again / "metadata.jsonl").read_text().splitlines() == (
        (out / "metadata.jsonl").read_text().splitlines()[:6]
    )
    assert (again / "000005.png").read_bytes() == (out / "000005.png").read_bytes()
    with pytest.raises(ValueError, match="variation \\+ recolour <= 1"):
        PromptMix(variation=0.7, recolour=0.5)
    with pytest.raises(ValueError, match="not an empty folder"):
        write_prompt_dataset(out, 1)


def attributes(found: list[Detection]) -> set[tuple[str, str, str]]:
    return {(d.shape, d.colour, d.position) for d in found}


# --- command line -------------------------------------------------------------------------------


def test_cli_make_prompts_and_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shapes", "make", str(tmp_path / "d"), "--count", "8", "--size", "64", "--seed", "1"]) == 0
    assert "wrote 8 train images" in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("*.png"))) == 8

    assert main(["shapes", "prompts", "--kind", "double"]) == 0
    assert capsys.readouterr().out.splitlines() == held_out_prompts("double")

    assert main(["shapes", "score", str(tmp_path / "d")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("all: attributes 100.0%") and "8 images" in lines[-1]
    assert main(["shapes", "score", str(tmp_path / "d"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["all"]["images"] == 8 and summary["all"]["attributes"] == 1.0


def write_pair(folder: Path, stem: str, text: str | None) -> None:
    folder.mkdir(exist_ok=True)
    render(all_scenes(1)[0], 32).save(folder / f"{stem}.png")
    if text is not None:
        (folder / f"{stem}.txt").write_text(text)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda d: None, "is not a folder"),
        (lambda d: d.mkdir(), "no images"),
        (lambda d: write_pair(d, "a", None), "a.png has no caption file a.txt"),
        (lambda d: write_pair(d, "a", "a cat"), "a.txt: 'a cat' is not a shapes caption"),
    ],
)
def test_cli_score_mistakes_are_one_error_line(
    setup: Callable[[Path], None], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(tmp_path / "images")
    assert main(["shapes", "score", str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err


def test_cli_make_refuses_a_full_folder_and_subcommands_have_help(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert main(["shapes", "make", str(tmp_path / "full"), "--count", "1"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    for argv in (["shapes"], *(["shapes", sub] for sub in ("make", "prompts", "score"))):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: stable-cascade {' '.join(argv)}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "1000000000"], "count must be a whole number from 1 to 1,000,000"),
        (["--count", "0"], "count must be a whole number from 1"),
        (["--size", "100000"], "size must be a whole number of pixels from 16 to 2048"),
        (["--size", "8"], "from 16 to 2048"),
        (["--seed", "-1"], "seed must be a whole number from 0"),
        (["--two-object-fraction", "nan"], r"two_object_fraction must be a number in \[0, 1\]"),
    ],
)
def test_cli_make_has_bounds_and_writes_nothing_past_them(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["shapes", "make", str(tmp_path / "d"), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "d").exists()
