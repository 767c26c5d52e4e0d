"""Rate limits per client address, per API key and per member.

Counted by the ``limits`` library with a sliding-window counter: in Redis when
``JIFEN_REDIS_URL`` is set, so that every API process shares one count, and in the
process's memory otherwise. A refused request gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse, storage, strategies

from jifen.errors import RateLimited
from jifen.settings import Settings

_SCOPES_ZH = {"ip": "来自同一地址", "key": "同一 API 密钥", "member": "同一会员"}


class Limiter:
    """The three limits of one API process."""

    def __init__(self, settings: Settings) -> None:
        uri = settings.redis_url or "memory://"
        self.storage = storage.storage_from_string(uri)
        self.strategy = strategies.SlidingWindowCounterRateLimiter(self.storage)
        self.namespace = settings.rate_limit_namespace
        self.items: dict[str, RateLimitItem] = {
            "ip": parse(settings.rate_limit_ip),
            "key": parse(settings.rate_limit_key),
            "member": parse(settings.rate_limit_member),
        }

    def hit(self, scope: str, identity: str) -> None:
        """Count one request of ``identity``; raise RateLimited when over its limit."""
        item = self.items[scope]
        if self.strategy.hit(item, self.namespace, scope, identity):
            return
        reset_time, _ = self.strategy.get_window_stats(item, self.namespace, scope, identity)
        retry_after = max(1, math.ceil(reset_time - time.time()))
        raise RateLimited(scope=f"per {scope}", scope_zh=_SCOPES_ZH[scope], retry_after=retry_after)

    def check_storage(self) -> bool:
        """Whether the counting store answers (for /readyz)."""
        return bool(self.storage.check())
