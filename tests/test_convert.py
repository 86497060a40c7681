"""Key maps, architecture inference and detection on the real listings and on tiny/custom models."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

import tiny
from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert import (
    Kind,
    Size,
    expect_kind,
    identify,
    infer_unet_config,
    infer_vq_config,
    split_bundle,
    to_original_state_dict,
    unet_config_from_single_file,
    unet_diffusers_to_original,
    unet_original_to_diffusers,
    vq_config_from_single_file,
    vq_diffusers_to_original,
    vq_original_to_diffusers,
)
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import UNET_VARIANTS, VQ_VARIANTS, BlockType, UNetConfig, VQConfig

ORIGINAL = tiny.listing("original_single_file_keys")
DIFFUSERS = tiny.listing("diffusers_format_keys")
CONTROLNETS = tiny.listing("original_controlnet_keys")
PAIRS = {
    "stage_c": "prior",
    "stage_c_lite": "prior_lite",
    "stage_b": "decoder",
    "stage_b_lite": "decoder_lite",
    "stage_a": "vqgan",
}
R, T, A = BlockType.RES, BlockType.TIMESTEP, BlockType.ATTENTION
QKV = ("to_q", "to_k", "to_v")
#: Stage C-like: 3 levels, strided resamplers, only ``sca``, kernel 5, repeat mappers both ways.
CUSTOM_C = UNetConfig(
    in_channels=8,
    out_channels=8,
    conditioning_dim=32,
    block_out_channels=(64, 128, 128),
    num_attention_heads=(0, 2, 2),
    down_num_layers_per_block=(1, 2, 1),
    up_num_layers_per_block=(2, 1, 3),
    down_blocks_repeat_mappers=(1, 2, 1),
    up_blocks_repeat_mappers=(3, 1, 2),
    block_types_per_layer=((R, T), (R, T, A), (R, A)),
    clip_text_in_channels=24,
    clip_text_pooled_in_channels=24,
    clip_image_in_channels=16,
    clip_seq=3,
    kernel_size=5,
    dropout=(0.0, 0.1, 0.1),
    timestep_conditioning_type=("sca",),
)
#: Stage B-like with UpDownBlock2d resamplers and a width that is not a multiple of 64 (one head).
CUSTOM_B = UNET_VARIANTS["tiny_decoder"].replace(
    block_out_channels=(16, 48),
    num_attention_heads=(0, 1),
    down_num_layers_per_block=(2, 1),
    up_num_layers_per_block=(1, 2),
    down_blocks_repeat_mappers=(1, 1),
    up_blocks_repeat_mappers=(1, 2),
    block_types_per_layer=((R, T), (R, T, A)),
    dropout=(0.0, 0.1),
    self_attn=(True, True),
    timestep_conditioning_type=("sca", "crp"),
    switch_level=(False,),
)


def meta(listing: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in listing.items()}


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state_dict.items()}


def meta_unet(config: UNetConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return StableCascadeUNet(config).state_dict()


def random_unet(config: UNetConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    return tiny.randomize_(StableCascadeUNet(config), seed).state_dict()


# -- key maps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_prior", "tiny_decoder"])
def test_unet_round_trip_on_random_tensors_leaves_the_input_alone(name: str) -> None:
    diffusers = random_unet(UNET_VARIANTS[name])
    before = dict(diffusers)
    original = unet_diffusers_to_original(diffusers)
    assert diffusers == before and all(diffusers[k] is v for k, v in before.items())
    assert any(k.endswith("attention.attn.in_proj_weight") for k in original)
    assert not any(".to_q." in k or ".to_out." in k for k in original)
    assert ("clip_mapper.weight" in original) == (name == "tiny_decoder")
    back = unet_original_to_diffusers(original)
    assert back.keys() == diffusers.keys()
    for key, tensor in diffusers.items():
        assert torch.equal(back[key], tensor), key
    again = unet_diffusers_to_original(back)
    assert all(torch.equal(again[k], v) for k, v in original.items()) and again.keys() == original.keys()


def test_split_projections_are_copies_in_q_k_v_order() -> None:
    packed = torch.arange(18.0).view(6, 3)
    original = {"down_blocks.0.2.attention.attn.in_proj_weight": packed}
    converted = unet_original_to_diffusers(original)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        part = converted[f"down_blocks.0.2.attention.{name}.weight"]
        assert torch.equal(part, packed[2 * i : 2 * i + 2])
        assert part.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()


def test_stage_a_round_trip() -> None:
    diffusers = tiny.randomize_(PaellaVQModel(VQ_VARIANTS["tiny_vqgan"])).state_dict()
    original = vq_diffusers_to_original(diffusers)
    assert "vquantizer.codebook.weight" in original and "vquantizer.embedding.weight" not in original
    assert original.keys() - {"vquantizer.codebook.weight"} == diffusers.keys() - {
        "vquantizer.embedding.weight"
    }
    back = vq_original_to_diffusers(original)
    assert back.keys() == diffusers.keys() and all(back[k] is v for k, v in diffusers.items())


@pytest.mark.parametrize(("original", "diffusers"), PAIRS.items())
def test_listing_conversion_gives_the_diffusers_listing_and_back(original: str, diffusers: str) -> None:
    to_diffusers, to_original = (
        (vq_original_to_diffusers, vq_diffusers_to_original)
        if original == "stage_a"
        else (unet_original_to_diffusers, unet_diffusers_to_original)
    )
    converted = to_diffusers(meta(ORIGINAL[original]))
    assert shapes(converted) == DIFFUSERS[diffusers]
    assert shapes(to_original(meta(DIFFUSERS[diffusers]))) == ORIGINAL[original]


def test_comfyui_split_projections_convert_too() -> None:
    comfy: dict[str, list[int]] = {}
    for key, shape in ORIGINAL["stage_b_lite"].items():
        head, packed, suffix = key.rpartition("attention.attn.in_proj_")
        if packed:
            comfy.update({f"{head}attention.attn.{n}.{suffix}": [shape[0] // 3, *shape[1:]] for n in QKV})
        else:
            comfy[key] = shape
    assert shapes(unet_original_to_diffusers(meta(comfy))) == DIFFUSERS["decoder_lite"]
    assert infer_unet_config(comfy) == UNET_VARIANTS["decoder_lite"]


@pytest.mark.parametrize("name", ["stage_c", "stage_b_lite"])
def test_matches_diffusers_single_file_converter(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    small = {k: torch.randn(3 * (k.count(".") % 3 + 1), generator=generator) for k in ORIGINAL[name]}
    ours = unet_original_to_diffusers(small)
    reference = convert_stable_cascade_unet_single_file_to_diffusers(dict(small))
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_key_map_errors() -> None:
    with pytest.raises(CheckpointError, match="divisible by 3"):
        unet_original_to_diffusers({"a.0.attention.attn.in_proj_weight": torch.zeros(4, 2)})
    with pytest.raises(CheckpointError, match=r"to_v\.weight missing"):
        unet_diffusers_to_original(
            {"a.0.attention.to_q.weight": torch.zeros(2, 2), "a.0.attention.to_k.weight": torch.zeros(2, 2)}
        )
    with pytest.raises(CheckpointError, match="to_q tensor is missing"):
        unet_diffusers_to_original({"a.0.attention.to_k.weight": torch.zeros(2, 2)})


def test_to_original_state_dict_checks_the_kind() -> None:
    decoder = meta_unet(UNET_VARIANTS["tiny_decoder"])
    assert "clip_mapper.weight" in to_original_state_dict(decoder, Kind.STAGE_B)
    with pytest.raises(ValueError, match="not a Stage C"):
        to_original_state_dict(decoder, Kind.STAGE_C)
    with pytest.raises(ValueError, match="EfficientNet"):
        to_original_state_dict(decoder, Kind.EFFNET)


# -- inference ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("original", "diffusers"), list(PAIRS.items())[:4])
def test_infers_the_released_configs(original: str, diffusers: str) -> None:
    assert infer_unet_config(ORIGINAL[original]) == UNET_VARIANTS[diffusers]
    assert infer_unet_config(meta(ORIGINAL[original])) == UNET_VARIANTS[diffusers]
    assert infer_unet_config(DIFFUSERS[diffusers]) == UNET_VARIANTS[diffusers]


@pytest.mark.parametrize(
    "config", [UNET_VARIANTS["tiny_prior"], UNET_VARIANTS["tiny_decoder"], CUSTOM_C, CUSTOM_B], ids=str
)
def test_infers_tiny_and_custom_configs_in_both_layouts(config: UNetConfig) -> None:
    state_dict = meta_unet(config)
    assert infer_unet_config(state_dict) == config
    assert infer_unet_config(unet_diffusers_to_original(state_dict)) == config


def test_structure_of_a_released_variant_gets_its_heads() -> None:
    """decoder_lite's level 1 has no attention yet 9 heads: the released config wins over the rule."""
    listing = meta_unet(UNET_VARIANTS["decoder_lite"])
    assert infer_unet_config(listing).num_attention_heads == (0, 9, 18, 18)
    custom = meta_unet(UNET_VARIANTS["decoder_lite"].replace(down_num_layers_per_block=(2, 4, 14, 3)))
    inferred = infer_unet_config(custom)
    assert inferred.num_attention_heads == (0, 0, 18, 18) and inferred.dropout == (0.0, 0.0, 0.1, 0.1)


