"""Prompt weighting in AUTOMATIC1111's syntax, for the CLIP text encoder both stages share.

The syntax, as AUTOMATIC1111's wiki documents it: ``(words)`` multiplies the words' attention by 1.1,
``((words))`` by 1.21, ``[words]`` divides it by 1.1, ``(words:1.5)`` sets the factor; ``\\(`` ``\\)``
``\\[`` ``\\]`` and ``\\\\`` are the characters themselves; a bracket left open applies to the rest of
the prompt, a closing one without its opening is text; ``BREAK`` (a word of its own, in capitals)
starts a new chunk.

A weighted prompt is encoded as AUTOMATIC1111 encodes it: in chunks of ``model_max_length - 2`` tokens
(75 for CLIP; a chunk that fills up moves the words after a comma among its last 20 tokens to the
next one), each chunk encoded alone between its start and end tokens; each token's hidden state is
multiplied by its weight and, with ``original`` emphasis, the chunk is rescaled so that its mean is
what it was (``no_norm``: not rescaled; ``ignore``: the syntax is read, every weight is 1). The chunks'
hidden states follow each other (77 tokens each); the pooled embedding is the first chunk's. A prompt
without any of the syntax is not weighted: callers encode it as before (:func:`is_plain`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Literal

import torch

from stable_cascade.conditioning.text import TextEmbeddings

if TYPE_CHECKING:
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase

Emphasis = Literal["original", "no_norm", "ignore", "none"]
FACTOR = 1.1  # ( ) multiplies, [ ] divides
COMMA_BACKTRACK = 20  # tokens: how far back a full chunk looks for a comma to break at
MAX_CHUNKS = 32  # 2,400 tokens: far beyond what conditions an image, bounded for the server's sake
#: Brackets a prompt may open: reading costs brackets², and no prompt needs more.
MAX_BRACKETS = 1000
_BREAK = re.compile(r"\bBREAK\b")  # the spaces around it go too (stripped, not matched: linear)
_NUMBER = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_ESCAPES = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}


@dataclasses.dataclass(frozen=True)
class Fragment:
    """Text with one weight; ``BREAK`` is a fragment of its own (``is_break``)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_attention(text: str) -> list[Fragment]:
    """The prompt's fragments and their weights (neighbours of equal weight merged); a one-line
    ``ValueError`` for more than :data:`MAX_BRACKETS` brackets or :data:`MAX_CHUNKS` ``BREAK``."""
    opened = text.count("(") + text.count("[") - text.count("\\(") - text.count("\\[")
    if opened > MAX_BRACKETS:
        raise ValueError(f"the prompt opens {opened:,} brackets; at most {MAX_BRACKETS:,} are read")
    if len(_BREAK.findall(text)) >= MAX_CHUNKS:
        raise ValueError(f"the prompt has more BREAKs than its {MAX_CHUNKS} chunks may have; use fewer")
    parts: list[list[object]] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []
    fresh = [False]  # the last part is text no bracket has opened or closed after: text joins it

    def scale(start: int, factor: float) -> None:
        fresh[0] = False
        for part in parts[start:]:
            if not part[2]:
                part[1] = float(part[1]) * factor  # type: ignore[arg-type]  # a float

    def add(piece: str, is_break: bool = False) -> None:
        if fresh[0] and not is_break:
            parts[-1][0] = f"{parts[-1][0]}{piece}"
        else:
            parts.append([piece, 1.0, is_break])
        fresh[0] = not is_break

    i, end = 0, len(text)
    while i < end:
        pair = text[i : i + 2]
        number = _NUMBER.match(text, i) if text[i] == ":" else None
        if pair in _ESCAPES:
            add(_ESCAPES[pair])
            i += 2
        elif text[i] in "([":
            (round_open if text[i] == "(" else square_open).append(len(parts))
            fresh[0] = False
            i += 1
        elif number is not None and round_open and _is_number(number.group(1)):
            scale(round_open.pop(), float(number.group(1)))
            i = number.end()
        elif text[i] == ")" and round_open:
            scale(round_open.pop(), FACTOR)
            i += 1
        elif text[i] == "]" and square_open:
            scale(square_open.pop(), 1 / FACTOR)
            i += 1
        else:
            run = _run_end(text, i)
            pieces = _BREAK.split(text[i:run])
            for n, piece in enumerate(pieces):
                if n:
                    add("BREAK", is_break=True)
                add(piece.lstrip() if n else piece)
                if n < len(pieces) - 1:
                    parts[-1][0] = str(parts[-1][0]).rstrip()
            i = run
    for start in round_open:
        scale(start, FACTOR)
    for start in square_open:
        scale(start, 1 / FACTOR)
    return _merged(parts)


