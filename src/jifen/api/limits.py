"""Rate limits per client address, per API key and per member; the size limit of a body.

Counted by the ``limits`` library with a sliding-window counter: in Redis when
``JIFEN_REDIS_URL`` is set, so that every API process shares one count, and in the
process's memory otherwise. A refused request gets 429 with ``Retry-After``.

The counting is asynchronous (``limits.aio``, Redis through redis-py's asyncio client): it
runs on the server's event loop, so a request spends no worker thread on it.
"""

from __future__ import annotations

import math
import time

import redis.asyncio
from limits import RateLimitItem, parse
from limits.aio import storage, strategies
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jifen.api import problems
from jifen.errors import RateLimited
from jifen.settings import Settings

_SCOPES_ZH = {
    "ip": "来自同一地址", "key": "同一 API 密钥", "member": "同一会员",
    "identity": "同一会员的实名绑定",
}  # fmt: skip
_SCOPES = {"identity": "of real-name binding by one member"}
"""How a scope is named in the answer, where ``per <scope>`` would not say it."""


class Limiter:
    """The limits of one API process: per address, API key and member, and a member's own
    real-name bindings."""

    def __init__(self, settings: Settings) -> None:
        self.pool: redis.asyncio.ConnectionPool | None = None
        self.storage: storage.Storage
        if settings.redis_url:
            # A pool of our own, so that the server can close its connections on shutdown.
            self.pool = redis.asyncio.ConnectionPool.from_url(settings.redis_url)
            self.storage = storage.RedisStorage(
                f"async+{settings.redis_url}",
                implementation="redispy",
                connection_pool=self.pool,  # type: ignore[arg-type]  # passed on to redis-py
            )
        else:
            self.storage = storage.MemoryStorage()
        self.strategy = strategies.SlidingWindowCounterRateLimiter(self.storage)
        self.namespace = settings.rate_limit_namespace
        self.items: dict[str, RateLimitItem] = {
            "ip": parse(settings.rate_limit_ip),
            "key": parse(settings.rate_limit_key),
            "member": parse(settings.rate_limit_member),
            "identity": parse(settings.rate_limit_identity),
        }

    async def hit(self, scope: str, identity: str) -> None:
        """Count one request of ``identity``; raise RateLimited when over its limit."""
        item = self.items[scope]
        if await self.strategy.hit(item, self.namespace, scope, identity):
            return
        reset_time, _ = await self.strategy.get_window_stats(item, self.namespace, scope, identity)
        retry_after = max(1, math.ceil(reset_time - time.time()))
        raise RateLimited(
            scope=_SCOPES.get(scope, f"per {scope}"), scope_zh=_SCOPES_ZH[scope],
            retry_after=retry_after,
        )  # fmt: skip

    async def close(self) -> None:
        """Close the connections to Redis (at the server's shutdown)."""
        if self.pool is not None:
            await self.pool.disconnect()

    async def check_storage(self) -> bool:
        """Whether the counting store answers (for /readyz)."""
        return bool(await self.storage.check())


class BodyLimit:
    """ASGI middleware: refuse a request body larger than ``max_bytes`` with 413, before
    the application reads any of it (a declared Content-Length) or once the streamed
    body passes the limit (chunked): no request can make a process hold more than that.

    Starlette and FastAPI have no such limit of their own and uvicorn none for bodies;
    the few packages that add one are unmaintained, and this is a page of code."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is None and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body at all (most GETs)
            return
        if declared is not None:
            if declared.isdigit() and int(declared) <= self.max_bytes:
                await self.app(scope, receive, send)  # the server holds it to that length
            else:
                await self._refuse(scope, receive, send)
            return
        # No length declared (chunked): read it all, up to the limit, then hand it on.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        zh = problems.language(Request(scope)) == "zh"
        limit = f"{self.max_bytes:,}"
        answer = problems.problem(
            413,
            "payload_too_large",
            f"请求体超过本服务允许的 {limit} 字节:请减少内容(例如把批次拆小)后重试。"
            if zh
            else f"The body is larger than the {limit} bytes this server accepts: send less "
            "(for example a smaller batch).",
        )
        await answer(scope, receive, send)
