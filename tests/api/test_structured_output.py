"""response_format through the official openai client against a real server on loopback.

With the fake runner (which follows the bitmask it is given) the API shape is checked fast; with the tiny
random-weight model, valid JSON can only come from the mask, so many sampled seeds are validated with
jsonschema, and constrained rows share batches with unconstrained ones that must not change."""

import asyncio
import json

import jsonschema
import openai
import pytest

from kvloom.engine.engine import Engine
from kvloom.engine.runner import ModelRunner
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config
from tests.schemas import PERSON

pytestmark = pytest.mark.timeout(600)

PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
OBJECT_FORMAT = {"type": "json_object"}
MESSAGES = [{"role": "user", "content": "A person, as JSON."}]
MAX_TOKENS = 200  # the tiny engine's context is 256 tokens


def client(served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.api, api_key="unused", max_retries=0)


def check_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


# ---- the fake runner: the API's shape ------------------------------------------------------------------

async def test_chat_and_completions_return_json_of_the_schema(fake_server):
    async with client(fake_server) as c:
        chat = await c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=120,
                                               temperature=0, response_format=PERSON_FORMAT)
        assert chat.choices[0].finish_reason == "stop"
        check_json(chat.choices[0].message.content, PERSON)

        comp = await c.completions.create(model="llama", prompt="JSON:", max_tokens=120, temperature=1.0,
                                          seed=3, n=3, extra_body={"response_format": PERSON_FORMAT})
        assert [ch.finish_reason for ch in comp.choices] == ["stop"] * 3
        assert len({ch.text for ch in comp.choices}) == 3
        for choice in comp.choices:
            check_json(choice.text, PERSON)

        stream = await c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=120,
                                                 temperature=1.0, seed=5, response_format=PERSON_FORMAT,
                                                 stream=True)
        chunks = [chunk async for chunk in stream]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        check_json(text, PERSON)
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == ["stop"]


async def test_text_format_and_schema_less_json_schema(fake_server):
    async with client(fake_server) as c:
        async def text(response_format):
            chat = await c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=12,
                                                   temperature=0, response_format=response_format)
            return chat.choices[0].message.content

        unconstrained = await c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=12,
                                                        temperature=0)
        assert await text({"type": "text"}) == unconstrained.choices[0].message.content
        anything = await text({"type": "json_schema", "json_schema": {"name": "any"}})
        assert anything.startswith("{") and anything == await text(OBJECT_FORMAT)  # both: any JSON object


async def test_max_tokens_cuts_the_json_with_finish_reason_length(fake_server):
    async with client(fake_server) as c:
        chat = await c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=3,
                                               temperature=0, response_format=PERSON_FORMAT)
        choice = chat.choices[0]
        assert choice.finish_reason == "length" and chat.usage.completion_tokens == 3
        assert choice.message.content.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice.message.content)


# ---- the tiny random-weight model ----------------------------------------------------------------------

class RecordingRunner(ModelRunner):
    """The real runner, recording each batch it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def step(self, batch):
        self.batches.append(batch)
        return super().step(batch)


@pytest.fixture
async def tiny_server(tiny_llama):
    # The shared tiny configuration: its step shapes are already in the compilation cache.
    engine = Engine(tiny_engine_config(tiny_llama), runner_factory=RecordingRunner)
    served, cleanup = await serve_engine(engine)
    yield served
    await cleanup()


async def sampled_outputs(c, response_format, schema, seeds, max_tokens):
    """Each seed's chat completion, sampled at temperature 1; returns (texts that finished, number cut)."""
    async def one(seed):
        chat = await c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=max_tokens,
                                               temperature=1.0, seed=seed, response_format=response_format)
        return chat.choices[0]

    choices = await asyncio.gather(*(one(seed) for seed in seeds))
    finished = [ch.message.content for ch in choices if ch.finish_reason == "stop"]
    assert all(ch.finish_reason in ("stop", "length") for ch in choices)
    for text in finished:
        check_json(text, schema)
    return finished, len(choices) - len(finished)


async def test_random_weights_give_valid_json_on_every_seed(tiny_server):
    engine = tiny_server.engine
    compiled = engine.num_compiled_at_ready
    async with client(tiny_server) as c:
        people, people_cut = await sampled_outputs(c, PERSON_FORMAT, PERSON, range(40),
                                                   max_tokens=MAX_TOKENS)
        objects, objects_cut = await sampled_outputs(c, OBJECT_FORMAT, {"type": "object"}, range(100, 140),
                                                     max_tokens=MAX_TOKENS)
    print(f"json_schema: {len(people)} valid, {people_cut} cut by max_tokens; "
          f"json_object: {len(objects)} valid, {objects_cut} cut by max_tokens")
    assert people_cut == 0  # every string and array of PERSON is bounded: each fits in MAX_TOKENS
    assert len(set(people)) > 30  # the seeds really sample different documents
    # A json_object's strings are unbounded, and random weights close one only by chance: some run
    # past MAX_TOKENS (counted above); those that end are valid.
    assert len(objects) >= 15 and any(text != "{}" for text in objects)
    assert engine.runner.num_compiled == compiled  # nothing recompiled for masks


async def test_constrained_rows_share_batches_without_changing_unconstrained_ones(tiny_server):
    engine = tiny_server.engine
    prompts = ["The quick brown fox", "Hello world! How", "Numbers 0 1 2", "Once upon a time"]

    async def plain(c, prompt):
        out = await c.completions.create(model="llama", prompt=prompt, max_tokens=24, temperature=0)
        return out.choices[0].text

    async with client(tiny_server) as c:
        alone = [await plain(c, p) for p in prompts]
        runner = engine.runner
        runner.batches.clear()
        constrained = [c.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 temperature=1.0, seed=seed, response_format=PERSON_FORMAT)
                       for seed in range(len(prompts))]
        # interleaved, so that the engine's 4 running slots hold both kinds at once
        results = await asyncio.gather(*(job for pair in zip(constrained, map(lambda p: plain(c, p), prompts))
                                         for job in pair))
    mixed = [b for b in runner.batches if any(r.token_bitmask is not None for r in b.rows)
             and any(r.token_bitmask is None and r.sample for r in b.rows)]
    assert mixed  # constrained and unconstrained rows did run in one step
    assert results[1::2] == alone  # greedy unconstrained outputs: those of a run without the constrained ones
    for chat in results[0::2]:
        assert chat.choices[0].finish_reason == "stop"
        check_json(chat.choices[0].message.content, PERSON)
