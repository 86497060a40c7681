"""Tiny, offline stand-ins for every Stable Cascade component, built inside the tests.

The tokenizer is a character-level CLIP BPE (no merges) written to a temporary folder; the CLIP
text and vision towers, UNets and VQGAN are tiny random models. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from stable_cascade.demo.tokenizer import byte_alphabet
from stable_cascade.specs import UNET_VARIANTS, VQ_VARIANTS, UNetConfig, VQConfig

TEXT_WIDTH = 24  # hidden and projection size of the tiny text encoder (the UNets' clip inputs)
IMAGE_WIDTH = 16  # projection size of the tiny image encoder (clip_image_in_channels)

TINY_PRIOR: UNetConfig = UNET_VARIANTS["tiny_prior"]
TINY_DECODER: UNetConfig = UNET_VARIANTS["tiny_decoder"]
TINY_VQGAN: VQConfig = VQ_VARIANTS["tiny_vqgan"]
#: Key and shape listings of the released checkpoints (and the released UNet configs), gzip'd JSON.
DATA = Path(__file__).resolve().parent / "data"


def listing(name: str) -> dict[str, Any]:
    """``tests/data/<name>.json.gz``: a dict from model name to its ``{key: shape}`` listing (or config)."""
    with gzip.open(DATA / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer with max length 77."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def text_encoder(seed: int = 0) -> CLIPTextModelWithProjection:
    vocab_size = 2 * 256 + 2
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=TEXT_WIDTH,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def image_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=2,
        projection_dim=IMAGE_WIDTH,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config).eval()


def feature_extractor() -> CLIPImageProcessor:
    return CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere, zero-initialised gains included, so parity tests can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def diffusers_prior_pipeline(folder: Path, seed: int = 0, image_encoding: bool = True) -> Any:
    """diffusers' StableCascadePriorPipeline with tiny random components (the numerical reference)."""
    import diffusers

    prior = randomize_(diffusers.StableCascadeUNet(**TINY_PRIOR.to_dict()), seed, scale=0.1)
    return diffusers.StableCascadePriorPipeline(
        tokenizer=tokenizer(folder / "tokenizer"),
        text_encoder=text_encoder(seed),
        prior=prior,
        scheduler=diffusers.DDPMWuerstchenScheduler(),
        feature_extractor=feature_extractor() if image_encoding else None,
        image_encoder=image_encoder(seed) if image_encoding else None,
    )


def diffusers_decoder_pipeline(folder: Path, seed: int = 0) -> Any:
    """diffusers' StableCascadeDecoderPipeline with tiny random components (the numerical reference)."""
    import diffusers
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    decoder = randomize_(diffusers.StableCascadeUNet(**TINY_DECODER.to_dict()), seed + 1, scale=0.1)
    vqgan = randomize_(PaellaVQModel(**TINY_VQGAN.to_dict()), seed + 2, scale=0.1)
    return diffusers.StableCascadeDecoderPipeline(
        decoder=decoder,
        tokenizer=tokenizer(folder / "tokenizer"),
        text_encoder=text_encoder(seed),
        scheduler=diffusers.DDPMWuerstchenScheduler(),
        vqgan=vqgan,
    )


def diffusers_and_ours(folder: Path, stage: str) -> tuple[Any, Any]:
    """diffusers' tiny ``prior`` or ``decoder`` pipeline and ours loaded from the folder it saved (under
    ``folder``), both with their progress bars off."""
    from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
    from stable_cascade.pipelines.prior import StableCascadePriorPipeline

    build = diffusers_prior_pipeline if stage == "prior" else diffusers_decoder_pipeline
    ours_class = StableCascadePriorPipeline if stage == "prior" else StableCascadeDecoderPipeline
    reference = build(folder / "build")
    reference.save_pretrained(folder / "saved")  # diffusers 0.42 cannot load a decoder back; ours must
    ours = ours_class.from_pretrained(folder / "saved")
    for pipe in (reference, ours):
        pipe.set_progress_bar_config(disable=True)
    return reference, ours