@pytest.mark.parametrize(
    ("drop", "match"),
    [("embedding.1.weight", "embedding"), ("clip_txt_pooled_mapper.weight", "pooled text mapper")],
)
def test_inference_names_missing_tensors(drop: str, match: str) -> None:
    listing = {k: v for k, v in ORIGINAL["stage_c_lite"].items() if k != drop}
    with pytest.raises(CheckpointError, match=match):
        infer_unet_config(listing)


def test_inference_rejects_unrelated_and_gapped_tensors() -> None:
    with pytest.raises(CheckpointError, match="no down_blocks"):
        infer_unet_config({"foo.weight": [2, 2]})
    gapped = {k: v for k, v in ORIGINAL["stage_c_lite"].items() if not k.startswith("down_blocks.0.1.")}
    with pytest.raises(CheckpointError, match="gaps"):
        infer_unet_config(gapped)


def test_infer_vq_config() -> None:
    assert infer_vq_config(ORIGINAL["stage_a"]) == VQConfig(scale_factor=0.43)
    assert infer_vq_config(DIFFUSERS["vqgan"], scale_factor=0.3764) == VQ_VARIANTS["vqgan"]
    tiny = VQ_VARIANTS["tiny_vqgan"].replace(levels=3, bottleneck_blocks=3)
    with torch.device("meta"):
        state_dict = PaellaVQModel(tiny).state_dict()
    assert infer_vq_config(vq_diffusers_to_original(state_dict)) == tiny.replace(scale_factor=0.43)
    assert vq_config_from_single_file(state_dict, "x") == tiny.replace(scale_factor=0.43)
    with pytest.raises(CheckpointError, match="codebook"):
        infer_vq_config({"in_block.1.weight": [192, 12, 1, 1]})


