"""A CLIP tokenizer whose byte-level BPE spells every word of a small vocabulary as one token.

CLIP's tokenizer splits text into words, spells each word as bytes (the last one marked ``</w>``)
and applies merges in rank order. The merges written here build each vocabulary word left to
right; where one word's merges cut another word differently, extra merges join the pieces, until
every vocabulary word is a single token. Other text still tokenizes, byte by byte.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path

from stable_cascade.checkpoint.atomic import write_text

END = "</w>"
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE vocabularies use (GPT-2's table)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct lower-case words and punctuation runs of ``texts``, in first-seen order."""
    return list(dict.fromkeys(w for text in texts for w in _WORD.findall(text.lower())))


def _symbols(word: str) -> list[str]:
    return [*word[:-1], word[-1] + END]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's merge procedure: repeatedly join every occurrence of the best-ranked adjacent pair."""
    parts = _symbols(word)
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), pair) for pair in itertools.pairwise(parts)]
        rank, (left, right) = min(pairs)
        if rank == len(ranks):
            break
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                merged.append(left + right)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges (in rank order) under which each of ``words`` (ASCII) is a single token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def add(pair: tuple[str, str]) -> None:
        if pair not in ranks:
            ranks[pair] = len(merges)
            merges.append(pair)

    words = [w for w in words if len(w) > 1]
    for word in words:
        symbols = _symbols(word)
        for i in range(1, len(symbols)):
            add(("".join(symbols[:i]), symbols[i]))
    for _ in range(100):  # join the pieces of words that other words' merges cut differently
        split = [parts for parts in (_bpe(w, ranks) for w in words) if len(parts) > 1]
        if not split:
            return merges
        for parts in split:
            add((parts[0], parts[1]))
    raise RuntimeError("could not find merges that keep every word whole")


def write_tokenizer(folder: Path, texts: Iterable[str], max_length: int = 32) -> list[str]:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of a CLIP tokenizer that keeps
    every word of ``texts`` whole; returns the vocabulary (token id order)."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_alphabet()
    merges = word_merges(words_of(texts))
    tokens = [*alphabet, *(c + END for c in alphabet), *("".join(pair) for pair in merges)]
    vocab = list(dict.fromkeys(tokens)) + list(SPECIAL)
    write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1],
        "unk_token": SPECIAL[1],
        "pad_token": SPECIAL[1],
        "do_lower_case": True,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    special = {
        "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1],
        "unk_token": SPECIAL[1],
        "pad_token": SPECIAL[1],
    }
    write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    return vocab
