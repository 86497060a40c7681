"""How many tokens a prompt has as its model encodes it (the page's counter, AUTOMATIC1111's "12/75")."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, cast

from stable_cascade.conditioning.emphasis import Emphasis, count_tokens
from stable_cascade.engine.library import available
from stable_cascade.loading.components import MODEL_INDEX
from stable_cascade.loading.sources import ModelSources

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prompt_tokens(sources: ModelSources, text: str, emphasis: str) -> tuple[int, int]:
    """The prompt's tokens and how many it may have (see
    :func:`~stable_cascade.conditioning.emphasis.count_tokens`), with the tokenizer of ``sources``; a
    one-line ``ValueError`` when that is not here."""
    if not available(sources):
        raise ValueError(
            f"the {sources.bundle.name} model is not on this machine, so its tokens cannot be counted"
        )
    spec = sources.components or sources.prior
    if spec is None or not (Path(spec) / MODEL_INDEX).is_file():
        spec = sources.bundle.prior_repo
    try:
        tokenizer = _tokenizer(spec)
    except OSError as error:
        raise ValueError(f"the tokenizer of {Path(spec).name} could not be read ({error})") from None
    return count_tokens(tokenizer, text, cast(Emphasis, emphasis))


@functools.lru_cache(maxsize=8)
def _tokenizer(spec: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(spec, subfolder="tokenizer")
    return tokenizer
