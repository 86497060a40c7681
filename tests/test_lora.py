"""LoRA: adapters on tiny models, our file format and the community ones (kohya / OneTrainer and
Stability's trainer, the latter against its own ``apply_lora`` on the original attention layout),
fuse / unfuse / scales, the pipelines and the ``--lora`` option."""

from __future__ import annotations

import argparse
import copy
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import tiny
from stable_cascade import (
    DDPMWuerstchenScheduler,
    PaellaVQModel,
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)
from stable_cascade.cli.main import main
from stable_cascade.cli.options import lora_spec
from stable_cascade.convert.keys import unet_diffusers_to_original, unet_original_to_diffusers
from stable_cascade.lora import (
    DEFAULT_TEXT_TARGETS,
    LoRAAdapter,
    LoRAFormatError,
    LoRALinear,
    adapter_names,
    add_lora,
    fuse,
    load_lora_file,
    load_lora_into,
    lora_state_dict,
    remove,
    resolve,
    save_lora,
    set_scale,
    unfuse,
)
from stable_cascade.nn.layers import AttnBlock

ATTENTION_BLOCKS = 4  # the tiny prior: one per level, down and up


def prior_unet(seed: int = 0) -> StableCascadeUNet:
    return tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), seed, scale=0.1)


def forward(unet: nn.Module) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return unet(  # type: ignore[no-any-return]
        torch.randn(2, 16, 8, 8, generator=g),
        torch.tensor([0.3, 0.7]),
        clip_text_pooled=torch.randn(2, 1, tiny.TEXT_WIDTH, generator=g),
        clip_text=torch.randn(2, 5, tiny.TEXT_WIDTH, generator=g),
        clip_img=torch.randn(2, 1, tiny.IMAGE_WIDTH, generator=g),
    ).sample


def run(unet: nn.Module) -> Tensor:
    with torch.no_grad():
        return forward(unet)


def encode(text_encoder: nn.Module) -> Tensor:
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return text_encoder(ids).text_embeds  # type: ignore[no-any-return]


def randomize_adapters_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random down and up everywhere, so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, LoRAAdapter):
                layer.down.copy_(torch.randn(layer.down.shape, generator=g) * 0.3)
                layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.3)
    return module


def adapted(seed: int = 0, rank: int = 3, alpha: float = 1.5) -> tuple[StableCascadeUNet, nn.Module]:
    """A tiny prior and text encoder with random adapters named ``default``."""
    unet, text_encoder = prior_unet(), tiny.text_encoder()
    add_lora(unet, rank=rank, alpha=alpha)
    add_lora(text_encoder, rank=rank, alpha=alpha, targets=DEFAULT_TEXT_TARGETS)
    return randomize_adapters_(unet, seed), randomize_adapters_(text_encoder, seed + 1)  # type: ignore[return-value]


def weights_of(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_weights(module: nn.Module, expected: dict[str, Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


# -- adapters --------------------------------------------------------------------------------------


def test_add_lora_keeps_the_output_and_trains_only_the_adapters() -> None:
    unet = prior_unet()
    base, base_weights = run(unet), weights_of(unet)
    names = add_lora(unet, rank=2, generator=torch.Generator().manual_seed(0))
    suffixes = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "kv_mapper.1")
    assert len(names) == 5 * ATTENTION_BLOCKS and all(n.endswith(suffixes) for n in names)
    assert torch.equal(run(unet), base)  # up is zero
    assert_same_weights(unet, base_weights)  # adapters stay out of the model's state dict
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names) and all(".lora_adapters.default." in n for n in trainable)
    down = unet.get_submodule("up_blocks.1.2.attention.to_q").lora_adapters["default"].down
    assert 0 < down.abs().max() <= 1 / 32**0.5  # Kaiming uniform like nn.Linear (in_features 32)

    forward(unet).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)
    ups = [p.grad for n, p in unet.named_parameters() if n.endswith(".up")]
    assert all(g is not None for g in ups) and any(g.abs().max() > 0 for g in ups)  # type: ignore[union-attr]
    randomize_adapters_(unet)
    assert (run(unet) - base).abs().max() > 1e-3


def test_add_lora_on_the_text_encoder_attention() -> None:
    text_encoder = tiny.text_encoder()
    base = encode(text_encoder)
    names = add_lora(text_encoder, rank=4, targets=DEFAULT_TEXT_TARGETS)
    assert len(names) == 2 * 4 and "text_model.encoder.layers.1.self_attn.q_proj" in names
    assert torch.equal(encode(text_encoder), base)
    randomize_adapters_(text_encoder)
    assert (encode(text_encoder) - base).abs().max() > 1e-3


