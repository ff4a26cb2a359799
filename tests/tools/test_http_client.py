"""tools.http_client against a stub server on loopback: each kind of answer lands in the record as
the module docstring says."""

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web

from kvloom.api.server import start_server
from kvloom.tools import http_client
from kvloom.tools.command_args import UsageError
from kvloom.tools.slo import RequestRecord
from kvloom.tools.workload import RequestSpec

pytestmark = pytest.mark.timeout(60)


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else orjson.dumps(e)) + b"\n\n" for e in events)


@pytest.fixture
async def stub_url():
    async def stream(request):
        body = await request.json()
        events = [{"id": "r", "choices": [{"delta": {"content": "a"}}]},
                  {"id": "r", "choices": [{"delta": {"content": "b"}}]}]
        if body.get("fail"):
            events.append({"error": {"message": "engine failed", "type": "server_error",
                                     "code": "engine_unavailable"}})
        if not body.get("cut"):
            events += [{"id": "r", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}},
                       b"[DONE]"]
        return web.Response(body=sse(*events), content_type="text/event-stream")

    async def completion(request):
        body = await request.json()
        if body.get("bad"):
            return web.json_response({"error": {"message": "bad", "type": "invalid_request_error"}},
                                     status=400)
        return web.json_response({"choices": [{"message": {"content": "hi"}}],
                                  "usage": {"prompt_tokens": 4, "completion_tokens": 2}})

    async def score(request):
        return web.json_response({"scores": [[0.5]], "usage": {"prompt_tokens": 9}})

    async def models(request):
        return web.json_response({"data": [{"id": "tiny"}]})

    app = web.Application()
    app.router.add_post("/stream", stream)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_post("/v1/score", score)
    app.router.add_get("/v1/models", models)
    runner, url = await start_server(app)
    yield url
    await runner.cleanup()


async def send(url: str, spec: RequestSpec) -> RequestRecord:
    rec = RequestRecord()
    async with aiohttp.ClientSession() as session:
        await http_client.send_request(session, url, spec, rec, timeout_s=30)
    return rec


async def test_streams(stub_url):
    rec = await send(stub_url, RequestSpec("/stream", {}, is_stream=True))
    assert rec.is_ok and rec.output_tokens == 7 and rec.prompt_tokens == 3 and len(rec.itls) == 1
    assert 0 < rec.ttft <= rec.e2e
    assert (await send(stub_url, RequestSpec("/stream", {"fail": True}, is_stream=True))).error == \
        "stream_error:engine_unavailable"
    assert (await send(stub_url, RequestSpec("/stream", {"cut": True},
                                             is_stream=True))).error == "incomplete_stream"


async def test_bodies_and_http_errors(stub_url):
    rec = await send(stub_url, RequestSpec("/v1/chat/completions", {}, is_stream=False))
    assert rec.is_ok and rec.e2e > 0 and (rec.prompt_tokens, rec.output_tokens) == (4, 2)
    bad = await send(stub_url, RequestSpec("/v1/chat/completions", {"bad": True}, is_stream=False))
    assert bad.error == "http_400:invalid_request_error"  # no code in the envelope: its type
    scored = await send(stub_url, RequestSpec("/v1/score", {}, is_stream=False, num_items=1))
    assert scored.is_ok and scored.num_items == 1 and scored.prompt_tokens == 9
    wrong = await send(stub_url, RequestSpec("/v1/score", {}, is_stream=False, num_items=2))
    assert wrong.error == "bad_response" and wrong.num_items == 0
    assert (await send(stub_url, RequestSpec("/nowhere", {}, is_stream=False))).error == "http_404"


async def test_json_requests_and_the_model(stub_url):
    async with aiohttp.ClientSession() as session:
        assert await http_client.discover_model(session, stub_url, 10) == "tiny"
        assert await http_client.request_json(session, "GET", stub_url + "/v1/models", timeout_s=10) == (
            200, {"data": [{"id": "tiny"}]})
        assert await http_client.discover_model(session, stub_url + "/none", 10) is None


def test_base_url():
    assert http_client.base_url("http://h:1/v1/") == "http://h:1"
    with pytest.raises(UsageError, match="--url"):
        http_client.base_url("h:1")


async def test_a_server_that_closes_each_kept_alive_connection_loses_no_request():
    """llama-server closes the connection after each streamed response without saying so: the next request
    on that connection fails before any byte comes back, and is sent again on a new one (once)."""
    served, connections = [], 0

    async def handle(reader, writer):
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        served.append(orjson.loads(await reader.readexactly(length)))
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        body = sse({"id": "r", "choices": [{"delta": {"content": "a"}}]},
                   {"id": "r", "choices": [], "usage": usage}, b"[DONE]")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        writer.close()  # no "Connection: close": the client still holds the connection as kept alive
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        records = []
        async with aiohttp.ClientSession() as session:
            for i in range(6):
                records.append(RequestRecord())
                await http_client.send_request(session, url, RequestSpec("/s", {"i": i}, is_stream=True),
                                               records[-1], timeout_s=30)
        assert [rec.error for rec in records] == [None] * 6
        assert [body["i"] for body in served] == list(range(6))  # each request reached the server once
    finally:
        server.close()
        await server.wait_closed()
    # a server that is not there at all is one connection error, at once
    rec = await send(url, RequestSpec("/s", {}, is_stream=True))
    assert rec.error == "connection_error"
