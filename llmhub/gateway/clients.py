"""Connection pools of the async gateway, one per event loop: httpx to the engines, Redis for counters."""

from __future__ import annotations

import asyncio
from weakref import WeakKeyDictionary

import httpx
import redis.asyncio
from django.conf import settings

_http: WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = WeakKeyDictionary()
_redis: WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = WeakKeyDictionary()


def http_client() -> httpx.AsyncClient:
    """The pooled HTTP client to engines for the running loop (connect 5 s; read GATEWAY_UPSTREAM_TIMEOUT s)."""
    loop = asyncio.get_running_loop()
    if loop not in _http:
        timeout = httpx.Timeout(connect=5.0, read=settings.GATEWAY_UPSTREAM_TIMEOUT, write=30.0, pool=30.0)
        _http[loop] = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=1000))
    return _http[loop]


def redis_async() -> redis.asyncio.Redis:
    """The Redis client for the running loop (REDIS_URL)."""
    loop = asyncio.get_running_loop()
    if loop not in _redis:
        _redis[loop] = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    return _redis[loop]