def test_add_lora_mistakes() -> None:
    unet = prior_unet()
    with pytest.raises(
        ValueError, match=r"no nn.Linear of StableCascadeUNet matches the targets \['q_proj'\]"
    ):
        add_lora(unet, targets=["q_proj"])
    with pytest.raises(TypeError, match="not the string"):
        add_lora(unet, targets="attention.to_q")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        add_lora(unet, rank=0)
    add_lora(unet, adapter="style")
    with pytest.raises(ValueError, match="adapter 'style' already exists"):
        add_lora(unet, adapter="style")
    with pytest.raises(ValueError, match="without dots"):
        add_lora(unet, adapter="my.style")


def test_fuse_equals_runtime_and_unfuse_restores_the_weights_exactly() -> None:
    unet = prior_unet()
    base, base_weights = run(unet), weights_of(unet)
    add_lora(unet, rank=2, adapter="a")
    add_lora(unet, rank=4, alpha=1.0, adapter="b", targets=["attention.to_q", "attention.to_out.0"])
    randomize_adapters_(unet)
    set_scale(unet, 0.5, ["a"])
    set_scale(unet, -1.5, ["b"])
    runtime = run(unet)
    assert adapter_names(unet) == ["a", "b"] and (runtime - base).abs().max() > 1e-3

    fuse(unet)
    torch.testing.assert_close(run(unet), runtime, atol=1e-5, rtol=0)  # no double application
    assert not torch.equal(
        unet.state_dict()["down_blocks.0.2.attention.to_q.weight"],
        base_weights["down_blocks.0.2.attention.to_q.weight"],
    )
    with pytest.raises(ValueError, match="unfuse it first"):
        set_scale(unet, 1.0)
    with pytest.raises(ValueError, match="cannot be removed alone"):
        remove(unet, ["b"])
    unfuse(unet)
    assert_same_weights(unet, base_weights)
    assert torch.equal(run(unet), runtime)

    set_scale(unet, 0.0)  # scale 0 is the base model, exactly
    assert torch.equal(run(unet), base)
    set_scale(unet, 2.0, ["b"])
    only_b = run(unet)
    set_scale(unet, 1.0, ["b"])
    fuse(unet, scale=2.0, names=["b"])  # another scale, one adapter
    torch.testing.assert_close(run(unet), only_b, atol=1e-5, rtol=0)
    unfuse(unet)
    assert_same_weights(unet, base_weights)
    remove(unet)
    assert not any(isinstance(m, (LoRALinear, LoRAAdapter)) for m in unet.modules())
    assert type(unet.get_submodule("down_blocks.0.2.attention.to_q")) is nn.Linear
    assert torch.equal(run(unet), base)


def test_unload_after_fuse_keeps_the_merged_weights() -> None:
    unet = prior_unet()
    add_lora(unet, rank=2)
    randomize_adapters_(unet)
    runtime = run(unet)
    fuse(unet)
    remove(unet)  # diffusers' fuse_lora + unload_lora_weights: a merged model without adapters
    assert not any(isinstance(m, LoRALinear) for m in unet.modules())
    torch.testing.assert_close(run(unet), runtime, atol=1e-5, rtol=0)


# -- files -----------------------------------------------------------------------------------------


def test_our_format_round_trip(tmp_path: Path) -> None:
    unet, text_encoder = adapted()
    expected = run(unet), encode(text_encoder)
    path = save_lora(
        tmp_path / "style.safetensors", unet=unet, text_encoder=text_encoder, metadata={"x": "y"}
    )
    with safe_open(str(path), framework="pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata == {
        "x": "y",
        "format": "stable-cascade-lora",
        "format_version": "1",
        "rank": "3",
        "alpha": "1.5",
    }
    assert "unet.down_blocks.0.2.attention.to_q.lora_down.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.alpha" in keys
    assert len(keys) == 3 * (5 * ATTENTION_BLOCKS + 8)

    weights = load_lora_file(path)
    assert weights.format == "stable-cascade" and weights.metadata["x"] == "y" and weights.stem == "style"
    fresh_unet, fresh_text = prior_unet(), tiny.text_encoder()
    load_lora_into(fresh_unet, resolve(weights, "unet", fresh_unet), "style")
    load_lora_into(fresh_text, resolve(weights, "text_encoder", fresh_text), "style")
    assert torch.equal(run(fresh_unet), expected[0]) and torch.equal(encode(fresh_text), expected[1])
    for key, tensor in lora_state_dict(unet).items():
        assert torch.equal(lora_state_dict(fresh_unet, "style")[key], tensor)


