"""`kvloom serve` as a user runs it: a subprocess on a free port; SIGTERM drains the in-flight stream,
then the process exits on its own."""

import asyncio
import os
import re
import signal
import socket
import sys

import aiohttp
import orjson
import pytest

from tests.conftest import _JAX_CACHE

pytestmark = pytest.mark.timeout(480)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def launch(model: str, *extra: str, env=None):
    """`kvloom serve` of `model` on a free port with the tiny engine sizes (the compile cache is shared
    with the other tests); returns (process, base url)."""
    port = free_port()
    kvloom = os.path.join(os.path.dirname(sys.executable), "kvloom")
    proc = await asyncio.create_subprocess_exec(
        kvloom, "serve", "--model", model, "--port", str(port), "--max-running", "4",
        "--max-model-len", "256", "--page-size", "4", "--num-pages", "512", "--chunk-size", "32",
        "--max-tokens-per-step", "64", "--max-prefill-seqs", "2", "--compile-cache", _JAX_CACHE, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(proc, output: list) -> None:
    """Reads the server's output into `output` until it says the engine is READY."""
    while True:
        line = (await proc.stdout.readline()).decode()
        assert line, f"the server exited during start-up: {''.join(output)}"
        output.append(line)
        if line.startswith("kvloom: ready"):
            return


async def stop(proc, output: list) -> int:
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 60)
    output.append((await proc.stdout.read()).decode())
    return code


async def test_sigterm_drains_then_exits(tiny_llama):
    proc, url = await launch(tiny_llama, "--drain-timeout", "60")
    output = []
    try:
        await asyncio.wait_for(wait_ready(proc, output), 360)
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/ready") as r:
                assert r.status == 200
            body = {"model": "llama", "prompt": [5, 6, 7], "max_tokens": 60, "temperature": 0,
                    "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with session.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                usage, signalled = None, False
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        chunk = orjson.loads(line[6:])
                        assert "error" not in chunk, chunk
                        usage = chunk.get("usage") or usage
                        if not signalled:
                            proc.send_signal(signal.SIGTERM)  # mid-stream: the server drains this request
                            signalled = True
                    if line.startswith(b"data: [DONE]"):
                        break
        assert usage["completion_tokens"] == 60
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        output.append((await proc.stdout.read()).decode())
        assert "kvloom: draining" in "".join(output)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_api_key_served_names_access_log_and_a_quiet_start(tiny_llama):
    """KVLOOM_API_KEY guards /v1/* (the official client sees AuthenticationError without it), aliases are
    accepted, every request gets an access-log line, and no library chatter reaches the log at start."""
    import openai

    key, HI = "sk-serve-test", [{"role": "user", "content": "Hi"}]
    env = dict(os.environ, KVLOOM_API_KEY=key)
    proc, url = await launch(tiny_llama, "--served-model-name", "tiny-chat", "tiny-alias", env=env)
    output = []
    try:
        await asyncio.wait_for(wait_ready(proc, output), 360)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model="tiny-chat", messages=HI)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as c:
            chat = await c.chat.completions.create(model="tiny-alias", messages=HI, max_tokens=3,
                                                   temperature=0)
            assert chat.model == "tiny-chat" and chat.usage.completion_tokens >= 1
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/metrics") as r:  # open without the key
                assert 'vllm:num_requests_running{model_name="tiny-chat"}' in await r.text()
            async with session.get(url + "/status", headers={"Authorization": f"Bearer {key}"}) as r:
                kv_cache = (await r.json())["kv_cache"]
                assert kv_cache["num_pages"] == 512 and kv_cache["sized_by"] == "num_pages"
        assert await stop(proc, output) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = "".join(output)
    assert "kvloom.access: POST /v1/chat/completions 401 " in log
    assert "kvloom.access: POST /v1/chat/completions 200 " in log
    assert "kvloom.access: GET /metrics 200 " in log
    noisy = [line for line in log.splitlines() if re.search(r"\b(tpu|pytorch|tensorflow|cuda)\b", line, re.I)]
    assert noisy == [] and "Traceback" not in log, log


def test_serve_help_gives_every_flag_a_sentence_and_its_default():
    from kvloom.tools.cli import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert {"--api-key", "--served-model-name", "--no-access-log", "--kv-memory-fraction", "--num-pages",
            "--host", "--port"} <= {o for a in flags for o in a.option_strings}
    for action in flags:
        assert action.help and len(action.help.split()) >= 3, action.option_strings
        assert "default" in action.help, action.option_strings
    text = serve.format_help()
    assert "(default 32)" in text and "at most 2048" in text


async def test_a_second_start_reads_every_executable_back(tiny_llama, tmp_path):
    """Two starts with one new compile cache: the first compiles every step executable and keeps it, the
    second compiles none (all read back) and answers the same greedy text; /status and the ready line say
    where each start's time and executables went."""
    starts = []
    for _ in range(2):
        proc, url = await launch(tiny_llama, "--compile-cache", str(tmp_path / "cache"))
        output = []
        try:
            await asyncio.wait_for(wait_ready(proc, output), 360)
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/status") as r:
                    start = (await r.json())["start"]
                body = {"model": "llama", "prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0,
                        "ignore_eos": True}
                async with session.post(url + "/v1/completions", json=body) as r:
                    text = (await r.json())["choices"][0]["text"]
            assert await stop(proc, output) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        ready_line = next(line for line in output if line.startswith("kvloom: ready"))
        starts.append((start, text, ready_line))
    (cold, cold_text, _), (warm, warm_text, warm_line) = starts
    compiled = cold["detail"]["executables_compiled"]
    assert compiled > 0 and cold["detail"]["executables_loaded"] == 0
    assert (warm["detail"]["executables_loaded"], warm["detail"]["executables_compiled"]) == (compiled, 0)
    assert warm_text == cold_text
    assert list(warm["phases"]) == ["load_model", "tokenizer", "warmup", "round_trip"]
    assert f"({compiled} executables: {compiled} from the start cache, 0 compiled)" in warm_line
    assert "since the command started" in warm_line
