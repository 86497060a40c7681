"""Pipelines from single files: tiny random models written in the original layout (and as ComfyUI
bundles), loaded with ``from_single_file``, against the same models assembled directly; CLIP towers
rebuilt from bare state dicts; export to the diffusers layout; errors. Nothing is downloaded."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

import tiny
from stable_cascade import (
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
)
from stable_cascade.checkpoint import CheckpointError
from stable_cascade.conditioning.clip_weights import (
    clip_text_config,
    clip_text_model,
    clip_vision_config,
    clip_vision_model,
)
from stable_cascade.convert import ORIGINAL_STAGE_A_SCALE, Kind, to_original_state_dict
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.loading.single_file import effnet_config, previewer_config, resolve_checkpoint
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import EffNetConfig, PreviewerConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_EFFNET = EffNetConfig(
    stage_channels=(8, 16, 16, 24, 24, 32), stage_depths=(1, 2, 1, 2, 2, 2), head_channels=64
)
RUN = {"num_inference_steps": 2, "height": 128, "width": 128}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@dataclasses.dataclass
class Models:
    prior: StableCascadeUNet
    decoder: StableCascadeUNet
    vqgan: PaellaVQModel
    effnet: EfficientNetEncoder
    previewer: Previewer
    text_encoder: CLIPTextModelWithProjection
    image_encoder: CLIPVisionModelWithProjection


@dataclasses.dataclass
class Files:
    root: Path
    stage_c: Path
    stage_b: Path
    stage_a: Path
    effnet: Path
    previewer: Path
    components: Path  # tokenizer, text and image encoders, feature extractor (no model_index.json)
    bundle_c: Path
    bundle_b: Path
    configs_only: Path  # tokenizer + the encoders' config.json, no weights: what bundles need


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)
    return path


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def models() -> Models:
    vq_config = dataclasses.replace(tiny.TINY_VQGAN, scale_factor=ORIGINAL_STAGE_A_SCALE)
    return Models(
        prior=tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), 0, scale=0.1),  # type: ignore[arg-type]
        decoder=tiny.randomize_(StableCascadeUNet(tiny.TINY_DECODER), 1, scale=0.1),  # type: ignore[arg-type]
        vqgan=tiny.randomize_(PaellaVQModel(vq_config), 2, scale=0.1),  # type: ignore[arg-type]
        effnet=tiny.randomize_(EfficientNetEncoder(TINY_EFFNET), 3, scale=0.1),  # type: ignore[arg-type]
        previewer=tiny.randomize_(Previewer(PreviewerConfig(c_hidden=32)), 4, scale=0.1),  # type: ignore[arg-type]
        text_encoder=tiny.text_encoder(0),
        image_encoder=tiny.image_encoder(0),
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Files:
    root = tmp_path_factory.mktemp("single_files")
    stage_c = to_original_state_dict(models.prior.state_dict(), Kind.STAGE_C)
    stage_b = to_original_state_dict(models.decoder.state_dict(), Kind.STAGE_B)
    stage_a = to_original_state_dict(models.vqgan.state_dict(), Kind.STAGE_A)
    text, vision = models.text_encoder.state_dict(), models.image_encoder.state_dict()
    components = root / "components"
    tiny.tokenizer(components / "tokenizer").save_pretrained(components / "tokenizer")
    models.text_encoder.save_pretrained(components / "text_encoder")
    models.image_encoder.save_pretrained(components / "image_encoder")
    tiny.feature_extractor().save_pretrained(components / "feature_extractor")
    configs_only = root / "configs_only"
    shutil.copytree(components / "tokenizer", configs_only / "tokenizer")
    for name in ("text_encoder", "image_encoder"):
        (configs_only / name).mkdir()
        shutil.copy(components / name / "config.json", configs_only / name)
    bundle_c = {
        **prefixed("model.diffusion_model.", stage_c),
        **prefixed("vae.encoder.", models.effnet.state_dict()),
        **prefixed("vae.previewer.", models.previewer.state_dict()),
        **prefixed("text_encoder.", text),
        **prefixed("clip_l_vision.", vision),
    }
    bundle_b = {
        **prefixed("model.diffusion_model.", stage_b),
        **prefixed("vae.", stage_a),
        **prefixed("text_encoder.", text),
    }
    return Files(
        root=root,
        stage_c=write(root / "stage_c.safetensors", stage_c),
        stage_b=write(root / "stage_b.safetensors", stage_b),
        stage_a=write(root / "stage_a.safetensors", stage_a),
        effnet=write(root / "effnet_encoder.safetensors", models.effnet.state_dict()),
        previewer=write(root / "previewer.safetensors", models.previewer.state_dict()),
        components=components,
        bundle_c=write(root / "comfy_stage_c.safetensors", bundle_c),
        bundle_b=write(root / "comfy_stage_b.safetensors", bundle_b),
        configs_only=configs_only,
    )


def direct_prior(models: Models, folder: Path) -> StableCascadePriorPipeline:
    return StableCascadePriorPipeline(
        tokenizer=tiny.tokenizer(folder),
        text_encoder=models.text_encoder,
        prior=models.prior,
        scheduler=DDPMWuerstchenScheduler(),
        feature_extractor=tiny.feature_extractor(),
        image_encoder=models.image_encoder,
        effnet=models.effnet,
        previewer=models.previewer,
    )


def direct_decoder(models: Models, folder: Path) -> StableCascadeDecoderPipeline:
    return StableCascadeDecoderPipeline(
        decoder=models.decoder,
        tokenizer=tiny.tokenizer(folder),
        text_encoder=models.text_encoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=models.vqgan,
        effnet=models.effnet,
    )


def direct_combined(models: Models, folder: Path) -> StableCascadeCombinedPipeline:
    prior, decoder = direct_prior(models, folder), direct_decoder(models, folder)
    parts = {k: v for k, v in decoder.components.items() if k != "effnet"}
    return StableCascadeCombinedPipeline(**parts, **{f"prior_{k}": v for k, v in prior.components.items()})


def assert_same_weights(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    assert all(torch.equal(got_state[k], v) for k, v in expected_state.items())


def run_prior(pipe: StableCascadePriorPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", images=[picture(1)], image=picture(2), strength=0.5, **RUN, generator=seeded())
    return out.image_embeddings  # type: ignore[union-attr,return-value]


def run_decoder(pipe: StableCascadeDecoderPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    embeddings = torch.randn(1, 16, 3, 3, generator=seeded(7))
    out = pipe(embeddings, "a red cube", **RUN, output_type="pt", generator=seeded())
    return out.images  # type: ignore[union-attr,return-value]


def run_combined(pipe: StableCascadeCombinedPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", prior_num_inference_steps=2, **RUN, output_type="pt", generator=seeded())
    return out.images  # type: ignore[union-attr,return-value]


def same(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- CLIP towers from state dicts ---------------------------------------------------------------


def test_clip_towers_rebuilt_from_state_dicts_give_identical_outputs(models: Models) -> None:
    text = clip_text_model(models.text_encoder.state_dict(), num_attention_heads=2)
    vision = clip_vision_model(models.image_encoder.state_dict(), num_attention_heads=2)
    ids = torch.randint(0, 514, (2, 77), generator=seeded())
    pixels = torch.randn(2, 3, 32, 32, generator=seeded())
    with torch.no_grad():
        got, expected = (
            text(ids, output_hidden_states=True),
            models.text_encoder(ids, output_hidden_states=True),
        )
        same(got.text_embeds, expected.text_embeds)
        same(got.hidden_states[-1], expected.hidden_states[-1])
        same(vision(pixels).image_embeds, models.image_encoder(pixels).image_embeds)
    assert text.config.eos_token_id == models.text_encoder.config.eos_token_id
    assert vision.config.image_size == 32 and vision.config.patch_size == 8
    half = clip_text_model(models.text_encoder.state_dict(), num_attention_heads=2, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and not half.training


def test_released_clip_configs_are_inferred_from_shapes() -> None:
    big_g = CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, projection_dim=1280, hidden_act="gelu",
    )  # fmt: skip
    vit_l = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    with torch.device("meta"):  # shapes only
        text_state = CLIPTextModelWithProjection(big_g).state_dict()
        vision_state = CLIPVisionModelWithProjection(vit_l).state_dict()
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    text_config = clip_text_config(text_state)
    for name in (*fields, "projection_dim", "hidden_act", "max_position_embeddings", "eos_token_id"):
        assert getattr(text_config, name) == getattr(big_g, name), name
    vision_config = clip_vision_config(vision_state)
    for name in (*fields[1:], "patch_size", "image_size", "projection_dim", "hidden_act"):
        assert getattr(vision_config, name) == getattr(vit_l, name), name


def test_clip_loading_errors_and_comfyui_names(models: Models) -> None:
    state = dict(models.text_encoder.state_dict())
    with pytest.raises(CheckpointError, match="pass num_attention_heads"):
        clip_text_model(state)
    broken = {**state, "text_model.extra.weight": torch.zeros(1)}
    del broken["text_model.final_layer_norm.bias"]
    with pytest.raises(CheckpointError, match=r"(?s)1 missing:.*final_layer_norm.bias.*1 unexpected:.*extra"):
        clip_text_model(broken, num_attention_heads=2)
    with pytest.raises(CheckpointError, match="lacks vision_model"):
        clip_vision_model(state, num_attention_heads=2)
    # ComfyUI's own names: clip_g.transformer.*, a transposed clip_g.text_projection, logit_scale.
    comfy = prefixed("clip_g.transformer.", {k: v for k, v in state.items() if k != "text_projection.weight"})
    comfy["clip_g.text_projection"] = state["text_projection.weight"].t()
    comfy["clip_g.logit_scale"] = torch.tensor(4.6)
    comfy["clip_g.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert_same_weights(clip_text_model(comfy, num_attention_heads=2), models.text_encoder)


def test_effnet_and_previewer_configs_are_inferred(models: Models) -> None:
    with torch.device("meta"):  # the released sizes, shapes only
        released = EfficientNetEncoder(), Previewer()
    assert effnet_config(released[0].state_dict(), "effnet") == EffNetConfig()
    assert previewer_config(released[1].state_dict(), "previewer") == PreviewerConfig()
    assert effnet_config(models.effnet.state_dict(), "effnet") == TINY_EFFNET
    with pytest.raises(CheckpointError, match="not an EfficientNet encoder"):
        effnet_config(models.previewer.state_dict(), "previewer.safetensors")


def test_bf16_files_load_in_float32_unless_asked(files: Files, models: Models, tmp_path: Path) -> None:
    path = write(
        tmp_path / "stage_c_bf16.safetensors", {k: v.bfloat16() for k, v in load_file(files.stage_c).items()}
    )
    pipe = StableCascadePriorPipeline.from_single_file(path, components_repo=files.components)
    assert pipe.prior.dtype == torch.float32
    expected = {k: v.bfloat16().float() for k, v in models.prior.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in pipe.prior.state_dict().items())
    half = StableCascadePriorPipeline.from_single_file(
        path, components_repo=files.components, torch_dtype=torch.bfloat16
    )
    assert half.prior.dtype == half.text_encoder.dtype == torch.bfloat16


# ---- pipelines from single files ----------------------------------------------------------------


def test_prior_from_single_files_matches_the_same_models(
    files: Files, models: Models, tmp_path: Path
) -> None:
    pipe = StableCascadePriorPipeline.from_single_file(
        files.stage_c, effnet=files.effnet, previewer=files.previewer, components_repo=files.components
    )
    assert pipe.prior.config == tiny.TINY_PRIOR and pipe.prior.dtype == torch.float32
    assert pipe.effnet is not None and pipe.effnet.config == TINY_EFFNET
    assert (
        pipe.previewer is not None and pipe.image_encoder is not None and pipe.feature_extractor is not None
    )
    assert_same_weights(pipe.previewer, models.previewer)
    same(run_prior(pipe), run_prior(direct_prior(models, tmp_path)))


def test_decoder_from_single_files_matches_the_same_models(
    files: Files, models: Models, tmp_path: Path
) -> None:
    pipe = StableCascadeDecoderPipeline.from_single_file(
        files.stage_b, files.stage_a, effnet=models.effnet, components_repo=files.components
    )
    assert pipe.decoder.config == tiny.TINY_DECODER and pipe.vqgan.config == models.vqgan.config
    assert pipe.effnet is models.effnet
    same(run_decoder(pipe), run_decoder(direct_decoder(models, tmp_path)))


def test_combined_from_single_files_shares_the_text_encoder(
    files: Files, models: Models, tmp_path: Path
) -> None:
    pipe = StableCascadeCombinedPipeline.from_single_file(
        files.stage_c, files.stage_b, files.stage_a, effnet=files.effnet, components_repo=files.components
    )
    assert pipe.text_encoder is pipe.prior_text_encoder and pipe.tokenizer is pipe.prior_tokenizer
    assert pipe.decoder_pipe.effnet is pipe.prior_effnet is not None
    same(run_combined(pipe), run_combined(direct_combined(models, tmp_path)))


def test_comfyui_bundles_supply_their_parts(files: Files, models: Models, tmp_path: Path) -> None:
    # configs_only has no weights: the encoders must come from the bundles (their heads from config.json).
    prior = StableCascadePriorPipeline.from_single_file(files.bundle_c, components_repo=files.configs_only)
    for name in ("text_encoder", "image_encoder", "effnet", "previewer", "prior"):
        assert_same_weights(getattr(prior, name), getattr(models, name))
    same(run_prior(prior), run_prior(direct_prior(models, tmp_path)))
    decoder = StableCascadeDecoderPipeline.from_single_file(
        files.bundle_b, components_repo=files.configs_only
    )
    assert_same_weights(decoder.vqgan, models.vqgan)
    assert decoder.effnet is None
    same(run_decoder(decoder), run_decoder(direct_decoder(models, tmp_path)))
    combined = StableCascadeCombinedPipeline.from_single_file(
        files.bundle_c, files.bundle_b, components_repo=files.configs_only
    )
    assert combined.text_encoder is combined.prior_text_encoder
    same(run_combined(combined), run_combined(direct_combined(models, tmp_path)))


def test_given_objects_win_and_nothing_else_is_needed(files: Files, models: Models, tmp_path: Path) -> None:
    tokenizer = tiny.tokenizer(tmp_path)
    pipe = StableCascadeDecoderPipeline.from_single_file(
        files.bundle_b,
        models.vqgan,
        tokenizer=tokenizer,
        text_encoder=models.text_encoder,
        components_repo=None,
        torch_dtype="bfloat16",
    )
    assert pipe.vqgan is models.vqgan and pipe.text_encoder is models.text_encoder
    assert pipe.tokenizer is tokenizer and pipe.decoder.dtype == torch.bfloat16
    assert pipe.scheduler.config == DDPMWuerstchenScheduler().config


def test_hub_paths_resolve_through_the_cache(files: Files, models: Models, tmp_path: Path) -> None:
    snapshot = tmp_path / "cache" / "models--owner--cascade" / "snapshots" / COMMIT
    (snapshot / "parts").mkdir(parents=True)
    (tmp_path / "cache" / "models--owner--cascade" / "refs").mkdir()
    (tmp_path / "cache" / "models--owner--cascade" / "refs" / "main").write_text(COMMIT)
    shutil.copy(files.stage_a, snapshot / "parts" / "stage_a.safetensors")
    hub = {"cache_dir": tmp_path / "cache", "local_files_only": True}
    pipe = StableCascadeDecoderPipeline.from_single_file(
        files.stage_b, "owner/cascade/parts/stage_a.safetensors", components_repo=files.components, **hub
    )
    assert_same_weights(pipe.vqgan, models.vqgan)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        StableCascadeDecoderPipeline.from_single_file(
            "owner/cascade/stage_b.safetensors", files.stage_a, components_repo=files.components, **hub
        )
    with pytest.raises(FileNotFoundError, match=r"owner/repo/file\.safetensors"):
        resolve_checkpoint(tmp_path / "missing.safetensors")


# ---- export to the diffusers layout -------------------------------------------------------------


def test_saved_pipelines_load_back_with_identical_outputs(files: Files, tmp_path: Path) -> None:
    prior = StableCascadePriorPipeline.from_single_file(files.stage_c, components_repo=files.components)
    prior.save_pretrained(tmp_path / "prior")
    assert (tmp_path / "prior" / "prior" / "diffusion_pytorch_model.safetensors").is_file()
    same(
        run_prior_text(StableCascadePriorPipeline.from_pretrained(tmp_path / "prior")), run_prior_text(prior)
    )
    # A saved pipeline folder (with model_index.json) serves as components_repo too.
    again = StableCascadePriorPipeline.from_single_file(files.stage_c, components_repo=tmp_path / "prior")
    same(run_prior_text(again), run_prior_text(prior))
    decoder = StableCascadeDecoderPipeline.from_single_file(
        files.stage_b, files.stage_a, components_repo=files.components
    )
    decoder.save_pretrained(tmp_path / "decoder")
    same(
        run_decoder(StableCascadeDecoderPipeline.from_pretrained(tmp_path / "decoder")), run_decoder(decoder)
    )
    combined = StableCascadeCombinedPipeline.from_single_file(
        files.stage_c, files.stage_b, files.stage_a, components_repo=files.components
    )
    combined.save_pretrained(tmp_path / "combined")
    loaded = StableCascadeCombinedPipeline.from_pretrained(tmp_path / "combined")
    same(run_combined(loaded), run_combined(combined))


def run_prior_text(pipe: StableCascadePriorPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", images=[picture(1)], **RUN, generator=seeded())
    return out.image_embeddings  # type: ignore[union-attr,return-value]


# ---- errors -------------------------------------------------------------------------------------


def test_wrong_files_are_named(files: Files) -> None:
    with pytest.raises(CheckpointError, match=r"stage_c: .*stage_b.safetensors is a Stage B \(decoder\)"):
        StableCascadePriorPipeline.from_single_file(files.stage_b, components_repo=files.components)
    with pytest.raises(CheckpointError, match=r"stage_b: .*stage_a.safetensors is a Stage A \(VQGAN\)"):
        StableCascadeDecoderPipeline.from_single_file(files.stage_a, components_repo=files.components)
    with pytest.raises(ValueError, match=r"holds no Stage A .*pass stage_a="):
        StableCascadeDecoderPipeline.from_single_file(files.stage_b, components_repo=files.components)
    with pytest.raises(CheckpointError, match=r"effnet: .*previewer.safetensors is a previewer"):
        StableCascadePriorPipeline.from_single_file(
            files.stage_c, effnet=files.previewer, components_repo=files.components
        )
    with pytest.raises(TypeError, match="stage_a must be a path or a PaellaVQModel"):
        StableCascadeDecoderPipeline.from_single_file(
            files.stage_b,
            EfficientNetEncoder(TINY_EFFNET),  # type: ignore[arg-type]
            components_repo=files.components,
        )
    with pytest.raises(ValueError, match="no components_repo: pass tokenizer="):
        StableCascadePriorPipeline.from_single_file(files.stage_c, components_repo=None)


def test_pickle_files_are_refused_unless_allowed(files: Files, models: Models, tmp_path: Path) -> None:
    path = tmp_path / "stage_a.ckpt"
    torch.save(to_original_state_dict(models.vqgan.state_dict(), Kind.STAGE_A), path)
    with pytest.raises(CheckpointError, match="pickle"):
        StableCascadeDecoderPipeline.from_single_file(files.stage_b, path, components_repo=files.components)
    pipe = StableCascadeDecoderPipeline.from_single_file(
        files.stage_b, path, components_repo=files.components, allow_pickle=True
    )
    assert_same_weights(pipe.vqgan, models.vqgan)
