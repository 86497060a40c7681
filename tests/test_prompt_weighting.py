"""AUTOMATIC1111's prompt syntax: weighting (``(word:1.2)``, ``(word)``, ``[word]``, ``BREAK``) read and
applied to the demo's CLIP text encoder as AUTOMATIC1111 defines it, and ``<lora:name:weight>`` tags."""

from __future__ import annotations

import time
from collections.abc import Iterator

import PIL.Image
import pytest
import torch

from stable_cascade.conditioning.emphasis import (
    FACTOR,
    Fragment,
    chunk_tokens,
    count_tokens,
    encode_weighted,
    is_plain,
    parse_attention,
)
from stable_cascade.engine import Engine, ImageDone, Job, ModelSources, image_sha256
from stable_cascade.engine.job import Row
from stable_cascade.engine.texts import TextCache
from stable_cascade.fields.prompts import PromptLora, extra_networks, prompt_loras
from stable_cascade.pipelines.prior import StableCascadePriorPipeline

PROMPT = "a red circle on the left, on a white background"


@pytest.fixture(scope="module")
def prior() -> Iterator[StableCascadePriorPipeline]:
    engine = Engine(device="cpu", dtype="fp32")
    pipe = engine.load(ModelSources(model="demo"), "fp32").prior_pipe
    assert pipe is not None
    yield pipe


def test_the_syntax_reads_as_automatic1111_documents_it() -> None:
    cases = {
        "a (red) circle": [("a ", 1.0), ("red", FACTOR), (" circle", 1.0)],
        "((red))": [("red", FACTOR * FACTOR)],
        "[red] circle": [("red", 1 / FACTOR), (" circle", 1.0)],
        "(red:1.5) circle": [("red", 1.5), (" circle", 1.0)],
        "(red circle:0.5)": [("red circle", 0.5)],
        "a \\(red\\) \\[circle\\] \\\\": [("a (red) [circle] \\", 1.0)],
        "(open to the end": [("open to the end", FACTOR)],
        "closed) only": [("closed) only", 1.0)],
        "ratio 1:2 kept": [("ratio 1:2 kept", 1.0)],
        "(red:x)": [("red:x", FACTOR)],  # not a number: text, in brackets
        "(a [b:1.2]) c": [("a ", FACTOR), ("b:1.2 c", 1.0)],
    }
    for text, expected in cases.items():
        assert [(f.text, pytest.approx(f.weight)) for f in parse_attention(text)] == expected, text
    assert parse_attention("a cat BREAK a dog") == [
        Fragment("a cat"),
        Fragment("BREAK", 1.0, True),
        Fragment("a dog"),
    ]
    assert is_plain(PROMPT) and is_plain("") and is_plain("3:2 ratio") and not is_plain("(red)")
    start = time.perf_counter()  # what users write stays cheap to read, or is refused at once
    parse_attention("(" * 1000 + "x" + ")" * 1000)
    parse_attention("[a:" * 1000 + "b" * 100_000)
    parse_attention(" " * 100_000 + "BREAK" + ":" * 50_000)
    for many in ("(" * 50_000, "BREAK " * 100):
        with pytest.raises(ValueError, match=r"at most|more BREAKs"):
            parse_attention(many)
    assert time.perf_counter() - start < 2.0


def test_a_plain_prompt_and_weights_of_one_give_exactly_todays_embeddings(
    prior: StableCascadePriorPipeline,
) -> None:
    today = prior.text_conditioning(prompt=PROMPT, guidance=False).cond
    for text, emphasis in (
        (f"({PROMPT}:1.0)", "original"),
        (f"({PROMPT}:1.0)", "no_norm"),
        (f"({PROMPT})", "ignore"),
    ):
        weighted = encode_weighted(prior.tokenizer, prior.text_encoder, text, emphasis, "cpu")
        assert torch.equal(weighted.hidden, today.hidden) and torch.equal(weighted.pooled, today.pooled), text
    cache = TextCache()
    (plain,) = cache.embeddings(prior, [PROMPT], emphasis="original")  # no syntax: the pipeline's own path
    assert torch.equal(plain.hidden, today.hidden)
    (literal,) = cache.embeddings(prior, ["(red)"], emphasis="none")  # none: the brackets are text
    assert torch.equal(literal.hidden, prior.text_conditioning(prompt="(red)", guidance=False).cond.hidden)


def test_weights_scale_their_tokens_hidden_states_and_original_keeps_the_mean(
    prior: StableCascadePriorPipeline,
) -> None:
    tokenizer, encoder = prior.tokenizer, prior.text_encoder
    today = prior.text_conditioning(prompt="a red circle", guidance=False).cond.hidden[0]  # (32, C)
    red = 2  # start token, "a", "red"
    no_norm = encode_weighted(tokenizer, encoder, "a (red:1.5) circle", "no_norm", "cpu").hidden[0]
    factors = torch.ones(today.shape[0], 1)
    factors[red] = 1.5
    torch.testing.assert_close(no_norm, today * factors)
    original = encode_weighted(tokenizer, encoder, "a (red:1.5) circle", "original", "cpu").hidden[0]
    torch.testing.assert_close(original, today * factors * (today.mean() / (today * factors).mean()))
    torch.testing.assert_close(original.mean(), today.mean())
    ignored = encode_weighted(tokenizer, encoder, "a (red:1.5) circle", "ignore", "cpu").hidden[0]
    torch.testing.assert_close(ignored, today)


