"""Completions with echo against a real server on loopback (fake runner: every logprob computable by hand),
through the official openai client: the prompt before the completion in the text and the logprobs (the
first prompt token's null), with and without generation (max_tokens 0), streamed (the prompt in the first
chunk), for text and token-id prompts, several prompts and n."""

import openai
import pytest

from tests import fake_runner

pytestmark = pytest.mark.timeout(60)


def client(served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.api, api_key="unused", max_retries=0)


def expected_logprobs(engine, prompt_ids, generated_ids, k):
    """OpenAI's completions logprobs of an echoed prompt and its generated tokens, under the fake model."""
    tok = engine.tokenizer
    tokens = [tok.token_text(t) for t in prompt_ids + generated_ids]
    values = [None] + [fake_runner.fake_prompt_logprob(t, p) for p, t in enumerate(prompt_ids) if p]
    tops = [None] + [{tok.token_text(t): -0.125 for t in range(k)}] * (len(prompt_ids) - 1)
    values += [-0.5] * len(generated_ids)
    tops += [{tok.token_text(t): -1.0 for t in range(k)}] * len(generated_ids)
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def as_dict(logprobs) -> dict:
    return {key: getattr(logprobs, key) for key in KEYS}


async def test_echo_without_generation_scores_the_prompt(fake_server):
    engine = fake_server.engine
    prompt = "The quick brown fox"
    ids = engine.tokenizer.encode(prompt)
    async with client(fake_server) as c:
        out = await c.completions.create(model="llama", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert as_dict(choice.logprobs) == expected_logprobs(engine, ids, [], 2)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 0)


async def test_echo_with_generation(fake_server):
    engine = fake_server.engine
    ids = [5, 6, 7, 8]
    generated = fake_runner.fake_greedy(ids, 3, engine.runner.vocab_size)
    prompt_text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    async with client(fake_server) as c:
        out = await c.completions.create(model="llama", prompt=ids, max_tokens=3, echo=True, logprobs=1,
                                         temperature=0)
        plain = await c.completions.create(model="llama", prompt=ids, max_tokens=3, echo=True, temperature=0)
    choice = out.choices[0]
    assert choice.text == prompt_text + engine.tokenizer.decode(generated)
    assert as_dict(choice.logprobs) == expected_logprobs(engine, ids, generated, 1)
    assert choice.logprobs.text_offset[len(ids)] == len(prompt_text)  # the completion starts after the prompt
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None
    assert out.usage.completion_tokens == 3


async def test_echo_of_several_prompts_and_n(fake_server):
    engine = fake_server.engine
    prompts = ["Hello world", "Once upon a time"]
    async with client(fake_server) as c:
        out = await c.completions.create(model="llama", prompt=prompts, max_tokens=0, echo=True, logprobs=0,
                                         n=2)
        no_logprobs = await c.completions.create(model="llama", prompt=prompts, max_tokens=0, echo=True)
    assert [ch.index for ch in out.choices] == [0, 1, 2, 3]
    for choice in out.choices:
        prompt = prompts[choice.index // 2]
        assert choice.text == prompt
        assert as_dict(choice.logprobs) == expected_logprobs(engine, engine.tokenizer.encode(prompt), [], 0)
    assert [ch.text for ch in no_logprobs.choices] == prompts
    assert all(ch.logprobs is None and ch.finish_reason == "length" for ch in no_logprobs.choices)


@pytest.mark.parametrize("max_tokens", [0, 4])
async def test_streamed_echo_sends_the_prompt_first(fake_server, max_tokens):
    engine = fake_server.engine
    prompt = "Hello world"
    ids = engine.tokenizer.encode(prompt)
    generated = fake_runner.fake_greedy(ids, max_tokens, engine.runner.vocab_size)
    async with client(fake_server) as c:
        stream = await c.completions.create(model="llama", prompt=prompt, max_tokens=max_tokens, echo=True,
                                            logprobs=3, temperature=0, stream=True)
        chunks = [chunk async for chunk in stream]
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt) and first.logprobs.token_logprobs[0] is None
    assert first.logprobs.tokens[:len(ids)] == [engine.tokenizer.token_text(t) for t in ids]
    assert "".join(ch.choices[0].text for ch in chunks) == prompt + engine.tokenizer.decode(generated)
    pieces = [as_dict(ch.choices[0].logprobs) for ch in chunks if ch.choices[0].logprobs]
    merged = {key: [v for piece in pieces for v in piece[key]] for key in KEYS}
    expected = expected_logprobs(engine, ids, generated, 3)
    # a generated token's offset is where its text starts in the text sent (a partial character waits)
    assert merged["text_offset"][len(ids):] == sorted(merged["text_offset"][len(ids):])
    assert merged["text_offset"][len(ids):len(ids) + 1] == ([len(prompt)] if generated else [])
    for logprobs in (merged, expected):
        logprobs["text_offset"] = logprobs["text_offset"][:len(ids)]
    assert merged == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == ["length"]
