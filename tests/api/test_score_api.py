"""/v1/score over HTTP on the tiny model: the response shape, values equal to the engine's single-item
path, errors with the field named, and score and chat requests correct together."""

import asyncio

import aiohttp
import numpy as np
import openai
import pytest

from kvloom.engine.engine import Engine
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(180)

QUERY = list(range(10, 47))
ITEMS = [[50, 51, 52], [60, 61], [70, 71, 72, 73, 74], [80]]
LABELS = [5, 9]


async def test_score_and_chat_together(tiny_llama):
    served, cleanup = await serve_engine(Engine(tiny_engine_config(tiny_llama)))
    engine = served.engine
    try:
        expected = (await engine.score(QUERY, ITEMS, LABELS, mode="single")).scores
        messages = [{"role": "user", "content": "Hello there"}]
        async with openai.AsyncOpenAI(base_url=served.api, api_key="unused", max_retries=0) as client, \
                aiohttp.ClientSession() as session:
            async def chat():
                r = await client.chat.completions.create(model="llama", messages=messages, max_tokens=8,
                                                         temperature=0)
                return r.choices[0].message.content

            async def score(body):
                async with session.post(served.url + "/v1/score", json=body) as resp:
                    return resp.status, await resp.json()

            alone = await chat()
            body = {"model": "llama", "query": QUERY, "items": ITEMS, "label_token_ids": LABELS}
            results = await asyncio.gather(score(body), chat(), score(dict(body, apply_softmax=True)), chat(),
                                           score(dict(body, items=[])),
                                           score(dict(body, label_token_ids=[999])))
        (s1, plain), c1, (s2, soft), c2, (s3, empty), (s4, bad) = results
        assert s1 == s2 == s3 == 200 and c1 == c2 == alone
        assert plain["object"] == "scoring" and plain["model"] == "llama"
        np.testing.assert_allclose(plain["scores"], expected, rtol=1e-4)
        np.testing.assert_allclose(np.sum(soft["scores"], axis=1), 1.0, rtol=1e-6)
        assert plain["usage"]["prompt_tokens"] == len(QUERY) + sum(map(len, ITEMS))
        assert empty["scores"] == []
        assert s4 == 400 and bad["error"]["param"] == "label_token_ids[0]"
    finally:
        await cleanup()