# -- detection ---------------------------------------------------------------------------------------

EXPECTED = {
    "stage_c": (Kind.STAGE_C, Size.FULL),
    "stage_c_lite": (Kind.STAGE_C, Size.LITE),
    "stage_b": (Kind.STAGE_B, Size.FULL),
    "stage_b_lite": (Kind.STAGE_B, Size.LITE),
    "stage_a": (Kind.STAGE_A, None),
    "effnet_encoder": (Kind.EFFNET, None),
    "previewer": (Kind.PREVIEWER, None),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_identify_every_listing(name: str) -> None:
    kind, size = EXPECTED[name]
    for state_dict in (ORIGINAL[name], meta(ORIGINAL[name])):
        found = identify(state_dict)
        assert (found.kind, found.size) == (kind, size)
    if name in PAIRS:
        found = identify(DIFFUSERS[PAIRS[name]])
        assert (found.kind, found.size) == (kind, size)


@pytest.mark.parametrize("name", CONTROLNETS)
def test_identify_controlnets(name: str) -> None:
    assert identify(CONTROLNETS[name]).kind is Kind.CONTROLNET


def test_identify_custom_and_unknown() -> None:
    found = identify(meta_unet(CUSTOM_C))
    assert (found.kind, found.size, found.config) == (Kind.STAGE_C, Size.CUSTOM, CUSTOM_C)
    assert identify(meta_unet(UNET_VARIANTS["tiny_decoder"])).size is Size.CUSTOM
    assert identify({"foo.weight": [1]}).kind is Kind.UNKNOWN
    assert identify({}).kind is Kind.UNKNOWN


def prefixed(prefix: str, listing: dict[str, list[int]]) -> dict[str, list[int]]:
    return {prefix + k: v for k, v in listing.items()}


TEXT = {"text_model.embeddings.token_embedding.weight": [49408, 1280]}
VISION = {"vision_model.embeddings.patch_embedding.weight": [1024, 3, 14, 14]}
STAGE_C_BUNDLE = {
    **prefixed("model.diffusion_model.", ORIGINAL["stage_c_lite"]),
    **prefixed("vae.encoder.", ORIGINAL["effnet_encoder"]),
    **prefixed("vae.previewer.", ORIGINAL["previewer"]),
    **prefixed("text_encoder.", TEXT),
    **prefixed("clip_l_vision.", VISION),
}
STAGE_B_BUNDLE = {
    **prefixed("model.diffusion_model.", ORIGINAL["stage_b"]),
    **prefixed("vae.", ORIGINAL["stage_a"]),
    **prefixed("text_encoder.", TEXT),
}


def test_identify_and_split_bundles() -> None:
    assert identify(STAGE_C_BUNDLE).kind is Kind.COMFY_BUNDLE
    assert identify(STAGE_B_BUNDLE).kind is Kind.COMFY_BUNDLE
    assert split_bundle(STAGE_C_BUNDLE) == {
        "unet": ORIGINAL["stage_c_lite"],
        "effnet": ORIGINAL["effnet_encoder"],
        "previewer": ORIGINAL["previewer"],
        "text_encoder": TEXT,
        "image_encoder": VISION,
    }
    assert split_bundle(STAGE_B_BUNDLE) == {
        "unet": ORIGINAL["stage_b"],
        "stage_a": ORIGINAL["stage_a"],
        "text_encoder": TEXT,
    }
    assert identify(prefixed("vae.", ORIGINAL["stage_a"])).kind is Kind.COMFY_BUNDLE


def test_split_bundle_errors_and_leftovers(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(CheckpointError, match="not a ComfyUI bundle"):
        split_bundle(ORIGINAL["previewer"])
    with caplog.at_level(logging.WARNING):
        parts = split_bundle({**STAGE_B_BUNDLE, "extra.weight": [1]})
    assert "extra.weight" in caplog.text and set(parts) == {"unet", "stage_a", "text_encoder"}


def test_expect_kind() -> None:
    assert expect_kind(ORIGINAL["stage_c"], Kind.STAGE_C, "stage_c.safetensors").size is Size.FULL
    assert expect_kind(STAGE_B_BUNDLE, Kind.STAGE_B, "bundle").size is Size.FULL
    assert expect_kind(STAGE_B_BUNDLE, Kind.STAGE_A, "bundle").kind is Kind.STAGE_A
    with pytest.raises(CheckpointError) as error:
        expect_kind(ORIGINAL["stage_b"], Kind.STAGE_C, "stage_b.safetensors")
    message = str(error.value)
    assert message.startswith(
        "stage_b.safetensors is a Stage B (decoder) checkpoint, not a Stage C (prior) one;"
    )
    assert "StableCascadeUNet" in message
    with pytest.raises(CheckpointError, match="bundle without a Stage A"):
        expect_kind(STAGE_C_BUNDLE, Kind.STAGE_A, "bundle")
    with pytest.raises(CheckpointError, match="not a recognised Stable Cascade checkpoint"):
        expect_kind({"foo.weight": [1]}, Kind.STAGE_B, "foo.safetensors")


@pytest.mark.parametrize(
    ("listing", "words"),
    [
        (
            ORIGINAL["stage_a"],
            "a Stage A (VQGAN) checkpoint, not a Stage B / Stage C UNet one; load it with Paella",
        ),
        (ORIGINAL["effnet_encoder"], "an EfficientNet encoder checkpoint"),
        (ORIGINAL["previewer"], "a previewer checkpoint"),
        (CONTROLNETS["controlnet_canny"], "a ControlNet checkpoint"),
        (prefixed("vae.", ORIGINAL["stage_a"]), "bundle without a Stage B / Stage C UNet"),
    ],
    ids=["stage_a", "effnet", "previewer", "controlnet", "vae_only_bundle"],
)
def test_unet_hook_refuses_other_components(listing: dict[str, list[int]], words: str) -> None:
    with pytest.raises(CheckpointError) as error:
        unet_config_from_single_file(meta(listing), "file.safetensors")
    assert words in str(error.value)