def kohya_name(name: str, style: str) -> str:
    """Our layer name as kohya / ComfyUI (``attention.attn.*``) or OneTrainer's legacy diffusers names
    write it, dots as underscores (OneTrainer's convert_stable_cascade_lora key sets)."""
    if style == "comfyui":
        name = name.replace(".attention.to_out.0", ".attention.attn.out_proj")
        name = name.replace(".attention.to_", ".attention.attn.to_")
    return name.replace(".", "_")


@pytest.mark.parametrize("style", ["comfyui", "onetrainer"])
def test_kohya_files_give_the_same_adapters(tmp_path: Path, style: str) -> None:
    unet, text_encoder = adapted()
    with torch.no_grad():  # values that float16, the dtype of most community files, holds exactly
        for m in [*unet.modules(), *text_encoder.modules()]:
            if isinstance(m, LoRAAdapter):
                m.down.copy_(m.down.half())
                m.up.copy_(m.up.half())
    expected = run(unet), encode(text_encoder)
    tensors = {}
    for prefix, module in (("lora_prior_unet_", unet), ("lora_prior_te_", text_encoder)):
        for key, tensor in lora_state_dict(module).items():
            suffix = next(s for s in (".lora_down.weight", ".lora_up.weight", ".alpha") if key.endswith(s))
            layer = key.removesuffix(suffix)
            tensors[f"{prefix}{kohya_name(layer, style)}{suffix}"] = tensor.to(torch.float16)
    assert "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "kohya.safetensors")

    weights = load_lora_file(tmp_path / "kohya.safetensors")
    assert weights.format == "kohya" and len(weights.unet) == 5 * ATTENTION_BLOCKS
    pipe_unet, pipe_text = prior_unet(), tiny.text_encoder()
    load_lora_into(pipe_unet, resolve(weights, "unet", pipe_unet), "k")
    load_lora_into(pipe_text, resolve(weights, "text_encoder", pipe_text), "k")
    assert torch.equal(run(pipe_unet), expected[0]) and torch.equal(encode(pipe_text), expected[1])


def test_kohya_alpha_defaults_to_the_rank(tmp_path: Path) -> None:
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    file = tmp_path / "no_alpha.safetensors"
    save_file(
        {
            "lora_prior_unet_down_blocks_0_2_kv_mapper_1.lora_down.weight": down,
            "lora_prior_unet_down_blocks_0_2_kv_mapper_1.lora_up.weight": up,
        },
        file,
    )
    layer = load_lora_file(file).unet["down_blocks_0_2_kv_mapper_1"]
    assert layer.alpha == 4.0 and layer.rank == 4


class OriginalLoRA(nn.Module):
    """Stability-AI/StableCascade ``modules/lora.py`` ``LoRA``: a parametrization adding
    ``lora_up @ lora_down · alpha / rank`` to a weight (alpha 1)."""

    def __init__(self, layer: nn.Module, name: str = "weight", rank: int = 16, alpha: float = 1) -> None:
        super().__init__()
        weight = getattr(layer, name)
        self.lora_down = nn.Parameter(torch.zeros((rank, weight.size(1))))
        self.lora_up = nn.Parameter(torch.zeros((weight.size(0), rank)))
        self.scale = alpha / rank

    def forward(self, original_weights: Tensor) -> Tensor:
        return original_weights + torch.matmul(self.lora_up, self.lora_down) * self.scale


def original_apply_lora(model: nn.Module, filters: list[str], rank: int) -> None:
    """``modules/lora.py`` ``apply_lora``: parametrize ``weight`` or ``in_proj_weight`` of every
    module whose name contains a filter, during the ``named_modules`` walk, as the original does."""

    def check_parameter(module: nn.Module, name: str) -> bool:
        return (
            hasattr(module, name)
            and not parametrize.is_parametrized(module, name)
            and isinstance(getattr(module, name), nn.Parameter)
        )

    for name, module in model.named_modules():
        if any(f in name for f in filters):
            if check_parameter(module, "weight"):
                parametrize.register_parametrization(module, "weight", OriginalLoRA(module, "weight", rank))
            elif check_parameter(module, "in_proj_weight"):
                parametrize.register_parametrization(
                    module, "in_proj_weight", OriginalLoRA(module, "in_proj_weight", rank)
                )


