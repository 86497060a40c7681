"""EfficientNet encoder, previewer and pixel preprocessing: checkpoint layout, numerics, round trips.

torchvision is not available, so the encoder's numerics are checked against functional
transcriptions of torchvision's ``efficientnet_v2_s`` blocks written here from its definition.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import tiny
from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.nn.effnet import EfficientNetEncoder, FusedMBConv, MBConv
from stable_cascade.nn.previewer import Previewer
from stable_cascade.specs import EffNetConfig, PreviewerConfig

TINY_EFFNET = EffNetConfig(
    stage_channels=(8, 16, 16, 24, 24, 32), stage_depths=(1, 2, 1, 2, 2, 2), head_channels=64
)
TINY_PREVIEWER = PreviewerConfig(c_hidden=32)
# torchvision's efficientnet_v2_s: (fused?, expand ratio, first stride) per stage.
V2_S_STAGES = ((True, 1, 1), (True, 4, 2), (True, 4, 2), (False, 4, 2), (False, 6, 1), (False, 6, 2))


def _listing(name: str) -> dict[str, list[int]]:
    listing: dict[str, list[int]] = tiny.listing("original_single_file_keys")[name]
    return listing


def _random_tensor(name: str, shape: list[int] | torch.Size, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("num_batches_tracked"):
        return torch.tensor(7, dtype=torch.long)
    values = torch.randn(tuple(shape), generator=generator)
    if len(shape) == 4:  # conv weights: unit gain for the fan-in keeps 40 blocks from exploding
        return values / math.sqrt(math.prod(shape[1:]))
    values = values * 0.2
    if name.endswith("running_var"):
        return values.abs() + 0.5
    if name.endswith(".weight") and len(shape) == 1:  # BatchNorm scale: near 1 keeps activations sane
        return values + 1.0
    return values


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter and BatchNorm buffer, then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(_random_tensor(name, tensor.shape, generator))
    return model.eval()


@pytest.fixture(scope="module")
def encoder() -> EfficientNetEncoder:
    """The released architecture with random weights, built once (~20M parameters)."""
    return _randomize(EfficientNetEncoder())  # type: ignore[return-value]


def _images(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))


# ---- checkpoint layout ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "name", "parameters"),
    [(EfficientNetEncoder, "effnet_encoder", 20_197_968), (Previewer, "previewer", 3_979_651)],
)
def test_default_configs_have_the_listing_keys_and_shapes(cls: type, name: str, parameters: int) -> None:
    listing = _listing(name)
    with torch.device("meta"):
        model = cls()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == listing
    # The listing counts every stored tensor (BatchNorm statistics included).
    assert sum(math.prod(s) for s in shapes.values()) == sum(math.prod(s) for s in listing.values())
    assert sum(p.numel() for p in model.parameters()) == parameters  # ≈20.2M and ≈3.98M


def test_structure_follows_efficientnet_v2_s(encoder: EfficientNetEncoder) -> None:
    stages = list(encoder.backbone)[1:7]
    assert [len(stage) for stage in stages] == [2, 4, 4, 6, 9, 15]
    for stage, (fused, expand, stride) in zip(stages, V2_S_STAGES, strict=True):
        for index, block in enumerate(stage):
            assert isinstance(block, FusedMBConv if fused else MBConv)
            strides = {
                m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] == 3
            }
            assert strides == {stride if index == 0 else 1}
            c_in = block.block[0][0].in_channels
            c_out = block.block[-1][0].out_channels
            assert block.block[0][0].out_channels == (c_in * expand if expand > 1 else c_out)
            assert block.residual == (strides == {1} and c_in == c_out)
            if not fused:
                assert block.block[2].fc1.out_channels == max(1, c_in // 4)
    # Only the first block of stages 2-6 changes shape: 40 blocks, 35 residual.
    assert sum(block.residual for stage in stages for block in stage) == 35
    assert all(m.eps == 1e-3 for m in encoder.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert encoder.mapper[1].eps == 1e-5 and not encoder.mapper[1].affine


# ---- numerics ------------------------------------------------------------------------------------


def _conv_bn_ref(x: torch.Tensor, seq: nn.Sequential, act: bool = True) -> torch.Tensor:
    conv, bn = seq[0], seq[1]
    k = conv.kernel_size[0]
    y = F.conv2d(x, conv.weight, None, conv.stride, (k - 1) // 2, 1, conv.groups)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-3)
    return F.silu(y) if act else y


def _mbconv_ref(x: torch.Tensor, block: MBConv, stride: int) -> torch.Tensor:
    expand, depthwise, se, project = block.block
    h = _conv_bn_ref(x, expand)
    assert depthwise[0].groups == h.shape[1] and depthwise[0].stride == (stride, stride)
    h = _conv_bn_ref(h, depthwise)
    s = F.adaptive_avg_pool2d(h, 1)
    s = torch.sigmoid(F.conv2d(F.silu(F.conv2d(s, se.fc1.weight, se.fc1.bias)), se.fc2.weight, se.fc2.bias))
    out = _conv_bn_ref(h * s, project, act=False)
    return out + x if stride == 1 and x.shape[1] == out.shape[1] else out


def _fused_ref(x: torch.Tensor, block: FusedMBConv, stride: int) -> torch.Tensor:
    if len(block.block) == 1:
        out = _conv_bn_ref(x, block.block[0])
    else:
        out = _conv_bn_ref(_conv_bn_ref(x, block.block[0]), block.block[1], act=False)
    assert block.block[0][0].stride == (stride, stride)
    return out + x if stride == 1 and x.shape[1] == out.shape[1] else out


@pytest.mark.parametrize(
    ("c_in", "c_out", "expand", "stride", "residual"),
    [(16, 16, 4, 1, True), (16, 24, 6, 1, False), (16, 16, 4, 2, False), (3, 3, 6, 1, True)],
)
def test_mbconv_matches_a_functional_transcription(
    c_in: int, c_out: int, expand: int, stride: int, residual: bool
) -> None:
    block = _randomize(MBConv(c_in, c_out, expand, stride))
    assert block.residual is residual
    assert block.block[2].fc1.out_channels == max(1, c_in // 4)
    x = _images(2, c_in, 9, 7)
    torch.testing.assert_close(block(x), _mbconv_ref(x, block, stride))


@pytest.mark.parametrize(
    ("c_in", "c_out", "expand", "stride", "residual"),
    [(8, 8, 1, 1, True), (8, 8, 4, 1, True), (8, 16, 4, 2, False), (8, 16, 1, 1, False)],
)
def test_fused_mbconv_matches_a_functional_transcription(
    c_in: int, c_out: int, expand: int, stride: int, residual: bool
) -> None:
    block = _randomize(FusedMBConv(c_in, c_out, expand, stride))
    assert block.residual is residual
    assert len(block.block) == (1 if expand == 1 else 2)
    x = _images(2, c_in, 9, 7)
    torch.testing.assert_close(block(x), _fused_ref(x, block, stride))


def test_tiny_encoder_matches_a_functional_transcription() -> None:
    model = _randomize(EfficientNetEncoder(TINY_EFFNET))
    x = _images(2, 3, 64, 96) * 2 - 1
    h = _conv_bn_ref(x, model.backbone[0])  # stem: 3×3 s2
    for stage, (fused, _, stride) in zip(list(model.backbone)[1:7], V2_S_STAGES, strict=True):
        for index, block in enumerate(stage):
            reference = _fused_ref if fused else _mbconv_ref
            h = reference(h, block, stride if index == 0 else 1)
    h = _conv_bn_ref(h, model.backbone[7])  # head 1×1
    bn = model.mapper[1]
    expected = F.batch_norm(F.conv2d(h, model.mapper[0].weight), bn.running_mean, bn.running_var, eps=1e-5)
    torch.testing.assert_close(model(x), expected)


def test_encode_applies_the_imagenet_normalisation() -> None:
    model = _randomize(EfficientNetEncoder(TINY_EFFNET))
    images = _images(1, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    original = images.clone()
    torch.testing.assert_close(model.encode(images), model((images - mean) / std))
    assert torch.equal(images, original)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 64), (70, 33)])
def test_encoder_output_stride_32(encoder: EfficientNetEncoder, height: int, width: int) -> None:
    with torch.no_grad():
        out = encoder(_images(2, 3, height, width))
    assert out.shape == (2, 16, math.ceil(height / 32), math.ceil(width / 32))


def test_encoder_eval_is_deterministic_and_uses_running_stats(encoder: EfficientNetEncoder) -> None:
    images = _images(2, 3, 64, 64)
    stats = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    with torch.no_grad():
        first, second = encoder(images), encoder(images)
        alone = encoder(images[1:])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Batch statistics would make each row depend on the others; what is left is float32 rounding,
    # amplified by 40 blocks of random weights (outputs reach a few hundred).
    torch.testing.assert_close(first[1:], alone, rtol=0, atol=1e-4 * float(first.abs().max()))
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in stats.items())


def test_previewer_shapes_numerics_and_clamping() -> None:
    model = _randomize(Previewer(TINY_PREVIEWER))
    latent = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        raw, again, alone = model(latent), model(latent), model(latent[:1])
    assert raw.shape == (2, 3, 24, 40)
    torch.testing.assert_close(raw, again, rtol=0, atol=0)
    torch.testing.assert_close(raw[:1], alone)
    h = latent
    for module in model.blocks:  # conv → GELU → BatchNorm(eps 1e-5) ×8, then a 1×1 conv
        if isinstance(module, nn.ConvTranspose2d):
            h = F.conv_transpose2d(h, module.weight, module.bias, stride=2)
        elif isinstance(module, nn.Conv2d):
            h = F.conv2d(h, module.weight, module.bias, padding=module.kernel_size[0] // 2)
        elif isinstance(module, nn.GELU):
            h = F.gelu(h)
        else:
            h = F.batch_norm(h, module.running_mean, module.running_var, module.weight, module.bias, eps=1e-5)
    torch.testing.assert_close(raw, h)
    assert raw.min() < 0 or raw.max() > 1  # the random net leaves [0, 1]: clamping is exercised
    torch.testing.assert_close(model.preview(latent), raw.clamp(0, 1))


@pytest.mark.parametrize(
    ("model", "shape"),
    [(EfficientNetEncoder(TINY_EFFNET), (1, 4, 32, 32)), (Previewer(TINY_PREVIEWER), (1, 4, 8, 8))],
)
def test_models_reject_wrong_channels(model: nn.Module, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(shape))


def test_configs_validate() -> None:
    with pytest.raises(ValueError, match="six positive entries"):
        EffNetConfig(stage_depths=(1, 2, 3))
    with pytest.raises(ValueError, match="multiple of 4"):
        PreviewerConfig(c_hidden=30)
    assert EfficientNetEncoder(TINY_EFFNET, c_latent=8).mapper[0].out_channels == 8


# ---- loading and saving --------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "name"), [(EfficientNetEncoder, "effnet_encoder"), (Previewer, "previewer")])
def test_from_single_file_loads_the_original_layout(tmp_path: Path, cls: type, name: str) -> None:
    generator = torch.Generator().manual_seed(3)
    tensors = {k: _random_tensor(k, shape, generator) for k, shape in _listing(name).items()}
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    model = cls.from_single_file(path)
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    half = cls.from_single_file(path, torch_dtype="bfloat16")
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "model",
    [EfficientNetEncoder(TINY_EFFNET, c_latent=8), Previewer(TINY_PREVIEWER)],
    ids=["effnet", "previewer"],
)
def test_from_single_file_infers_other_widths(tmp_path: Path, model: nn.Module) -> None:
    """A file of a non-released size loads with the widths and depths its tensors have."""
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = type(model).from_single_file(path)
    assert loaded.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("model", [EfficientNetEncoder(TINY_EFFNET), Previewer(TINY_PREVIEWER)])
def test_save_and_from_pretrained_round_trip(tmp_path: Path, model: nn.Module) -> None:
    _randomize(model)
    model.save_pretrained(tmp_path)  # type: ignore[operator]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == type(model).__name__
    loaded = type(model).from_pretrained(tmp_path)  # type: ignore[attr-defined]
    assert loaded.config == model.config  # type: ignore[attr-defined]
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


# ---- pixel preprocessing -------------------------------------------------------------------------


def test_effnet_input_size() -> None:
    assert effnet_input_size(1024, 1024) == (768, 768)
    assert effnet_input_size(720, 1024) == (512, 768)  # 540 rounds down to 512
    assert effnet_input_size(1536, 640) == (1152, 480)
    assert effnet_input_size(32, 48) == (32, 32)  # never below one latent pixel
    with pytest.raises(ValueError, match="positive"):
        effnet_input_size(0, 1024)


def test_prepare_images_from_pil_and_tensors() -> None:
    grey = PIL.Image.new("L", (80, 40), color=128)  # converted to RGB
    rgba = PIL.Image.new("RGBA", (50, 50), color=(255, 0, 0, 10))
    batch = _images(2, 3, 40, 40)
    out = prepare_images([grey, rgba, batch, batch[0]], 32, 32)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.full((3, 32, 32), 128 / 255))
    torch.testing.assert_close(out[1], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 32, 32))
    assert out.min() >= 0 and out.max() <= 1
    assert prepare_images(grey, 16, 24).shape == (1, 3, 16, 24)
    assert prepare_images(batch, 40, 40).shape == (2, 3, 40, 40)
    torch.testing.assert_close(prepare_images(batch, 40, 40), batch, rtol=0, atol=0)


def test_prepare_images_resizes_the_short_side_and_center_crops() -> None:
    # A wide image whose middle third is white: after cover-resize + center crop only white remains.
    image = torch.zeros(3, 20, 60)
    image[:, :, 15:45] = 1.0  # the antialiasing filter blurs ±2 columns around each edge
    out = prepare_images(image, 10, 10)  # 20×60 → 10×30, keep the middle 10 columns
    torch.testing.assert_close(out, torch.ones(1, 3, 10, 10))
    tall = prepare_images(torch.rand(3, 90, 30), 32, 16)  # cover: 90×30 → 48×16, crop rows 8..40
    assert tall.shape == (1, 3, 32, 16)


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        ("image.png", TypeError, "PIL image, a tensor or a list"),
        ([], ValueError, "empty list"),
        ([PIL.Image.new("RGB", (8, 8)), 3], TypeError, r"images\[1\]"),
        (torch.rand(4, 8, 8), ValueError, r"\(3, H, W\)"),
        (torch.rand(1, 1, 3, 8, 8), ValueError, r"\(B, 3, H, W\)"),
        (torch.full((3, 8, 8), 255, dtype=torch.uint8), TypeError, "float"),
        (torch.rand(3, 8, 8) * 2 - 1, ValueError, r"\[0, 1\]"),
    ],
)
def test_prepare_images_rejects_bad_inputs(images: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        prepare_images(images, 16, 16)  # type: ignore[arg-type]


def test_prepare_images_rejects_bad_sizes() -> None:
    with pytest.raises(TypeError, match="int"):
        prepare_images(torch.rand(3, 8, 8), 16.0, 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        prepare_images(torch.rand(3, 8, 8), 16, -1)
