"""The response cache: deterministic non-streamed answers kept in Redis, per deployment and owner.

Opt-in per deployment (``Deployment.response_cache_seconds``; None: off). A request is cacheable when it
is not streamed and its sampling is deterministic: ``temperature`` 0, or a fixed integer ``seed``
(OpenAI Chat Completions / Completions API; vLLM samples the same tokens for the same seed). Its key is
``<prefix><deployment id>:<owner id>:<serving version>:<sha256 of endpoint + normalised body>``:

- the normalised body is the parsed JSON written back with sorted keys and no whitespace, without
  ``stream: false`` and ``stream_options`` (which change nothing in a whole answer); the model name, so
  a LoRA adapter's ``username/model:adapter`` name, is part of it;
- the deployment and owner ids keep entries apart between users and deployments;
- the serving version (`routing.serving_version`: model repo and revision, engine options, adapters)
  changes when any of them does, so older answers are no longer found (they expire on their own).

Only engine answers with HTTP 200 of at most `MAX_BYTES` are kept, for ``response_cache_seconds``. A
Redis error is a miss (logged), never an error for the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from django.conf import settings
from redis.exceptions import RedisError

from . import degraded
from .clients import redis_async
from .messages import Answer

KEY_PREFIX = f"{settings.REDIS_KEY_PREFIX}respcache:"
HEADER = "x-llmhub-cache"
MAX_BYTES = 1 << 20  # larger answers are not kept
REDIS_TIMEOUT = 0.5  # seconds a lookup may take before it counts as a miss

redis_client = redis_async  # replaced in tests by a client of a dead Redis


def _deterministic(body: dict) -> bool:
    temperature, seed = body.get("temperature"), body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        return True
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0


def cache_key(*, route, user_id: int, endpoint: str, body: dict, stream: bool) -> str | None:
    """The Redis key of this request's answer (see the module docstring), or None when it is not
    cacheable: the deployment (`route`, a routing.Route) has no response cache, the request streams, or
    its sampling is random."""
    if not route.response_cache_seconds or stream or not _deterministic(body):
        return None
    normal = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    canonical = json.dumps(normal, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(f"{endpoint}\0{canonical}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{KEY_PREFIX}{route.deployment_id}:{user_id}:{route.serving_version}:{digest}"


async def cache_get(key: str) -> bytes | None:
    """The cached answer (JSON bytes) under `key`, or None: none, or Redis failed or took longer than
    REDIS_TIMEOUT seconds (an outage is said once, `degraded`; not tried again within a second of one)."""
    if degraded.redis.resting():
        return None
    try:
        async with asyncio.timeout(REDIS_TIMEOUT):
            return await redis_client().get(key)
    except (RedisError, OSError, TimeoutError) as exc:
        degraded.redis.failed(exc)
        return None


async def cache_keep(key: str, answer: Answer, seconds: int) -> Answer:
    """Keep the body of `answer` (an engine's whole answer to a cacheable request) under `key` for
    `seconds` when it is a success of at most MAX_BYTES, and return it marked ``x-llmhub-cache: miss``.
    A Redis outage is said once (`degraded`)."""
    answer.extra_headers[HEADER] = "miss"
    if answer.status != 200 or len(answer.body) > MAX_BYTES:
        return answer
    if degraded.redis.resting():
        return answer
    try:
        async with asyncio.timeout(REDIS_TIMEOUT):
            await redis_client().set(key, answer.body, ex=seconds)
    except (RedisError, OSError, TimeoutError) as exc:
        degraded.redis.failed(exc)
    return answer


def cached_response(call, content: bytes) -> Answer:
    """The answer to `call` (a services.Call) from the cache: usage taken from the cached body, the call
    marked as a hit (recorded in usage with ``cache="hit"``; no engine was asked, so no engine time)."""
    call.cache = "hit"
    try:
        call.take_usage(json.loads(content).get("usage"))
    except (ValueError, AttributeError):
        pass
    return Answer(200, "application/json", body=content, extra_headers={HEADER: "hit"})
