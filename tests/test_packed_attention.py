"""Issue 29: CPU inference projects each self-attention's queries, keys and values with one matmul,
over weights packed into one tensor per block, with the same numbers as three separate projections."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import tiny
from stable_cascade import StableCascadeUNet
from stable_cascade.nn import fused, layers
from stable_cascade.nn.layers import AttnBlock

CONFIGS = {"prior": tiny.TINY_PRIOR, "decoder": tiny.TINY_DECODER}


def unet(stage: str) -> StableCascadeUNet:
    return tiny.randomize_(StableCascadeUNet(CONFIGS[stage]), 0, scale=0.1)  # type: ignore[return-value]


def conditioning(stage: str, batch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cond = {"clip_text_pooled": torch.randn(batch, 1, tiny.TEXT_WIDTH, generator=g)}
    if stage == "prior":
        cond["clip_text"] = torch.randn(batch, 7, tiny.TEXT_WIDTH, generator=g)
        cond["clip_img"] = torch.randn(batch, 1, CONFIGS[stage].clip_image_in_channels or 0, generator=g)
        return cond, torch.randn(batch, 16, 8, 8, generator=g)
    cond["effnet"] = torch.randn(batch, 16, 4, 4, generator=g)
    return cond, torch.randn(batch, 4, 16, 16, generator=g)


def attention_blocks(model: torch.nn.Module) -> list[AttnBlock]:
    return [m for m in model.modules() if isinstance(m, AttnBlock)]


def steps(model: StableCascadeUNet, stage: str, batch: int) -> torch.Tensor:
    cond, x = conditioning(stage, batch)
    cache = model.prepare(x.shape[-2:], **cond)  # type: ignore[arg-type]
    for ratio in (0.9, 0.4):  # two steps on one generation's cache
        x = model(x, ratio, cache=cache).sample
    return x


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_one_matmul_equals_three_projections_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, stage: str, batch: int
) -> None:
    model, reference = unet(stage), unet(stage)
    calls: list[int] = []
    original = layers.joint_attention_projections

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(layers, "joint_attention_projections", counted)
    forwards: list[int] = []
    for block in attention_blocks(model):
        block.register_forward_hook(lambda *_: forwards.append(1))
    with torch.no_grad():
        got = steps(model, stage, batch)
        monkeypatch.setattr(layers, "joint_linear", lambda _: None)  # the separate projections
        expected = steps(reference, stage, batch)
    assert len(calls) == len(forwards) >= 2 * len(attention_blocks(model)) > 0  # every call, every step
    assert all(fused.joint_linear(block.attention.projections) for block in attention_blocks(model))
    assert torch.equal(got, expected)


def test_packing_keeps_the_values_the_parameters_and_saving(tmp_path: Path) -> None:
    model = unet("prior")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = list(model.parameters())
    with torch.inference_mode():  # as pipelines run: the parameters must not become inference tensors
        steps(model, "prior", 1)
    block = attention_blocks(model)[0].attention
    assert block.to_k.weight.data_ptr() == block.to_q.weight.data_ptr() + block.to_q.weight.nbytes
    assert list(model.parameters()) == parameters  # the same Parameter objects
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path)  # safetensors writes the packed views as separate tensors
    loaded = StableCascadeUNet.from_pretrained(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())
    # Training after inference: autograd and an optimizer step through the packed parameters.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps(model, "prior", 1).square().mean().backward()
    assert block.to_v.weight.grad is not None and block.to_v.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(block.to_v.weight, before[next(k for k in before if k.endswith("to_v.weight"))])
    assert block.to_k.weight.data_ptr() == block.to_q.weight.data_ptr() + block.to_q.weight.nbytes


def test_what_is_not_ours_to_move_stays_where_it_is() -> None:
    model = unet("prior")
    block = attention_blocks(model)[0].attention
    shared = torch.randn(4 * block.to_q.weight.numel())  # e.g. FSDP's flat parameter
    with torch.no_grad():
        block.to_q.weight.data = shared[: block.to_q.weight.numel()].view_as(block.to_q.weight)
    plain = attention_blocks(model)[1].attention
    lora = copy.deepcopy(plain)
    lora.to_q.__class__ = type("Wrapped", (torch.nn.Linear,), {})  # like a LoRA-wrapped layer
    odd = tuple(torch.nn.Linear(16, 12) for _ in range(3))  # 48-byte biases: parts would be misaligned
    for projections in (block.projections, lora.projections, odd):
        fused.pack_linears(projections)
        assert fused.joint_linear(projections) is None
    assert block.to_q.weight.data_ptr() == shared.data_ptr()
    fused.pack_linears(plain.projections)
    assert fused.joint_linear(plain.projections) is not None
