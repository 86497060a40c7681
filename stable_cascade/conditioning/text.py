"""CLIP text conditioning, shared by Stage C and Stage B.

Matches diffusers' Stable Cascade ``encode_prompt`` + ``check_inputs`` (prior and decoder pipelines,
diffusers 0.42.1) tensor for tensor on every input they accept. Deliberate differences, all on
inputs diffusers rejects or silently mishandles:

* a ``str`` negative prompt with a list of prompts is used for every prompt (diffusers: TypeError);
* ``negative_prompt`` may accompany ``prompt_embeds`` (diffusers: TypeError);
* a ``*_pooled`` tensor without its sequence tensor is an error (diffusers ignores or half-uses it);
* negative inputs are validated even when guidance is off (diffusers only checks them with guidance).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from stable_cascade.limits import MAX_IMAGES

if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    """The two CLIP text inputs of a Stable Cascade UNet."""

    hidden: Tensor  # (B, 77, C) hidden_states[-1], before the final layer norm
    pooled: Tensor  # (B, 1, C) projected pooled output

    def __post_init__(self) -> None:
        if self.hidden.ndim != 3 or self.pooled.ndim != 3:
            raise ValueError(
                "Text embeddings must be 3-D: hidden (batch, tokens, channels) and pooled (batch, 1, "
                f"channels); got hidden {tuple(self.hidden.shape)} and pooled {tuple(self.pooled.shape)}. "
                "Add the missing axis, e.g. `pooled.unsqueeze(1)`."
            )
        if self.hidden.shape[0] != self.pooled.shape[0]:
            raise ValueError(
                f"Hidden and pooled text embeddings disagree on the batch size: {self.hidden.shape[0]} vs "
                f"{self.pooled.shape[0]}. Compute both from the same prompts."
            )

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])

    def repeat(self, n: int) -> TextEmbeddings:
        """Each item ``n`` times in a row: rows ``[a, a, b, b]`` for ``n = 2``."""
        return TextEmbeddings(
            self.hidden.repeat_interleave(n, dim=0), self.pooled.repeat_interleave(n, dim=0)
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEmbeddings:
        return TextEmbeddings(
            self.hidden.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype)
        )


@dataclasses.dataclass(frozen=True)
class PromptConditioning:
    """Text conditioning for one generation call, one row per generated image."""

    cond: TextEmbeddings  # (B·n, ...)
    uncond: TextEmbeddings | None  # (B·n, ...), present only with classifier-free guidance
    batch_size: int  # number of prompts B, before num_images_per_prompt


def encode_text(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: CLIPTextModelWithProjection,
    prompts: list[str],
    device: torch.device | str,
) -> TextEmbeddings:
    """Encode prompts with a CLIP text model, padded and truncated to ``tokenizer.model_max_length``.

    Logs a warning naming the words dropped from each prompt that is too long.
    """
    input_ids, attention_mask = tokenize(tokenizer, prompts)
    _warn_truncated(tokenizer, prompts, int(tokenizer.model_max_length))
    with torch.no_grad():
        return embed_tokens(text_encoder, input_ids.to(device), attention_mask.to(device))


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask (B, L), padded and truncated to ``tokenizer.model_max_length``."""
    max_length = int(tokenizer.model_max_length)
    tokens = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids, tokens.attention_mask


def embed_tokens(
    text_encoder: CLIPTextModelWithProjection, input_ids: Tensor, attention_mask: Tensor
) -> TextEmbeddings:
    """The UNet's text inputs for tokens from :func:`tokenize`; differentiable (training uses it)."""
    output = text_encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return TextEmbeddings(hidden=output.hidden_states[-1], pooled=output.text_embeds.unsqueeze(1))


