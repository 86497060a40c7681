"""diffusers-style usage of our pipelines, next to diffusers' own on identical tiny random weights:
callbacks (the "turn CFG off after N steps" pattern), save/load round trips, dtype handling,
``encode_prompt``'s 4-tuple form, and the attributes and switches users touch."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import huggingface_hub
import numpy as np
import pytest
import torch

import stable_cascade
import tiny
from stable_cascade import (
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)

STEPS = 4
SIZE = {"height": 256, "width": 256}  # a 6x6 Stage C latent


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def saved_prior(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """diffusers' tiny prior pipeline and the folder it saved (which ours loads)."""
    folder = tmp_path_factory.mktemp("prior")
    reference = tiny.diffusers_prior_pipeline(folder / "build", image_encoding=False)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(folder / "saved")
    return reference, folder / "saved"


@pytest.fixture(scope="module")
def prior_pair(saved_prior: tuple[Any, Path]) -> tuple[Any, StableCascadePriorPipeline]:
    reference, folder = saved_prior
    ours = StableCascadePriorPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return reference, ours


def cfg_off_after(step: int, seen: list[tuple[int, int, bool]]) -> Callable[..., dict[str, Any]]:
    """diffusers' documented dynamic-CFG callback, with Stable Cascade's tensor names ([cond; uncond])."""

    def callback(
        pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        seen.append((step_index, pipe.num_timesteps, pipe.do_classifier_free_guidance))
        if step_index == step:
            hidden = callback_kwargs["text_encoder_hidden_states"]
            callback_kwargs["text_encoder_hidden_states"] = hidden.chunk(2)[0]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    return callback


@torch.no_grad()
def diffusers_loop(reference: Any, prompt: str, guidance: float, cfg_steps: int) -> torch.Tensor:
    """diffusers' prior loop, written out with its own UNet, scheduler and ``encode_prompt``, with
    classifier-free guidance for the first ``cfg_steps`` steps and the conditional branch after."""
    hidden, pooled, neg_hidden, neg_pooled = reference.encode_prompt("cpu", 1, 1, True, prompt=prompt)
    unet, generator = reference.prior, seeded()
    images = torch.zeros(1, 1, unet.config.clip_image_in_channels)
    scheduler = diffusers.DDPMWuerstchenScheduler()
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(1, unet.config.in_channels, 6, 6, generator=generator)
    for i, t in enumerate(scheduler.timesteps[:-1]):
        ratio = t.expand(1)
        if i < cfg_steps:
            both = unet(
                torch.cat([latents] * 2),
                torch.cat([ratio] * 2),
                clip_text_pooled=torch.cat([pooled, neg_pooled]),
                clip_text=torch.cat([hidden, neg_hidden]),
                clip_img=torch.cat([images, images]),
            ).sample
            text, uncond = both.chunk(2)
            eps = torch.lerp(uncond, text, guidance)
        else:
            eps = unet(latents, ratio, clip_text_pooled=pooled, clip_text=hidden, clip_img=images).sample
        latents = scheduler.step(eps, ratio, latents, generator=generator).prev_sample
    return latents


def test_the_transcribed_loop_is_diffusers_pipeline(prior_pair: tuple[Any, Any]) -> None:
    reference, _ = prior_pair
    expected = reference("a cat", **SIZE, num_inference_steps=STEPS, guidance_scale=4.0, generator=seeded())
    torch.testing.assert_close(diffusers_loop(reference, "a cat", 4.0, STEPS), expected.image_embeddings)


@pytest.mark.parametrize("switch", [0, 1, STEPS - 1])
def test_cfg_can_be_turned_off_from_a_callback(prior_pair: tuple[Any, Any], switch: int) -> None:
    reference, ours = prior_pair
    seen: list[tuple[int, int, bool]] = []
    got = ours(
        "a cat",
        **SIZE,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=seeded(),
        callback_on_step_end=cfg_off_after(switch, seen),
        callback_on_step_end_tensor_inputs=["latents", "text_encoder_hidden_states"],
    )
    expected = diffusers_loop(reference, "a cat", 4.0, switch + 1)
    torch.testing.assert_close(got.image_embeddings, expected, rtol=1e-4, atol=1e-4)
    assert seen == [(i, STEPS, i <= switch) for i in range(STEPS)]
    assert ours.guidance_scale == 0.0 and not ours.do_classifier_free_guidance
    if switch < STEPS - 1:  # the switch changed the result
        plain = ours("a cat", **SIZE, num_inference_steps=STEPS, guidance_scale=4.0, generator=seeded())
        assert not torch.allclose(plain.image_embeddings, got.image_embeddings)


def test_guidance_properties_follow_the_call(prior_pair: tuple[Any, Any]) -> None:
    _, ours = prior_pair
    ours("a cat", **SIZE, num_inference_steps=3, guidance_scale=1.0, generator=seeded())
    assert (ours.guidance_scale, ours.do_classifier_free_guidance, ours.num_timesteps) == (1.0, False, 3)

    def guidance_on(pipe: Any, step_index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        pipe._guidance_scale = 4.0
        return kwargs

    with pytest.raises(ValueError, match="guidance_scale > 1 to the call"):
        ours("a cat", **SIZE, num_inference_steps=3, guidance_scale=1.0, callback_on_step_end=guidance_on)


def test_decoder_and_combined_honour_the_callback(prior_pair: tuple[Any, Any], tmp_path: Path) -> None:
    decoder = StableCascadeDecoderPipeline.from_pretrained(_saved_decoder(tmp_path))
    decoder.set_progress_bar_config(disable=True)
    embeddings = torch.randn(1, 16, 6, 6, generator=seeded(3))
    kwargs = {
        "image_embeddings": embeddings,
        "prompt": "a cat",
        "num_inference_steps": STEPS,
        "output_type": "pt",
    }
    inputs = ["latents", "prompt_embeds_pooled"]

    def off(pipe: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if step_index == 1:
            pooled = callback_kwargs["prompt_embeds_pooled"]
            assert pooled.shape[0] == 2  # [cond; uncond], as diffusers
            callback_kwargs["prompt_embeds_pooled"] = pooled.chunk(2)[0]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    runs = {
        name: decoder(
            **kwargs,
            guidance_scale=scale,
            generator=seeded(),
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=inputs,
        ).images
        for name, scale, callback in (("cfg", 2.0, None), ("off", 2.0, off), ("never", 0.0, None))
    }
    assert runs["off"].shape == runs["cfg"].shape == (1, 3, 256, 256)  # diffusers: 2 images here
    assert not torch.allclose(runs["off"], runs["cfg"]) and not torch.allclose(runs["off"], runs["never"])
    assert decoder.num_timesteps == STEPS and decoder.guidance_scale == 0.0
    prior = prior_pair[1]
    combined = StableCascadeCombinedPipeline(
        **decoder.components, **{f"prior_{k}": v for k, v in prior.components.items() if v is not None}
    )
    combined.set_progress_bar_config(disable=True)
    seen: list[tuple[int, int, bool]] = []
    images = combined(
        "a cat",
        **SIZE,
        prior_num_inference_steps=STEPS,
        num_inference_steps=3,
        prior_guidance_scale=4.0,
        decoder_guidance_scale=2.0,
        generator=seeded(),
        output_type="pt",
        prior_callback_on_step_end=cfg_off_after(1, seen),
        prior_callback_on_step_end_tensor_inputs=["latents", "text_encoder_hidden_states"],
        callback_on_step_end=off,
        callback_on_step_end_tensor_inputs=inputs,
    ).images
    assert images.shape[0] == 1 and torch.isfinite(images).all()
    assert seen == [(i, STEPS, i <= 1) for i in range(STEPS)]
    assert (combined.guidance_scale, combined.num_timesteps, combined.do_classifier_free_guidance) == (
        0.0,
        3,
        False,
    )
    assert combined.prior_pipe.guidance_scale == 0.0


def _saved_decoder(tmp_path: Path) -> Path:
    tiny.diffusers_decoder_pipeline(tmp_path / "build").save_pretrained(tmp_path / "decoder")
    return tmp_path / "decoder"


def test_encode_prompt_takes_diffusers_call_and_returns_its_tuple(prior_pair: tuple[Any, Any]) -> None:
    reference, ours = prior_pair
    for guidance in (True, False):
        arguments = ("cpu", 2, 3, guidance)
        keywords = {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "dark"]}
        expected = reference.encode_prompt(*arguments, **keywords)
        got = ours.encode_prompt(*arguments, **keywords)
        assert isinstance(got, tuple) and len(got) == 4
        for mine, theirs in zip(got, expected, strict=True):
            if guidance:
                torch.testing.assert_close(mine, theirs)
            else:
                assert mine is None or mine.shape == theirs.shape  # diffusers leaves the negatives unset
        if not guidance:
            assert got[2:] == (None, None)
    keyword_form = ours.encode_prompt(
        device="cpu", batch_size=1, num_images_per_prompt=1, do_classifier_free_guidance=True, prompt="a"
    )
    assert len(keyword_form) == 4
    ours_form = ours.encode_prompt(prompt="a", guidance=True)
    assert isinstance(ours_form, stable_cascade.pipelines.base.PromptConditioning)
    torch.testing.assert_close(ours_form.cond.hidden, keyword_form[0])
    with pytest.raises(TypeError, match="exactly one"):
        ours.encode_prompt(prompt="a")
    with pytest.raises(ValueError, match="batch_size is 3"):
        ours.encode_prompt("cpu", 3, 1, True, prompt="a")


def test_prior_latent_output_is_the_tensor(prior_pair: tuple[Any, Any]) -> None:
    _, ours = prior_pair
    latent = ours("a cat", **SIZE, num_inference_steps=2, generator=seeded(), output_type="latent")
    tensors = ours("a cat", **SIZE, num_inference_steps=2, generator=seeded(), output_type="pt")
    assert torch.equal(latent.image_embeddings, tensors.image_embeddings)


def test_sharded_safetensors_round_trip_loads_in_both(prior_pair: tuple[Any, Any], tmp_path: Path) -> None:
    reference, ours = prior_pair
    ours.save_pretrained(tmp_path / "saved", safe_serialization=True, max_shard_size="20KB")
    prior_files = {p.name for p in (tmp_path / "saved" / "prior").iterdir()}
    assert "diffusion_pytorch_model.safetensors.index.json" in prior_files
    assert sum(name.endswith(".safetensors") for name in prior_files) > 1
    assert (tmp_path / "saved" / "text_encoder" / "model.safetensors.index.json").is_file()
    assert not list((tmp_path / "saved").rglob("*.bin"))
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert set(index) - {"_class_name", "_diffusers_version", "resolution_multiple"} == set(
        reference.components
    )
    call = {"prompt": "a cat", **SIZE, "num_inference_steps": 2}
    expected = ours(**call, generator=seeded()).image_embeddings
    again = StableCascadePriorPipeline.from_pretrained(tmp_path / "saved")
    theirs = diffusers.StableCascadePriorPipeline.from_pretrained(tmp_path / "saved")
    torch.testing.assert_close(again(**call, generator=seeded()).image_embeddings, expected, rtol=0, atol=0)
    close = {"rtol": 1e-4, "atol": 1e-4}  # diffusers' attention sums in another order
    torch.testing.assert_close(theirs(**call, generator=seeded()).image_embeddings, expected, **close)
    with pytest.raises(ValueError, match="safetensors only"):
        ours.save_pretrained(tmp_path / "pickled", safe_serialization=False)


def test_dtype_alias_dict_and_missing_variant_as_diffusers(saved_prior: tuple[Any, Path]) -> None:
    _, folder = saved_prior
    cases: list[Any] = [
        torch.bfloat16,
        {"prior": torch.bfloat16, "default": torch.float16},
        {"prior": torch.bfloat16},
    ]
    for dtypes in cases:
        theirs = diffusers.StableCascadePriorPipeline.from_pretrained(folder, dtype=dtypes)
        for keyword in ("torch_dtype", "dtype"):
            ours = StableCascadePriorPipeline.from_pretrained(folder, **{keyword: dtypes})
            for name in ("prior", "text_encoder"):
                assert getattr(ours, name).dtype == getattr(theirs, name).dtype, (dtypes, name)
    assert StableCascadeUNet.from_pretrained(folder, "prior", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="pass only dtype"):
        StableCascadePriorPipeline.from_pretrained(folder, torch_dtype=torch.float16, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        diffusers.StableCascadePriorPipeline.from_pretrained(folder, variant="fp16")
    with pytest.raises(ValueError, match="variant=fp16"):
        StableCascadePriorPipeline.from_pretrained(folder, variant="fp16")
    with pytest.raises(ValueError, match="variant"):
        StableCascadeUNet.from_pretrained(folder, "prior", variant="fp16")


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi``: records calls and the files of each upload."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def __init__(self, token: Any = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs: Any) -> str:
        files = sorted(
            str(p.relative_to(kwargs["folder_path"])) for p in Path(kwargs["folder_path"]).rglob("*")
        )
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        return "commit"


def test_push_to_hub_uploads_the_saved_folder(
    prior_pair: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ours = prior_pair
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls.clear()
    assert ours.push_to_hub("me/tiny-prior", private=True, token="t", commit_message="hi") == "commit"
    init, create, upload = FakeHub.calls
    assert init[1] == {"token": "t"}
    assert create[1] == {"repo_id": "me/tiny-prior", "private": True, "exist_ok": True}
    assert upload[1]["repo_id"] == "me/tiny-prior" and upload[1]["commit_message"] == "hi"
    assert {"model_index.json", "prior/config.json", "prior/diffusion_pytorch_model.safetensors"} <= set(
        upload[1]["files"]
    )
    FakeHub.calls.clear()
    ours.prior.push_to_hub("me/tiny-unet", max_shard_size="20KB")
    assert "diffusion_pytorch_model.safetensors.index.json" in FakeHub.calls[-1][1]["files"]
    FakeHub.calls.clear()
    ours.scheduler.save_pretrained(tmp_path / "scheduler", push_to_hub=True, repo_id="me/sched")
    assert FakeHub.calls[-1][1]["files"] == ["scheduler_config.json"]


def test_pipeline_attributes_and_switches(prior_pair: tuple[Any, Any], saved_prior: tuple[Any, Path]) -> None:
    reference, ours = prior_pair
    assert ours.name_or_path == str(saved_prior[1]) == str(reference.name_or_path or saved_prior[1])
    assert ours.components.keys() == reference.components.keys()
    assert ours.model_cpu_offload_seq.split("->")[-3:] == ["text_encoder", "prior", "previewer"]
    assert StableCascadeDecoderPipeline.model_cpu_offload_seq == "effnet->text_encoder->decoder->vqgan"
    for switch in (
        ours.enable_attention_slicing,
        ours.disable_attention_slicing,
        ours.enable_xformers_memory_efficient_attention,
        ours.disable_xformers_memory_efficient_attention,
        ours.maybe_free_model_hooks,
    ):
        switch()
    images = np.random.default_rng(0).random((2, 8, 8, 3))
    for mine, theirs in zip(ours.numpy_to_pil(images), reference.numpy_to_pil(images), strict=True):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))
    grey = ours.numpy_to_pil(images[..., :1])
    assert grey[0].mode == "L" and np.array_equal(
        np.asarray(grey[0]), np.asarray(reference.numpy_to_pil(images[..., :1])[0])
    )
    rebuilt = StableCascadePriorPipeline(**ours.components)
    assert rebuilt.components.keys() == ours.components.keys()
    assert "effnet" in StableCascadePriorPipeline(**ours.components, effnet=_effnet()).components


def _effnet() -> stable_cascade.EfficientNetEncoder:
    from stable_cascade.specs import EffNetConfig

    config = EffNetConfig(
        stage_channels=(8, 8, 8, 8, 8, 8), stage_depths=(1, 1, 1, 1, 1, 1), head_channels=16
    )
    return stable_cascade.EfficientNetEncoder(config)


def test_components_are_exported_at_the_top_level() -> None:
    for name in ("EfficientNetEncoder", "Previewer", "StableCascadeUNet", "PaellaVQModel"):
        assert name in stable_cascade.__all__ and hasattr(stable_cascade, name)
    assert StableCascadeCombinedPipeline.model_cpu_offload_seq.startswith("prior_effnet->")


def test_combined_splits_a_dtype_dict_between_its_stages(
    saved_prior: tuple[Any, Path], tmp_path: Path
) -> None:
    dtypes = {"prior_prior": torch.bfloat16, "decoder": torch.float16, "default": torch.float32}
    combined = StableCascadeCombinedPipeline.from_pretrained(
        _saved_decoder(tmp_path), prior_path_or_repo_id=saved_prior[1], dtype=dtypes
    )
    assert combined.name_or_path == str(tmp_path / "decoder")
    got = {
        name: getattr(combined, name).dtype
        for name in ("prior_prior", "decoder", "vqgan", "prior_text_encoder")
    }
    assert got == {
        "prior_prior": torch.bfloat16,
        "decoder": torch.float16,
        "vqgan": torch.float32,
        "prior_text_encoder": torch.float32,
    }
