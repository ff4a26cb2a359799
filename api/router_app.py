"""`kvloom router`: one OpenAI-compatible endpoint in front of several replicas.

Data flow for a request (all on the router's own event loop):

    POST /v1/... ─► body read, JSON checked (400 in the OpenAI envelope when malformed)
                 ─► no ready replica: 503 no_ready_replica at once
                 ─► PromptTokenizer (worker thread): token ids + page hashes
                 ─► Policy.rank(ready replicas, prompt, index match)   (timed: decision latency)
                 ─► Proxy.forward: best replica, one retry on the next before the first byte

Who owns what: a `Router` owns its HTTP session, its membership poll tasks, one KV feed per
replica, its indexes, its tokenizer thread, its metrics registry and its RNG. Nothing is
process-global: two routers run side by side in one process and close in any order.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import aiohttp
import orjson
from aiohttp import web

from kvloom.api import errors
from kvloom.api.errors import APIError
from kvloom.api.http_common import make_error_middleware, read_json
from kvloom.api.router_feed import KVFeed
from kvloom.api.router_index import ApproximateReplicaIndex, ExactReplicaIndex, PromptPages
from kvloom.api.router_membership import HealthConfig, Membership, Replica
from kvloom.api.router_metrics import RouterMetrics
from kvloom.api.router_notify import Notifier
from kvloom.api.router_policy import CostConfig, Policy
from kvloom.api.router_proxy import Proxy, ProxyConfig
from kvloom.api.router_tokens import PromptTokenizer

log = logging.getLogger(__name__)

ROUTER_KEY = web.AppKey("router", object)
MAX_BODY_BYTES = 4 * 2**20
ReplicaIndex = Union[ExactReplicaIndex, ApproximateReplicaIndex]


@dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[str, ...] = ()
    policy: str = "prefix"
    seed: int = 0
    tokenizer: Optional[str] = None  # the replicas' model (directory or .gguf); None: token-id prompts only
    health: HealthConfig = field(default_factory=HealthConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    feed_heartbeat_s: float = 2.0
    feed_retry_s: float = 0.5
    approximate_page_size: int = 16
    approximate_ttl_s: float = 300.0
    enable_admin: bool = False


class Router:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.policy = Policy(config.policy, config.seed, config.cost)  # validates the name
        self.notifier = Notifier()
        self.indexes: dict[str, ReplicaIndex] = {}
        self.feeds: dict[str, KVFeed] = {}
        self.tokenizer = PromptTokenizer(config.tokenizer)
        self.session: Optional[aiohttp.ClientSession] = None
        self.membership: Optional[Membership] = None
        self.proxy: Optional[Proxy] = None
        self.metrics = RouterMetrics(lambda: self.membership.replicas.values() if self.membership else ())

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.tokenizer.load()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.membership = Membership(self.session, self.config.health, self.notifier)
        self.proxy = Proxy(self.session, self.membership, self.metrics, self.config.proxy)
        for url in self.config.replicas:
            self.add_replica(url)

    async def close(self) -> None:
        for url in list(self.feeds):
            await self.feeds.pop(url).close()
        if self.membership is not None:
            await self.membership.close()
        if self.session is not None:
            await self.session.close()
        self.tokenizer.close()

    async def __aenter__(self) -> "Router":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- replicas -------------------------------------------------------------------------------

    def add_replica(self, url: str) -> Replica:
        replica = self.membership.add(url)
        if replica.url not in self.indexes:
            index = self.indexes[replica.url] = ExactReplicaIndex()
            self.feeds[replica.url] = KVFeed(
                self.session, replica.url, index, self.notifier, heartbeat_s=self.config.feed_heartbeat_s,
                retry_s=self.config.feed_retry_s, on_no_events=lambda: self._use_approximate(replica.url))
        return replica

    async def remove_replica(self, url: str) -> bool:
        url = url.rstrip("/")
        feed = self.feeds.pop(url, None)
        if feed is not None:
            await feed.close()
        self.indexes.pop(url, None)
        return await self.membership.remove(url)

    def _use_approximate(self, url: str) -> None:
        if url in self.indexes and self.indexes[url].is_exact:
            self.indexes[url] = ApproximateReplicaIndex(self.config.approximate_page_size,
                                                        self.config.approximate_ttl_s)

    async def wait_for(self, predicate, timeout: float = 30.0) -> None:
        """Until predicate() holds (membership or index changed); tests and tools wait on this."""
        await self.notifier.wait_for(predicate, timeout)

    # ---- routing --------------------------------------------------------------------------------

    def _page_sizes(self) -> list[int]:
        return sorted({i.page_size for i in self.indexes.values() if i.page_size})

    def _num_cached(self, replica: Replica, prompt: PromptPages) -> int:
        index = self.indexes.get(replica.url)
        return index.match(prompt) if index is not None else 0

    async def route(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        raw = await request.read()  # cached by aiohttp: the bytes read_json parsed, passed on unchanged
        if not isinstance(body, dict):
            raise errors.invalid(None, "the request body must be a JSON object", "invalid_body")
        if not self.membership.routable():
            raise no_ready_replica()
        prompt = await self.tokenizer.prompt_pages(request.path, body, self._page_sizes())
        started = time.perf_counter()
        candidates = self.policy.rank(self.membership.routable(), prompt, self._num_cached)
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        if not candidates:
            raise no_ready_replica()
        if prompt is not None:  # an approximate index learns from the decision (an exact one ignores it)
            self.indexes[candidates[0].replica.url].record_sent(prompt)
        return await self.proxy.forward(request, raw, prompt.num_tokens if prompt else 0, candidates)

    def status(self) -> dict:
        replicas = []
        for replica in self.membership.replicas.values():
            index = self.indexes.get(replica.url)
            info = replica.describe()
            if index is None:
                info["index"] = None
            elif index.is_exact:
                info["index"] = {"kind": "exact", "last_event_id": index.last_event_id,
                                 "num_pages": len(index.hashes), "page_size": index.page_size}
            else:
                info["index"] = {"kind": "approximate", "num_pages": len(index.expiry)}
            replicas.append(info)
        return {"policy": self.policy.name, "ready": bool(self.membership.routable()), "replicas": replicas}


def no_ready_replica() -> APIError:
    return APIError(503, "no replica is ready to take the request", type="service_unavailable",
                    code="no_ready_replica", headers={"Retry-After": "1"})


# ---- HTTP -----------------------------------------------------------------------------------------

def _json(data, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


_errors = make_error_middleware(
    lambda request, code: request.app[ROUTER_KEY].metrics.errors.labels(code).inc(),
    lambda request: MAX_BODY_BYTES)


async def _route(request: web.Request) -> web.StreamResponse:
    return await request.app[ROUTER_KEY].route(request)


async def _models(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    timeout = aiohttp.ClientTimeout(total=router.config.health.timeout_s)
    for replica in router.membership.routable():
        try:
            async with router.session.get(replica.url + request.path, timeout=timeout) as r:
                return web.Response(status=r.status, body=await r.read(), content_type="application/json")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            continue
    raise no_ready_replica()


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    ready = [r.url for r in router.membership.routable()]
    return _json({"ready": bool(ready), "ready_replicas": ready}, status=200 if ready else 503)


async def _status(request: web.Request) -> web.Response:
    return _json(request.app[ROUTER_KEY].status())


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[ROUTER_KEY].metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _admin_body_url(request: web.Request) -> str:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise errors.invalid("url", "required: the replica's base URL, http://HOST:PORT", "invalid_value")
    return url


async def _admin_add(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    replica = router.add_replica(await _admin_body_url(request))
    return _json(replica.describe())


async def _admin_remove(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    url = await _admin_body_url(request)
    if not await router.remove_replica(url):
        raise APIError(404, f"url: no replica {url}", param="url", code="not_found")
    return _json({"removed": url})


async def _admin_drain(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    url = await _admin_body_url(request)
    if not router.membership.drain(url):
        raise APIError(404, f"url: no replica {url}", param="url", code="not_found")
    return _json(router.membership.replicas[url.rstrip("/")].describe())


PROXIED = ("/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/tokenize", "/v1/detokenize")
ROUTES = [("GET", "/v1/models", _models), ("GET", "/v1/models/{model}", _models), ("GET", "/health", _health),
          ("GET", "/ready", _ready), ("GET", "/status", _status), ("GET", "/metrics", _metrics)]
ADMIN_ROUTES = [("POST", "/admin/replicas", _admin_add), ("POST", "/admin/replicas/remove", _admin_remove),
                ("POST", "/admin/replicas/drain", _admin_drain)]


def create_router_app(router: Router) -> web.Application:
    """The app for a started router; admin routes only with config.enable_admin."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[ROUTER_KEY] = router
    routes = [("POST", path, _route) for path in PROXIED] + ROUTES
    for method, path, handler in routes + (ADMIN_ROUTES if router.config.enable_admin else []):
        app.router.add_route(method, path, handler)
    return app


async def serve_router(config: RouterConfig, host: str, port: int,
                       stop: Optional[asyncio.Event] = None) -> None:
    """Serve until SIGINT/SIGTERM (or `stop`), then close."""
    from kvloom.api.server import start_server

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Router(config) as router:
        runner, url = await start_server(create_router_app(router), host, port)
        print(f"kvloom router: listening on {url} ({config.policy}, {len(config.replicas)} replicas)",
              flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
