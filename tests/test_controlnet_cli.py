"""``generate --controlnet``: the demo ControlNet end to end, ``--from-png`` reproducing it bit for bit,
and every flag mistake answered with one line (exit 2) before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from test_cli_errors import DEMO, messages, pixels, run
from test_controlnet_engine import half_mask, shape_picture

from stable_cascade.engine import read_png


@pytest.fixture(scope="module")
def edges(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shape_picture(tmp_path_factory.mktemp("cli_control") / "edges.png"))


def test_from_png_reproduces_a_controlnet_image(
    edges: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, again, plain = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "plain.png"
    control = ["--controlnet", "canny", "--control-image", edges, "--control-scale", "0.8"]
    code, _, err = run(["generate", "a red circle", *DEMO, *control, "-o", first], capsys)
    assert code == 0, err
    record = read_png(first)
    (ref,) = record.job.controls
    assert (ref.controlnet, ref.control_type, ref.scale, ref.image) == ("canny", "canny", 0.8, str(edges))
    with PIL.Image.open(first) as image:
        assert "ControlNet: canny, Control type: canny, Control scale: 0.8" in image.info["parameters"]
    code, _, err = run(["generate", "--from-png", first, "-o", again, "--device", "cpu"], capsys)
    assert code == 0 and not any(line.startswith("warning") for line in messages(err)), err
    assert np.array_equal(pixels(again), pixels(first))
    assert run(["generate", "a red circle", *DEMO, "-o", plain], capsys)[0] == 0
    assert not np.array_equal(pixels(plain), pixels(first))  # the control steered the image
    code, _, err = run(
        ["generate", "--from-png", first, "--control-scale", "0", "-o", tmp_path / "z.png"], capsys
    )
    assert code == 0 and np.array_equal(pixels(tmp_path / "z.png"), pixels(plain))  # flags override it
    moved = tmp_path / "moved.png"
    edges.rename(moved)
    try:
        code, _, err = run(["generate", "--from-png", first, "-o", tmp_path / "x.png"], capsys)
        assert code == 2 and len(messages(err)) == 1
        assert f"the control image {edges} recorded in {first} does not exist" in err
        shape_picture(edges, left=10)  # another picture under the recorded name: a warning
        code, _, err = run(["generate", "--from-png", first, "-o", tmp_path / "y.png"], capsys)
        assert code == 0 and "warning: the control image differs from the one recorded" in err
    finally:
        moved.replace(edges)


def test_controlnet_mistakes_stop_before_any_work(
    edges: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = half_mask(tmp_path / "mask.png")
    canny = ["--controlnet", "canny", "--control-image", edges]
    for extra, expected in (
        ([*canny, "--mask", mask], "a mask is for inpainting ControlNets; this one takes canny control"),
        (["--control-image", edges], "go with --controlnet canny|inpainting|super_resolution|FILE"),
        (["--controlnet", "canny"], "--controlnet needs --control-image IMG"),
        (
            ["--controlnet", "inpainting", "--control-image", edges, "--mask", mask],
            "demo model has no inpainting",
        ),
        (["--controlnet", "canny", "--control-image", tmp_path / "gone.png"], "does not exist"),
        ([*canny, "--control-scale", "11"], r"control scale must be in [0, 10]"),
        ([*canny, "--control-type", "inpainting"], "takes canny control, not inpainting"),
        (
            ["--controlnet", tmp_path / "none.safetensors", "--control-image", edges],
            "neither a released name",
        ),
    ):
        argv = ["generate", "a cat", *DEMO, "-o", tmp_path / "out", *extra]
        code, out, err = run(argv, capsys)
        assert code == 2 and len(messages(err)) == 1 and messages(err)[0].startswith("error: "), err
        assert expected in err and "Traceback" not in err and "seed" not in out
        assert not (tmp_path / "out").exists()
    code, _, err = run(["reconstruct", edges, *DEMO[:-2], *canny, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "unrecognized arguments: --controlnet" in err


def test_the_control_choices_are_the_librarys() -> None:
    from stable_cascade.fields import BY_NAME
    from stable_cascade.loading.bundles import RELEASED_CONTROLNETS
    from stable_cascade.pipelines.control import CONTROL_TYPES

    assert BY_NAME["control_type"].choices == CONTROL_TYPES == RELEASED_CONTROLNETS


def test_convert_and_inspect_know_controlnet_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    from stable_cascade.loading.bundles import DEMO_DIR
    from stable_cascade.nn.controlnet import ControlNet

    demo = ControlNet.from_pretrained(DEMO_DIR / "controlnet")
    original = tmp_path / "canny.safetensors"  # the original layout: the module's own state dict
    save_file({k: v.contiguous() for k, v in demo.state_dict().items()}, original)
    code, out, err = run(["inspect", original], capsys)
    assert code == 0, err
    for fact in (
        "ControlNet",
        "original single file",
        "backbone: effnet",
        "control: canny",
        "projections: 8",
    ):
        assert fact in out, out
    blocks = ["--controlnet-blocks", *range(8)]
    code, out, err = run(["convert", original, tmp_path / "folder", *blocks], capsys)
    assert code == 0 and "ControlNet" in out, err
    converted = ControlNet.from_pretrained(tmp_path / "folder")
    assert converted.config == demo.config
    code, _, err = run(["convert", tmp_path / "folder", tmp_path / "back.safetensors"], capsys)
    assert code == 0, err
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == demo.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in demo.state_dict().items())
    code, _, err = run(["convert", original, tmp_path / "released"], capsys)  # released targets assumed
    assert code == 0 and ControlNet.from_pretrained(tmp_path / "released").config.proj_blocks[-1] == 63
    code, _, err = run(["convert", original, tmp_path / "x", "--controlnet-blocks", "0", "1"], capsys)
    assert code == 2 and "8 projections but proj_blocks lists 2 targets" in err