def _warn_truncated(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> None:
    capacity = max_length - int(tokenizer.num_special_tokens_to_add())
    # verbose=False: the tokenizer's own "sequence too long" warning would repeat ours without the words.
    content = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    for index, ids in enumerate(content):
        if len(ids) > capacity:
            dropped = tokenizer.decode(ids[capacity:], skip_special_tokens=True)
            logger.warning(
                "Prompt %d is longer than the text encoder's %d tokens and was truncated; dropped: %r",
                index,
                max_length,
                dropped,
            )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase | None,
    text_encoder: CLIPTextModelWithProjection | None,
    *,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: Tensor | None = None,
    prompt_embeds_pooled: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    negative_prompt_embeds_pooled: Tensor | None = None,
    num_images_per_prompt: int = 1,
    guidance: bool,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> PromptConditioning:
    """Validate the text inputs of a pipeline call and turn them into per-image embeddings.

    Reproduces diffusers' Stable Cascade ``check_inputs`` + ``encode_prompt``: a missing negative prompt
    is ``""``; embeddings are cast to ``dtype`` (default: the text encoder's dtype) and each prompt is
    repeated ``num_images_per_prompt`` times in a row. ``tokenizer``/``text_encoder`` may be None when
    nothing needs encoding.
    """
    _check_count(num_images_per_prompt)
    prompts = _prompt_list(prompt, prompt_embeds)
    cond_given = _given_embeddings("prompt_embeds", prompt_embeds, prompt_embeds_pooled)
    uncond_given = _given_embeddings(
        "negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_pooled
    )
    batch_size = len(prompts) if prompts is not None else _batch_of(cond_given)
    if batch_size * num_images_per_prompt > MAX_IMAGES:
        raise ValueError(
            f"{batch_size} prompt(s) × num_images_per_prompt {num_images_per_prompt} is "
            f"{batch_size * num_images_per_prompt:,} images in one call; at most {MAX_IMAGES:,}"
        )
    negatives = _negative_list(negative_prompt, uncond_given, batch_size)
    _check_negative_embeds(cond_given, uncond_given, batch_size)
    if cond_given is None:
        assert prompts is not None  # _prompt_list guarantees one of the two
        cond_given = encode_text(*_require_encoder(tokenizer, text_encoder, "prompt"), prompts, device)
    target = dtype if dtype is not None else _default_dtype(text_encoder, cond_given)
    cond = cond_given.to(device=device, dtype=target).repeat(num_images_per_prompt)
    if not guidance:
        return PromptConditioning(cond=cond, uncond=None, batch_size=batch_size)
    if uncond_given is None:
        uncond_given = encode_text(
            *_require_encoder(tokenizer, text_encoder, "negative prompt"), negatives, device
        )
    uncond = uncond_given.to(device=device, dtype=target).repeat(num_images_per_prompt)
    return PromptConditioning(cond=cond, uncond=uncond, batch_size=batch_size)


def check_text_arguments(
    prompt: object,
    negative_prompt: object = None,
    prompt_embeds: Tensor | None = None,
    negative_prompt_embeds: Tensor | None = None,
    prompt_embeds_pooled: Tensor | None = None,
    negative_prompt_embeds_pooled: Tensor | None = None,
    *,
    pooled: bool = True,
) -> None:
    """The checks of :func:`encode_prompts` without encoding (diffusers' ``check_inputs``): a prompt or
    its embeddings, not both; a negative prompt or its embeddings; matching shapes; with ``pooled``,
    each ``*_embeds`` with its ``*_pooled`` partner (the decoder's ``check_inputs`` takes no pooled ones)."""
    prompts = _prompt_list(prompt, prompt_embeds)
    if not pooled:
        prompt_embeds_pooled = prompt_embeds if prompt_embeds_pooled is None else prompt_embeds_pooled
        negative_prompt_embeds_pooled = (
            negative_prompt_embeds if negative_prompt_embeds_pooled is None else negative_prompt_embeds_pooled
        )
    cond = _given_embeddings("prompt_embeds", prompt_embeds, prompt_embeds_pooled)
    uncond = _given_embeddings(
        "negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_pooled
    )
    batch_size = len(prompts) if prompts is not None else _batch_of(cond)
    _negative_list(negative_prompt, uncond, batch_size)
    _check_negative_embeds(cond, uncond, batch_size)


def _check_count(num_images_per_prompt: int) -> None:
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
        raise TypeError(
            f"`num_images_per_prompt` must be an int, got {type(num_images_per_prompt).__name__} "
            f"{num_images_per_prompt!r}."
        )
    if num_images_per_prompt < 1:
        raise ValueError(
            f"`num_images_per_prompt` must be at least 1, got {num_images_per_prompt}. "
            "Ask for one or more images per prompt."
        )


def _prompt_list(prompt: object, prompt_embeds: Tensor | None) -> list[str] | None:
    """The prompts as a list, or None when precomputed embeddings stand in for them."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError(
            "Got both `prompt` and `prompt_embeds`; they describe the same thing. Pass only one of them."
        )
    if prompt is None and prompt_embeds is None:
        raise ValueError("Got neither `prompt` nor `prompt_embeds`. Pass a prompt (str or list of str).")
    if prompt is None:
        return None
    return _as_text_list("prompt", prompt)


def _as_text_list(name: str, value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a str or a list of str, got {type(value).__name__}.")
    bad = [(i, type(item).__name__) for i, item in enumerate(value) if not isinstance(item, str)]
    if bad:
        raise TypeError(
            f"`{name}` must contain only str; got (index, type) {bad}. Convert those items to str."
        )
    if not value:
        raise ValueError(f"`{name}` is an empty list. Pass at least one string.")
    return list(value)


def _given_embeddings(name: str, hidden: Tensor | None, pooled: Tensor | None) -> TextEmbeddings | None:
    """Precomputed embeddings, which need their pooled partner (and vice versa)."""
    if hidden is None and pooled is None:
        return None
    if pooled is None:
        raise ValueError(
            f"`{name}` was given without `{name}_pooled`. Pass both, computed by the same text encoder "
            "(pooled = `text_embeds.unsqueeze(1)`)."
        )
    if hidden is None:
        raise ValueError(
            f"`{name}_pooled` was given without `{name}`. Pass both, computed by the same text encoder, "
            "or neither."
        )
    for label, tensor in ((name, hidden), (f"{name}_pooled", pooled)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"`{label}` must be a torch.Tensor, got {type(tensor).__name__}.")
        if not tensor.is_floating_point():
            raise TypeError(f"`{label}` must be a floating-point tensor, got {tensor.dtype}. Use `.float()`.")
        if tensor.numel() == 0:
            raise ValueError(
                f"`{label}` is empty (shape {tuple(tensor.shape)}). Pass at least one prompt's embeddings: "
                "(batch, tokens, channels) and pooled (batch, 1, channels)."
            )
    return TextEmbeddings(hidden=hidden, pooled=pooled)


def _check_negative_embeds(
    cond: TextEmbeddings | None, uncond: TextEmbeddings | None, batch_size: int
) -> None:
    """Precomputed negatives must match the prompts: one per prompt, the same shapes as ``prompt_embeds``."""
    if uncond is None:
        return
    if uncond.batch_size != batch_size:
        raise ValueError(
            f"`negative_prompt_embeds` has batch size {uncond.batch_size} but there are {batch_size} "
            "prompts. Pass one negative embedding per prompt."
        )
    if cond is None:
        return
    for part in ("hidden", "pooled"):
        mine, theirs = getattr(cond, part).shape, getattr(uncond, part).shape
        if mine != theirs:
            suffix = "" if part == "hidden" else "_pooled"
            raise ValueError(
                f"`prompt_embeds{suffix}` has shape {tuple(mine)} but `negative_prompt_embeds{suffix}` has "
                f"shape {tuple(theirs)}. Compute both with the same text encoder and the same number of "
                "prompts."
            )


def _batch_of(embeddings: TextEmbeddings | None) -> int:
    assert embeddings is not None  # no prompt means prompt_embeds were given
    return embeddings.batch_size


def _negative_list(
    negative_prompt: object, negative_embeds: TextEmbeddings | None, batch_size: int
) -> list[str]:
    """One negative text per prompt; ``""`` when none is given, a single str is used for every prompt."""
    if negative_prompt is not None and negative_embeds is not None:
        raise ValueError("Got both `negative_prompt` and `negative_prompt_embeds`. Pass only one of them.")
    if negative_prompt is None:
        return [""] * batch_size
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch_size
    negatives = _as_text_list("negative_prompt", negative_prompt)
    if len(negatives) != batch_size:
        raise ValueError(
            f"`negative_prompt` has {len(negatives)} entries but there are {batch_size} prompts. "
            "Pass one negative prompt per prompt, or a single str to use for all of them."
        )
    return negatives


def _default_dtype(text_encoder: CLIPTextModelWithProjection | None, cond: TextEmbeddings) -> torch.dtype:
    """diffusers casts to the text encoder's dtype; without an encoder, keep the given embeddings' dtype."""
    return text_encoder.dtype if text_encoder is not None else cond.hidden.dtype


def _require_encoder(
    tokenizer: PreTrainedTokenizerBase | None, text_encoder: CLIPTextModelWithProjection | None, what: str
) -> tuple[PreTrainedTokenizerBase, CLIPTextModelWithProjection]:
    missing = [n for n, v in (("tokenizer", tokenizer), ("text_encoder", text_encoder)) if v is None]
    if tokenizer is None or text_encoder is None:
        raise ValueError(
            f"Encoding the {what} needs a tokenizer and a text encoder, but {' and '.join(missing)} is None. "
            "Load them, or pass precomputed `prompt_embeds`/`negative_prompt_embeds` (with their `_pooled`)."
        )
    return tokenizer, text_encoder
