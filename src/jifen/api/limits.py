"""Rate limits per client address, per API key and per member.

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

from jifen.errors import RateLimited
from jifen.settings import Settings

_SCOPES_ZH = {"ip": "来自同一地址", "key": "同一 API 密钥", "member": "同一会员"}


class Limiter:
    """The three limits of one API process."""

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
        }

    async def hit(self, scope: str, identity: str) -> None:
        """Count one request of ``identity``; raise RateLimited when over its limit."""
        item = self.items[scope]
        if await self.strategy.hit(item, self.namespace, scope, identity):
            return
        reset_time, _ = await self.strategy.get_window_stats(item, self.namespace, scope, identity)
        retry_after = max(1, math.ceil(reset_time - time.time()))
        raise RateLimited(scope=f"per {scope}", scope_zh=_SCOPES_ZH[scope], retry_after=retry_after)

    async def close(self) -> None:
        """Close the connections to Redis (at the server's shutdown)."""
        if self.pool is not None:
            await self.pool.disconnect()

    async def check_storage(self) -> bool:
        """Whether the counting store answers (for /readyz)."""
        return bool(await self.storage.check())
