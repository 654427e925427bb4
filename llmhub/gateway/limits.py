"""Limits per user at the gateway, counted in Redis so that they hold across every web process.

- Requests per minute, all the user's API tokens together: a fixed window of 60 s
  (`User.rate_limit_per_minute`, else GATEWAY_RATE_LIMIT_PER_MINUTE; 0: off). Each web process takes its
  user's requests from Redis in blocks of 1/LEASE_FRACTION of the limit (at least 1) and counts them down
  in memory, so a request costs a Redis round trip only once per block: the user is never let past the
  limit, and may be refused at most (web processes - 1) × block requests early (blocks taken, unused).
- Requests held at once while a deployment has no ready instance (`User.max_held_requests`, else
  GATEWAY_MAX_HELD_PER_USER; 0: off): a sorted set per user whose members expire on their own, so a web
  process that dies holding requests frees its slots after the hold timeout.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid

from django.conf import settings

from . import degraded
from .clients import redis_async
from .errors import GatewayError
from .routing import Caller

HELD_RETRY_AFTER = 10  # seconds a client refused for too many held requests is told to wait
LEASE_FRACTION = 1000  # a block of requests taken from Redis at once is the limit / this (at least 1)
_PROCESS = f"{socket.gethostname()}:{os.getpid()}"
_leases: dict[int, tuple[int, int]] = {}  # user id → (window, requests left in this process's block)


async def rate_limit(caller: Caller) -> None:
    """Count one request for the caller's user; raise GatewayError(429) with Retry-After = seconds left in
    the window once past the user's limit."""
    limit = settings.GATEWAY_RATE_LIMIT_PER_MINUTE if caller.rate_limit_per_minute is None \
        else caller.rate_limit_per_minute  # fmt: skip
    if not limit:
        return
    now = time.time()
    window = int(now // 60)
    leased_window, left = _leases.get(caller.user_id, (None, 0))
    if leased_window != window or left <= 0:
        if degraded.redis.resting():
            return  # Redis is down: the limit degrades open (said once in the log and in /metrics)
        try:
            left = await _lease(caller.user_id, window, limit)
        except degraded.REDIS_ERRORS as exc:
            degraded.redis.failed(exc)
            return
    if left > 0:
        _leases[caller.user_id] = (window, left - 1)
        return
    retry = max(1, math.ceil((window + 1) * 60 - now))
    raise GatewayError(429, f"Rate limit of {limit} requests per minute for your account (all its API tokens "
                       f"together) reached; retry in {retry} s.", type="rate_limit_error",
                       code="rate_limit_exceeded", retry_after=retry)  # fmt: skip


async def _lease(user_id: int, window: int, limit: int) -> int:
    """Take a block of the user's requests in `window` from Redis (shared by every web process); returns how
    many of them are within `limit` (0: the limit is reached)."""
    if len(_leases) > 100_000:  # users seen in earlier windows
        for stale in [user for user, (at, _) in _leases.items() if at != window]:
            del _leases[stale]
    block = max(1, limit // LEASE_FRACTION)
    key = f"{settings.REDIS_KEY_PREFIX}ratelimit:user:{user_id}:{window}"
    pipe = redis_async().pipeline(transaction=False)
    pipe.incrby(key, block)
    pipe.expire(key, 61)
    total, _ = await pipe.execute()
    return max(0, min(block, limit - (total - block)))


class HeldSlot:
    """One held request's place in its user's count; `release()` (idempotent) gives it back."""

    def __init__(self, key: str, member: str):
        self.key, self.member, self.released = key, member, False

    async def release(self) -> None:
        if not self.released:
            self.released = True
            try:
                await redis_async().zrem(self.key, self.member)
            except degraded.REDIS_ERRORS as exc:  # the slot expires on its own (its score is its deadline)
                degraded.redis.failed(exc)


async def held_slot_take(caller: Caller) -> HeldSlot | None:
    """Take a held-request slot for the caller's user, or raise GatewayError(429, code
    ``too_many_held_requests``, Retry-After) when the user already holds their limit over all web processes.
    Returns None when holding is not limited for this user."""
    limit = settings.GATEWAY_MAX_HELD_PER_USER if caller.max_held_requests is None else caller.max_held_requests
    if not limit:
        return None
    key = f"{settings.REDIS_KEY_PREFIX}held:{caller.user_id}"
    member = f"{_PROCESS}:{uuid.uuid4().hex}"
    now = time.time()
    expires = now + settings.GATEWAY_HOLD_TIMEOUT + 30
    if degraded.redis.resting():
        return None  # Redis is down: not limited meanwhile (degrades open)
    pipe = redis_async().pipeline()  # MULTI/EXEC: drop expired slots, add ours, count
    pipe.zremrangebyscore(key, "-inf", now)
    pipe.zadd(key, {member: expires})
    pipe.zcard(key)
    pipe.expire(key, math.ceil(settings.GATEWAY_HOLD_TIMEOUT + 60))
    try:
        _, _, count, _ = await pipe.execute()
    except degraded.REDIS_ERRORS as exc:
        degraded.redis.failed(exc)
        return None
    if count > limit:
        await redis_async().zrem(key, member)
        raise GatewayError(429, f"You already have {limit} requests waiting for an instance to start (the most "
                           f"one account may hold); retry in {HELD_RETRY_AFTER} s, once some are answered.",
                           type="rate_limit_error", code="too_many_held_requests",
                           retry_after=HELD_RETRY_AFTER)  # fmt: skip
    return HeldSlot(key, member)