class OriginalAttention2D(nn.Module):
    """The original ``Attention2D``: one ``nn.MultiheadAttention`` named ``attn``."""

    def __init__(self, c: int, nhead: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)


def original_layout(unet: StableCascadeUNet) -> nn.Module:
    """``unet`` with the original attention modules, holding its weights under the original names."""
    model = copy.deepcopy(unet)
    for module in model.modules():
        if isinstance(module, AttnBlock):
            c = module.attention.to_q.in_features
            module.attention = OriginalAttention2D(c, module.attention.nhead)  # type: ignore[assignment]
    model.load_state_dict(unet_diffusers_to_original(unet.state_dict()))
    return model


def stability_file(unet: StableCascadeUNet, path: Path, filters: list[str], rank: int = 2) -> nn.Module:
    """Train nothing, but do what ``train/train_c_lora.py`` does: apply_lora, list the LoRA modules in
    ``modules()`` order, randomize them and save ``{'embeddings': ReToken, 'weights': [...]}``."""
    original = original_layout(unet)
    original_apply_lora(original, filters, rank)
    weights = nn.ModuleList([m for m in original.modules() if isinstance(m, OriginalLoRA)])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in weights.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tensors = {f"weights.{k}": v for k, v in weights.state_dict().items()}
    tensors |= {"embeddings.embeddings": torch.zeros(1, 24), "embeddings.indices": torch.tensor([3])}
    save_file(tensors, path)
    return original


def merged_weights(original: nn.Module) -> dict[str, Tensor]:
    """The original model's effective attention weights (LoRA applied) under our names."""
    merged = {}
    for name, module in original.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            merged[f"{name}.in_proj_weight"] = module.in_proj_weight.detach()
            merged[f"{name}.out_proj.weight"] = module.out_proj.weight.detach()
    return unet_original_to_diffusers(merged)


def test_stability_format_follows_the_original_apply_lora(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unet = prior_unet()
    original = stability_file(unet, tmp_path / "lora.safetensors", [".attn"])
    with caplog.at_level(logging.WARNING):
        weights = load_lora_file(tmp_path / "lora.safetensors")
    assert "trained token embedding(s) (embeddings.*) are not applied" in caplog.text
    assert weights.format == "stability" and len(weights.unet) == 2 * ATTENTION_BLOCKS
    before = weights_of(unet)
    load_lora_into(unet, resolve(weights, "unet", unet), "orig")
    assert len(adapter_names(unet)) == 1
    runtime = run(unet)
    fuse(unet)
    expected = merged_weights(original)
    assert len(expected) == 4 * ATTENTION_BLOCKS
    state = unet.state_dict()
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor, atol=1e-6, rtol=0)
    untouched = [k for k in state if k not in expected]
    assert all(torch.equal(state[k], before[k]) for k in untouched)  # kv_mapper etc.
    torch.testing.assert_close(run(unet), runtime, atol=1e-5, rtol=0)


# -- mistakes in files -----------------------------------------------------------------------------


def _our_file(path: Path, tensors: dict[str, Tensor]) -> Path:
    save_file(tensors, path, metadata={"format": "stable-cascade-lora"})
    return path


def _kohya_file(path: Path, tensors: dict[str, Tensor]) -> Path:
    save_file(tensors, path)
    return path


