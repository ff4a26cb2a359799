"""GET /v1/kv_events: a replica's radix-cache changes as a newline-delimited JSON stream.

One line per message: first a snapshot ({"type": "snapshot", "id", "page_size", "hashes"}), then
every event after it ({"type": "stored" | "removed" | "cleared", "id", "hashes"}) as it happens,
and a heartbeat ({"type": "heartbeat", "id"}) when nothing happened for `heartbeat` seconds. A
subscriber that falls behind the log's history gets a new snapshot instead of the lost events.
Ids are consecutive, so a reader that sees a gap knows it and reconnects. The app's shutdown
ends every open feed (they would otherwise hold the server's shutdown open).
"""

from __future__ import annotations

import asyncio
from typing import Callable

import orjson
from aiohttp import web

from kvloom.api import errors
from kvloom.engine.kv_events import KVEventLog

FEED_TASKS_KEY = web.AppKey("kv_event_feeds", set)
LOG_GETTER_KEY = web.AppKey("kv_event_log", Callable)
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S = 0.02, 30.0


def _line(message: dict) -> bytes:
    return orjson.dumps(message) + b"\n"


async def kv_events(request: web.Request) -> web.StreamResponse:
    try:
        heartbeat = float(request.query.get("heartbeat", "2"))
    except ValueError:
        raise errors.invalid("heartbeat", "must be a number of seconds", "invalid_type") from None
    if not MIN_HEARTBEAT_S <= heartbeat <= MAX_HEARTBEAT_S:
        raise errors.invalid("heartbeat", f"must be within [{MIN_HEARTBEAT_S}, {MAX_HEARTBEAT_S}] seconds")
    log: KVEventLog = request.app[LOG_GETTER_KEY](request.app)
    tasks = request.app[FEED_TASKS_KEY]
    task = asyncio.current_task()
    tasks.add(task)
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        snapshot = log.snapshot()
        await response.write(_line(snapshot))
        cursor = snapshot["id"]
        while True:
            events = log.since(cursor)
            if events is None:  # fell behind the kept history
                snapshot = log.snapshot()
                await response.write(_line(snapshot))
                cursor = snapshot["id"]
            elif events:
                await response.write(b"".join(_line(e) for e in events))
                cursor = events[-1]["id"]
            else:
                await log.wait_beyond(cursor, heartbeat)
                if log.last_id == cursor:
                    await response.write(_line({"type": "heartbeat", "id": cursor}))
    finally:
        tasks.discard(task)


async def _end_feeds(app: web.Application) -> None:
    for task in list(app[FEED_TASKS_KEY]):
        task.cancel()


def install_kv_events(app: web.Application, get_log: Callable[[web.Application], KVEventLog]) -> None:
    """Add the feed route to `app`; get_log(app) is the log to serve."""
    app[FEED_TASKS_KEY] = set()
    app[LOG_GETTER_KEY] = get_log
    app.router.add_get("/v1/kv_events", kv_events)
    app.on_shutdown.append(_end_feeds)
