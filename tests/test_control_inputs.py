"""ControlNet inputs: canny (against OpenCV), inpainting / outpainting, super-resolution."""

from __future__ import annotations

import importlib

import cv2
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from stable_cascade.conditioning import control
from stable_cascade.conditioning.control import (
    canny_edges,
    control_input,
    inpainting_control,
    outpainting_canvas,
    prepare_mask,
    super_resolution_control,
)


def _shapes_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A few solid rectangles on a grey background: images with real edges, (1, 3, H, W) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((1, 3, height, width), 0.5)
    for _ in range(4):
        top, left = (int(torch.randint(0, s // 2, (1,), generator=g)) for s in (height, width))
        image[..., top : top + height // 3, left : left + width // 3] = torch.rand(3, 1, 1, generator=g)
    return image


def test_canny_equals_opencv_on_the_same_pixels() -> None:
    image = _shapes_image(224, 224)
    ours = canny_edges(image, resize=None)
    pixels = (image[0] * 255).permute(1, 2, 0).numpy().astype(np.uint8)
    expected = torch.from_numpy(cv2.Canny(pixels, 100, 200)).float()[None, None] / 255
    assert ours.shape == (1, 1, 224, 224)
    assert ours.sum() > 100, "the test image must have edges"
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_canny_resizes_to_224_and_back_as_the_original_filter() -> None:
    images = torch.cat([_shapes_image(96, 160, seed) for seed in range(2)])
    ours = canny_edges(images)
    small = F.interpolate(images, size=(224, 224), mode="bilinear")
    edges = [cv2.Canny((x * 255).permute(1, 2, 0).numpy().astype(np.uint8), 100, 200) for x in small]
    stacked = torch.stack([torch.from_numpy(e) for e in edges])[:, None].float() / 255
    expected = F.interpolate(stacked, size=(96, 160), mode="bilinear")
    assert ours.shape == (2, 1, 96, 160)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_missing_opencv_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def no_cv2(name: str, *args: object) -> object:
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real(name, *args)

    monkeypatch.setattr(control.importlib, "import_module", no_cv2)
    with pytest.raises(ImportError, match=r"stable-cascade\[controlnet\]"):
        canny_edges(torch.rand(1, 3, 32, 32))


def test_inpainting_sets_the_masked_region_white_and_appends_the_mask() -> None:
    image = torch.rand(2, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:5, 3:7] = True
    out = inpainting_control(image, mask)
    assert out.shape == (2, 4, 8, 8)
    assert torch.all(out[:, :3, 2:5, 3:7] == 1.0)
    keep = ~mask.expand(2, 3, 8, 8)
    assert torch.equal(out[:, :3][keep], image[keep])
    assert torch.equal(out[:, 3:], mask.float().expand(2, 1, 8, 8))
    with pytest.raises(TypeError, match="bool"):
        inpainting_control(image, mask.float())


def test_mask_from_pil_white_means_generate() -> None:
    pixels = np.zeros((16, 32), dtype=np.uint8)
    pixels[:, 16:] = 255
    mask = prepare_mask(PIL.Image.fromarray(pixels), 16, 32)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 16, 32)
    assert not mask[..., :15].any() and mask[..., 17:].all()


def test_outpainting_places_the_image_and_inverts_the_mask() -> None:
    image = torch.rand(1, 3, 4, 6)
    canvas, mask = outpainting_canvas(image, 8, 10)
    assert canvas.shape == (1, 3, 8, 10) and mask.shape == (1, 1, 8, 10)
    assert torch.equal(canvas[..., 2:6, 2:8], image)
    assert not mask[..., 2:6, 2:8].any() and int(mask.sum()) == 80 - 24
    assert torch.all(canvas[mask.expand(1, 3, 8, 10)] == 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        outpainting_canvas(image, 3, 10)


def test_super_resolution_is_the_latent_upsampled_twice_nearest() -> None:
    def encode(images: torch.Tensor) -> torch.Tensor:  # a stand-in encoder: stride 32, 16 channels
        return F.avg_pool2d(images, 32).repeat(1, 6, 1, 1)[:, :16] * 3 - 1

    images = torch.rand(1, 3, 64, 96)
    out = super_resolution_control(images, encode)
    assert out.shape == (1, 16, 4, 6)
    latent = encode(images)
    assert torch.equal(out[..., ::2, ::2], latent) and torch.equal(out[..., 1::2, 1::2], latent)


def test_control_input_dispatches_and_asks_for_what_is_missing() -> None:
    image = PIL.Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    assert control_input("canny", image, 32, 48).shape == (1, 1, 32, 48)
    with pytest.raises(ValueError, match="mask_image"):
        control_input("inpainting", image, 32, 48)
    mask = torch.ones(32, 48)
    assert control_input("inpainting", image, 32, 48, mask=mask).shape == (1, 4, 32, 48)
    with pytest.raises(ValueError, match="EfficientNet encoder"):
        control_input("super_resolution", image, 32, 48)