PAIR = {"lora_down.weight": torch.zeros(2, 32), "lora_up.weight": torch.zeros(32, 2)}
MISMATCHES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "unknown layer": (
        lambda p: _kohya_file(p, {f"lora_prior_unet_not_a_layer.{k}": v for k, v in PAIR.items()}),
        r"1 unet layer\(s\) match no linear layer of this Stage C \(prior\).*'not_a_layer'.*"
        r"expected layer names like lora_prior_unet_",
    ),
    "other width": (
        lambda p: _our_file(
            p,
            {
                "unet.down_blocks.0.2.attention.to_q.lora_down.weight": torch.zeros(2, 48),
                "unet.down_blocks.0.2.attention.to_q.lora_up.weight": torch.zeros(48, 2),
            },
        ),
        r"does not fit this Stage C \(prior\) with channels \[32, 32\].*"
        r"down_blocks.0.2.attention.to_q: LoRA 48 -> 48, model 32 -> 32",
    ),
    "dora": (
        lambda p: _kohya_file(
            p,
            {"lora_prior_unet_down_blocks_0_2_kv_mapper_1.dora_scale": torch.ones(32)}
            | {f"lora_prior_unet_down_blocks_0_2_kv_mapper_1.{k}": v for k, v in PAIR.items()},
        ),
        r"not LoRA down/up/alpha tensors.*dora_scale.*DoRA, LoHa, LoKr",
    ),
    "half a layer": (
        lambda p: _kohya_file(
            p, {"lora_prior_unet_down_blocks_0_2_kv_mapper_1.lora_down.weight": torch.zeros(2, 32)}
        ),
        "layer down_blocks_0_2_kv_mapper_1 has no lora_up.weight",
    ),
    "stable diffusion": (
        lambda p: _kohya_file(p, {f"lora_unet_mid_block_attn.{k}": v for k, v in PAIR.items()}),
        "not a Stable Cascade LoRA in a known format.*Stable Diffusion LoRA",
    ),
    "a model": (
        lambda p: _kohya_file(p, {"clf.1.weight": torch.zeros(16, 32, 1, 1)}),
        r"not a Stable Cascade LoRA in a known format: its keys are like \['clf.1.weight'\]",
    ),
}


@pytest.mark.parametrize("mistake", MISMATCHES)
def test_mismatched_files_name_the_file_the_keys_and_what_was_expected(tmp_path: Path, mistake: str) -> None:
    write, message = MISMATCHES[mistake]
    path = write(tmp_path / "bad.safetensors")
    unet = prior_unet()
    with pytest.raises(LoRAFormatError, match=message) as error:
        resolve(load_lora_file(path), "unet", unet)
    assert str(path) in str(error.value)
    assert adapter_names(unet) == []


def test_stability_files_of_other_filters_are_refused(tmp_path: Path) -> None:
    stability_file(prior_unet(), tmp_path / "lora.safetensors", [".attn", "kv_mapper"])
    with pytest.raises(
        LoRAFormatError, match=r"12 LoRA layers.*module_filters \['.attn'\].*8 for this Stage C"
    ):
        resolve(load_lora_file(tmp_path / "lora.safetensors"), "unet", prior_unet())