def is_plain(text: str) -> bool:
    """Whether the prompt has none of the syntax (it is encoded as written)."""
    fragments = parse_attention(text)
    return fragments == [Fragment(text)] or (not text and fragments == [])


def chunk_tokens(
    tokenizer: PreTrainedTokenizerBase, fragments: list[Fragment], ignore: bool = False
) -> list[tuple[list[int], list[float]]]:
    """The fragments' tokens (no start or end token) and weights, cut into chunks as the module says."""
    size = int(tokenizer.model_max_length) - 2
    texts = [f.text for f in fragments if not f.is_break]
    ids = iter(tokenizer(texts, add_special_tokens=False).input_ids if texts else [])
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1]
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for fragment in fragments:
        if fragment.is_break:
            chunks.append((tokens, weights))
            tokens, weights, last_comma = [], [], -1
            continue
        for token in next(ids):
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                chunks.append((tokens[:cut], weights[:cut]))
                tokens, weights, last_comma = tokens[cut:], weights[cut:], -1
            if len(tokens) == size:
                chunks.append((tokens, weights))
                tokens, weights, last_comma = [], [], -1
            tokens.append(token)
            weights.append(1.0 if ignore else fragment.weight)
    if tokens or not chunks:
        chunks.append((tokens, weights))
    return chunks


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str, emphasis: Emphasis) -> tuple[int, int]:
    """The prompt's tokens (without start and end tokens) and how many it may have as it is encoded: a
    plain prompt one chunk (the rest is dropped), a weighted one its chunks' worth (AUTOMATIC1111's
    "12/75")."""
    size = int(tokenizer.model_max_length) - 2
    if emphasis == "none" or is_plain(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids), size
    chunks = chunk_tokens(tokenizer, parse_attention(text))
    return sum(len(tokens) for tokens, _ in chunks), size * len(chunks)


def encode_weighted(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: CLIPTextModelWithProjection,
    text: str,
    emphasis: Emphasis,
    device: torch.device | str,
) -> TextEmbeddings:
    """The embeddings of a prompt with the syntax (see the module's docstring): hidden (1, 77·chunks, C)
    and the first chunk's pooled (1, 1, C)."""
    chunks = chunk_tokens(tokenizer, parse_attention(text), ignore=emphasis == "ignore")
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(
            f"the prompt is {len(chunks)} chunks of {int(tokenizer.model_max_length) - 2} tokens; at most "
            f"{MAX_CHUNKS} are encoded: shorten it"
        )
    length = int(tokenizer.model_max_length)
    start, stop = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    ids, masks, weights = [], [], []
    for tokens, chunk_weights in chunks:
        padding = length - 2 - len(tokens)
        ids.append([start, *tokens, stop] + [pad] * padding)  # as the tokenizer pads a prompt
        masks.append([1] * (len(tokens) + 2) + [0] * padding)
        weights.append([1.0, *chunk_weights, 1.0] + [1.0] * padding)
    with torch.no_grad():
        output = text_encoder(
            torch.tensor(ids, device=device),
            attention_mask=torch.tensor(masks, device=device),
            output_hidden_states=True,
        )
    hidden = output.hidden_states[-1]  # (chunks, 77, C)
    factors = torch.tensor(weights, device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
    weighted = []
    for z, factor in zip(hidden, factors, strict=True):
        mean = z.mean()
        z = z * factor
        weighted.append(z * (mean / z.mean()) if emphasis == "original" else z)
    return TextEmbeddings(torch.cat(weighted).unsqueeze(0), output.text_embeds[:1].unsqueeze(1))


def _run_end(text: str, start: int) -> int:
    """Where a run of plain text that starts at ``start`` ends (a special character, or the end)."""
    i = start + 1 if text[start] in "\\:)]" else start  # a special character that is text here
    while i < len(text) and text[i] not in "\\()[]:":
        i += 1
    return i


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merged(parts: list[list[object]]) -> list[Fragment]:
    fragments: list[Fragment] = []
    for text, weight, is_break in parts:
        fragment = Fragment(str(text), float(weight), bool(is_break))  # type: ignore[arg-type]
        if not fragment.is_break and not fragment.text:
            continue
        previous = fragments[-1] if fragments else None
        if previous and not (previous.is_break or fragment.is_break) and previous.weight == fragment.weight:
            fragments[-1] = Fragment(previous.text + fragment.text, fragment.weight)
        else:
            fragments.append(fragment)
    return fragments