def test_break_and_long_prompts_make_chunks_and_rows_are_padded_to_the_longest(
    prior: StableCascadePriorPipeline,
) -> None:
    tokenizer, encoder = prior.tokenizer, prior.text_encoder
    size = tokenizer.model_max_length  # the demo's tokenizer: 32 tokens, chunks of 30
    two = encode_weighted(tokenizer, encoder, "a red circle BREAK on the left", "original", "cpu")
    assert two.hidden.shape == (1, 2 * size, 128)
    second = prior.text_conditioning(prompt="on the left", guidance=False).cond
    torch.testing.assert_close(two.hidden[:, size:], second.hidden)  # each chunk encoded alone
    first = prior.text_conditioning(prompt="a red circle", guidance=False).cond
    torch.testing.assert_close(two.pooled, first.pooled)  # the pooled embedding: the first chunk's
    words = ", ".join(["red circle"] * 12)  # 35 tokens: a comma near the end breaks the first chunk
    chunks = chunk_tokens(tokenizer, parse_attention(f"({words})"))
    comma = tokenizer(",", add_special_tokens=False).input_ids[0]
    assert len(chunks) == 2 and chunks[0][0][-1] == comma and len(chunks[0][0]) <= size - 2
    assert count_tokens(tokenizer, f"({words})", "original") == (35, 2 * (size - 2))
    assert count_tokens(tokenizer, words, "original") == (35, size - 2)  # plain: one chunk, cut
    job = Job.create(prompt="a red circle BREAK on the left", model="demo", seed=1, prior_steps=2)
    arguments = TextCache().arguments(prior, [Row(job, 0)], guided=True)
    assert arguments["prompt_embeds"].shape == arguments["negative_prompt_embeds"].shape == (1, 2 * size, 128)


def test_a_weighted_job_runs_and_differs_from_its_plain_prompt() -> None:
    engine = Engine(device="cpu")
    images = {}
    for prompt in (PROMPT, PROMPT.replace("red", "(red:1.4)"), PROMPT.replace("red", "(red:1.0)")):
        job = Job.create(prompt=prompt, model="demo", seed=2, prior_steps=4, decoder_steps=2)
        images[prompt] = next(e for e in engine.run(job) if isinstance(e, ImageDone)).image.tobytes()
    plain, heavier, same = images.values()
    assert plain == same != heavier


def test_stage_b_alone_takes_the_weighted_prompts_first_chunk() -> None:
    """reconstruct runs Stage B only: it gets what the cascade hands on (the first chunk's pooled)."""
    engine, picture = Engine(device="cpu"), PIL.Image.new("RGB", (128, 128), "white")
    made = []
    for prompt, emphasis in (("a red circle", "original"), ("(a red circle:1.0) BREAK x", "original"),
                             ("(a red circle:1.0) BREAK x", "none")):  # fmt: skip
        job = Job.create(task="reconstruct", prompt=prompt, emphasis=emphasis, model="demo", seed=1,
                         decoder_steps=2, decoder_guidance=2.0, input_image_sha256=image_sha256(picture),
                         image_size=picture.size)  # fmt: skip
        image = next(e for e in engine.run(job, picture) if isinstance(e, ImageDone)).image
        made.append(torch.tensor(list(image.tobytes()), dtype=torch.int16))
    # One chunk or two goes through the text encoder in a different batch shape, so another CPU's
    # kernels may round the last bit differently: the same picture is equal within one level.
    assert (made[0] - made[1]).abs().max() <= 1
    assert (made[0] - made[2]).abs().max() > 4


def test_lora_tags_are_found_and_taken_out_as_automatic1111_does() -> None:
    text, loras = prompt_loras("<lora:ink:0.8> a cat, <lyco:paper_v2:0.5:0.5> <lora:plain>")
    assert text == "a cat," and loras == [
        PromptLora("ink", 0.8),
        PromptLora("paper_v2", 0.5),
        PromptLora("plain"),
    ]
    assert extra_networks("a <b c:d> <hypernet:x:1>") == ("a <b c:d> ", [("hypernet", ["x", "1"])])
    for wrong, message in (
        ("<hypernet:x:1>", "only LoRAs"),
        ("<lora:x:heavy>", "must be a number"),
        ("<lora:x:0.5:0.7>", "two weights"),
        ("<lora: :1>", "has no name"),
    ):
        with pytest.raises(ValueError, match=message):
            prompt_loras(wrong)
    start = time.perf_counter()
    extra_networks("<a:" * 30_000 + ">")  # one pass, however many openings
    extra_networks("<" * 100_000)
    assert time.perf_counter() - start < 2.0