def test_unreadable_files() -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors does not exist"):
        load_lora_file("missing.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        load_lora_file("lora.pt")


# -- pipelines -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    unet, text_encoder = adapted(seed=5)
    return save_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", unet, text_encoder)


def prior_pipeline(folder: Path) -> StableCascadePriorPipeline:
    pipe = StableCascadePriorPipeline(
        tokenizer=tiny.tokenizer(folder / "tokenizer"),
        text_encoder=tiny.text_encoder(),
        prior=prior_unet(),
        scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe: StableCascadePriorPipeline) -> Tensor:
    out = pipe(
        "a red circle",
        height=128,
        width=128,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    return out.image_embeddings  # type: ignore[union-attr,return-value]


def test_prior_pipeline_load_scale_fuse_unfuse_unload(tmp_path: Path, lora_file: Path) -> None:
    pipe = prior_pipeline(tmp_path)
    base, prior_weights, text_weights = latents(pipe), weights_of(pipe.prior), weights_of(pipe.text_encoder)
    assert pipe.load_lora_weights(lora_file) == "style"
    assert pipe.get_list_adapters() == {"prior": ["style"], "text_encoder": ["style"]}
    with_lora = latents(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    pipe.set_lora_scale(0.0)
    assert torch.equal(latents(pipe), base)
    pipe.set_lora_scale(1.0, "style")
    pipe.fuse_lora()
    torch.testing.assert_close(latents(pipe), with_lora, atol=1e-4, rtol=1e-4)  # two steps, cfg 4
    pipe.unfuse_lora()
    assert_same_weights(pipe.prior, prior_weights)
    assert_same_weights(pipe.text_encoder, text_weights)
    assert torch.equal(latents(pipe), with_lora)

    assert pipe.load_lora_weights(lora_file, scale=-1.0) == "style_2"  # the same LoRA, cancelling
    torch.testing.assert_close(latents(pipe), base, atol=1e-4, rtol=1e-4)
    pipe.delete_adapters("style_2")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(lora_file, adapter_name="style")
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]; loaded: \['style'\]"):
        pipe.set_lora_scale(0.5, "nope")
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    assert torch.equal(latents(pipe), base)
    assert_same_weights(pipe.prior, prior_weights)


def test_a_mismatched_lora_changes_nothing(tmp_path: Path, lora_file: Path) -> None:
    pipe = prior_pipeline(tmp_path)
    pipe.register_components(
        prior=tiny.randomize_(
            StableCascadeUNet(tiny.TINY_PRIOR.replace(block_out_channels=(48, 48), conditioning_dim=48)), 0
        )
    )
    with pytest.raises(LoRAFormatError, match=f"{lora_file} does not fit this Stage C"):
        pipe.load_lora_weights(lora_file)
    assert pipe.get_active_adapters() == []


def test_combined_pipeline_adapts_the_prior_and_its_text_encoder(tmp_path: Path, lora_file: Path) -> None:
    prior = prior_pipeline(tmp_path)
    pipe = StableCascadeCombinedPipeline(
        tokenizer=prior.tokenizer,
        text_encoder=tiny.text_encoder(),
        decoder=tiny.randomize_(StableCascadeUNet(tiny.TINY_DECODER), 1, scale=0.1),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN), 2, scale=0.1),
        prior_prior=prior.prior,
        prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer,
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.load_lora_weights(lora_file, adapter_name="s", scale=0.7)
    assert pipe.get_list_adapters() == {"prior_prior": ["s"], "prior_text_encoder": ["s"]}
    assert pipe.prior_pipe.get_list_adapters() == {"prior": ["s"], "text_encoder": ["s"]}
    assert adapter_names(pipe.decoder) == [] and adapter_names(pipe.text_encoder) == []
    with pytest.raises(LoRAFormatError, match="match no linear layer of this Stage B"):
        pipe.decoder_pipe.load_lora_weights(lora_file)  # a prior LoRA does not fit Stage B
    assert isinstance(pipe.decoder_pipe, StableCascadeDecoderPipeline)
    pipe.unload_lora_weights()
    assert prior.get_active_adapters() == []


# -- command line ----------------------------------------------------------------------------------


def test_lora_spec(tmp_path: Path) -> None:
    file = tmp_path / "a.safetensors"
    file.write_bytes(b"")
    assert lora_spec(str(file)) == (file, 1.0)
    assert lora_spec(f"{file}:0.5") == (file, 0.5)
    assert lora_spec(f"{file}:-1") == (file, -1.0)
    with pytest.raises(argparse.ArgumentTypeError, match="FILE:SCALE with a number SCALE"):
        lora_spec(f"{file}:strong")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
        lora_spec(f"{file}:nan")
    with pytest.raises(
        argparse.ArgumentTypeError, match=f"LoRA file {tmp_path / 'b.safetensors'} does not exist"
    ):
        lora_spec(f"{tmp_path / 'b.safetensors'}:0.5")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["generate", "x", "--lora", "missing.safetensors"],
            "argument --lora: LoRA file missing.safetensors does not",
        ),
        (["generate", "x", "--lora", "{file}:high"], "argument --lora: expected FILE or FILE:SCALE"),
        (["reconstruct", "image.png", "--lora", "{file}"], "unrecognized arguments: --lora"),
    ],
)
def test_lora_option_mistakes(
    argv: list[str], expected: str, lora_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{file}", str(lora_file)) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1


def test_generate_with_lora(tmp_path: Path, lora_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prior = prior_pipeline(tmp_path)
    prior.save_pretrained(tmp_path / "prior")
    StableCascadeDecoderPipeline(
        decoder=tiny.randomize_(StableCascadeUNet(tiny.TINY_DECODER), 1, scale=0.1),
        tokenizer=prior.tokenizer,
        text_encoder=tiny.text_encoder(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN), 2, scale=0.1),
    ).save_pretrained(tmp_path / "decoder")
    common = ["a red cat", "--prior", str(tmp_path / "prior"), "--decoder", str(tmp_path / "decoder")]
    common += ["--width", "128", "--height", "128", "--prior-steps", "2", "--decoder-steps", "2"]
    common += ["--device", "cpu", "--dtype", "fp32", "--seed", "3"]

    def generate(name: str, *extra: str) -> np.ndarray:
        assert main(["generate", *common, *extra, "-o", str(tmp_path / name)]) == 0
        return np.asarray(PIL.Image.open(tmp_path / name).convert("RGB")).astype(np.int16)

    base = generate("base.png")
    off = generate("off.png", "--lora", f"{lora_file}:0", "--lora", f"{lora_file}:0.0")
    assert "LoRA style: " in capsys.readouterr().out
    styled = generate("styled.png", "--lora", str(lora_file))
    assert np.array_equal(off, base)
    assert np.abs(styled - base).max() > 0