def save_pipelines(root: Path, effnet: bool = False) -> tuple[Path, Path]:
    """Our tiny prior (with a CLIP image encoder, and optionally an EfficientNet encoder) and decoder
    pipelines saved as ``root/prior`` and ``root/decoder``, the folders ``--prior``/``--decoder`` take."""
    from stable_cascade import (
        DDPMWuerstchenScheduler,
        PaellaVQModel,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
        StableCascadeUNet,
    )
    from stable_cascade.nn.effnet import EfficientNetEncoder
    from stable_cascade.specs import EffNetConfig

    shared = tokenizer(root / "tokenizer")
    encoder = None
    if effnet:
        torch.manual_seed(0)
        config = EffNetConfig(stage_channels=(8, 8, 16, 16, 16, 16), stage_depths=(1,) * 6, head_channels=32)
        encoder = EfficientNetEncoder(config).eval()
    StableCascadePriorPipeline(
        tokenizer=shared,
        text_encoder=text_encoder(),
        prior=randomize_(StableCascadeUNet(TINY_PRIOR), 0, scale=0.1),
        scheduler=DDPMWuerstchenScheduler(),
        feature_extractor=feature_extractor(),
        image_encoder=image_encoder(),
        effnet=encoder,
    ).save_pretrained(root / "prior")
    StableCascadeDecoderPipeline(
        decoder=randomize_(StableCascadeUNet(TINY_DECODER), 1, scale=0.1),
        tokenizer=shared,
        text_encoder=text_encoder(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=randomize_(PaellaVQModel(TINY_VQGAN), 2, scale=0.1),
    ).save_pretrained(root / "decoder")
    return root / "prior", root / "decoder"


def lora_file(path: Path, seed: int) -> str:
    """A LoRA file of the tiny prior and text encoder whose random adapters change the output."""
    from stable_cascade import StableCascadeUNet
    from stable_cascade.lora import add_lora, save_lora
    from stable_cascade.lora.layers import DEFAULT_TEXT_TARGETS, LoRAAdapter

    unet, encoder = StableCascadeUNet(TINY_PRIOR), text_encoder()
    add_lora(unet, rank=2, alpha=2.0)
    add_lora(encoder, rank=2, alpha=2.0, targets=DEFAULT_TEXT_TARGETS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, encoder):
            for layer in module.modules():
                if isinstance(layer, LoRAAdapter):
                    layer.down.copy_(torch.randn(layer.down.shape, generator=generator) * 0.3)
                    layer.up.copy_(torch.randn(layer.up.shape, generator=generator) * 0.3)
    return str(save_lora(path, unet, encoder))


def diffusers_combined_pipeline(folder: Path, image_encoding: bool = True) -> Any:
    """diffusers' StableCascadeCombinedPipeline of the tiny prior and decoder pipelines above."""
    import diffusers

    prior = diffusers_prior_pipeline(folder / "p", image_encoding=image_encoding)
    decoder = diffusers_decoder_pipeline(folder / "d")
    return diffusers.StableCascadeCombinedPipeline(
        tokenizer=decoder.tokenizer,
        text_encoder=decoder.text_encoder,
        decoder=decoder.decoder,
        scheduler=decoder.scheduler,
        vqgan=decoder.vqgan,
        prior_prior=prior.prior,
        prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer,
        prior_scheduler=prior.scheduler,
        prior_feature_extractor=prior.feature_extractor,
        prior_image_encoder=prior.image_encoder,
    )


def ip_adapter(seed: int, patches: bool = False, config: UNetConfig = TINY_PRIOR) -> Any:
    """An IP-Adapter of the tiny prior (and the tiny image encoder) whose random weights change the output."""
    from stable_cascade import StableCascadeUNet
    from stable_cascade.nn.ip_adapter import new_ip_adapter

    width = 24 if patches else IMAGE_WIDTH  # the tiny vision tower's hidden size, or its projection
    adapter = new_ip_adapter(StableCascadeUNet(config), width, input="patches" if patches else "embeds")
    return randomize_(adapter, seed, scale=0.3)


def image_prior_pipeline(folder: Path) -> Any:
    """Our prior pipeline of the tiny prior (random, small weights) with the tiny image encoder."""
    from stable_cascade import DDPMWuerstchenScheduler, StableCascadePriorPipeline, StableCascadeUNet

    pipe = StableCascadePriorPipeline(
        tokenizer=tokenizer(folder),
        text_encoder=text_encoder(),
        prior=randomize_(StableCascadeUNet(TINY_PRIOR), 0, scale=0.1),
        scheduler=DDPMWuerstchenScheduler(),
        feature_extractor=feature_extractor(),
        image_encoder=image_encoder(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
