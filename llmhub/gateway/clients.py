"""Connection pools of the async gateway, one per event loop: Redis for counters (engines: `upstream`)."""

from __future__ import annotations

import asyncio
from weakref import WeakKeyDictionary

import redis.asyncio
from django.conf import settings

_redis: WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = WeakKeyDictionary()


def redis_async() -> redis.asyncio.Redis:
    """The Redis client for the running loop (REDIS_URL)."""
    loop = asyncio.get_running_loop()
    if loop not in _redis:
        # Bounded, so that an unreachable Redis costs a request at most a second (then `degraded` skips it).
        _redis[loop] = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    return _redis[loop]
