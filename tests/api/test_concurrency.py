"""64 concurrent streaming clients against the real tiny model: each gets exactly the greedy output
its prompt gets alone."""

import asyncio

import numpy as np
import openai
import pytest

from kvloom.engine.engine import Engine
from tests.api.conftest import serve_engine
from tests.conftest import tiny_engine_config

pytestmark = pytest.mark.timeout(300)


async def test_64_streaming_clients_match_sequential(tiny_llama):
    config = tiny_engine_config(tiny_llama,
                                scheduler=dict(max_running=8, max_tokens_per_step=128, chunk_size=64,
                                                           max_prefill_seqs=4))
    served, cleanup = await serve_engine(Engine(config))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 384, size=int(rng.integers(3, 40))).tolist() for _ in range(64)]
    try:
        async with openai.AsyncOpenAI(base_url=served.api, api_key="unused", max_retries=0) as c:
            async def stream(prompt):
                s = await c.completions.create(model="llama", prompt=prompt, max_tokens=8, temperature=0,
                                               stream=True)
                return "".join([ch.choices[0].text async for ch in s])

            together = await asyncio.gather(*[stream(p) for p in prompts])
            alone = [await stream(p) for p in prompts]  # one at a time
        assert together == alone
        assert all(together)
        assert served.engine.scheduler.num_running == 0
    finally:
        await cleanup()
