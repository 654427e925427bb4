"""Load the gateway carries, shared with the autoscaler, and usage records written off the hot path.

Each web process counts its in-flight requests per deployment (and outstanding requests per
instance, for least-outstanding-requests balancing) in memory. A background task per event loop
publishes both to Redis every `PUBLISH_INTERVAL` seconds, as hashes per process that expire after
`PROCESS_TTL` seconds (so a dead process's counts vanish): per deployment for the autoscaler, per
instance (under the fleet's `scaling.INSTANCE_INFLIGHT_PREFIX`) for the reconciler, which stops the
least loaded instance and drains it first. The same round writes the usage records (`usage_buffer`) and
request logs (`request_log`) of finished requests. An outage of Redis or PostgreSQL is said once
(`degraded`), never per round.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import defaultdict
from weakref import WeakKeyDictionary

import redis
from django.conf import settings

from llmhub.fleet.scaling import INSTANCE_INFLIGHT_PREFIX

from . import degraded, prefix, request_log, usage_buffer
from .clients import redis_async

log = logging.getLogger(__name__)

INFLIGHT_PREFIX = f"{settings.REDIS_KEY_PREFIX}inflight:"
PROCESS_KEY = f"{INFLIGHT_PREFIX}{socket.gethostname()}:{os.getpid()}"
INSTANCES_KEY = f"{INSTANCE_INFLIGHT_PREFIX}{socket.gethostname()}:{os.getpid()}"
PUBLISH_INTERVAL = 1.0  # seconds
PROCESS_TTL = 5  # seconds

inflight: defaultdict[int, int] = defaultdict(int)  # deployment id → requests in this process
outstanding: defaultdict[int, int] = defaultdict(int)  # instance id → requests in this process
_tasks: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = WeakKeyDictionary()


def ensure_background() -> None:
    """Start this event loop's publisher task if it is not running (called by every gateway request)."""
    loop = asyncio.get_running_loop()
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(_background())


async def _background():
    # Ends once cancelled (its loop closing), also when a call in a round swallowed the cancellation.
    while not asyncio.current_task().cancelling():
        await asyncio.sleep(PUBLISH_INTERVAL)
        try:
            await publish_inflight()
            degraded.redis.ok()
        except degraded.REDIS_ERRORS as exc:
            degraded.redis.failed(exc)
        except Exception:  # noqa: BLE001 - never let the publisher die; the next round retries
            log.exception("publishing in-flight counts failed")
        for write in (usage_buffer.flush, request_log.flush):
            try:
                await write()
            except Exception:  # noqa: BLE001 - an outage is handled inside; anything else is logged
                log.exception("gateway background round failed")


async def publish_inflight() -> None:
    """Write this process's non-zero in-flight counts (per deployment, per instance) to its Redis
    hashes (or delete them when idle)."""
    pipe = redis_async().pipeline()
    for key, table in ((PROCESS_KEY, inflight), (INSTANCES_KEY, outstanding)):
        counts = {str(k): n for k, n in table.items() if n > 0}
        pipe.delete(key)
        if counts:
            pipe.hset(key, mapping=counts)
            pipe.expire(key, PROCESS_TTL)
    await pipe.execute()


def inflight_totals() -> dict[int, int]:
    """{deployment id: in-flight requests summed over every live gateway process} (for the autoscaler)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    totals: defaultdict[int, int] = defaultdict(int)
    for key in client.scan_iter(match=f"{INFLIGHT_PREFIX}*"):
        for deployment_id, count in client.hgetall(key).items():
            totals[int(deployment_id)] += int(count)
    return dict(totals)


def instance_pick(route, exclude: set[int], key: int | None) -> tuple[int, str, str] | None:
    """The ready instance of `route` (a routing.Route) for a request, not in `exclude`; None when none is left.

    With ``route.routing == "prefix"``, more than one candidate and a prefix `key` (`prefix.prefix_key`):
    the instance holding that prefix, within the load bound (its floor half the deployment's max batch
    size) and the max batch size itself (`prefix.pick`). Otherwise the instance with the fewest
    outstanding requests in this process (ties by id). Loads are this process's `outstanding`.
    """
    candidates = [i for i in route.instances if i[0] not in exclude]
    if key is not None and len(candidates) > 1 and route.routing == "prefix":
        floor = int(route.max_batch_size * prefix.FLOOR_OF_BATCH)
        chosen = prefix.pick([i[0] for i in candidates], outstanding, key, slots=route.max_batch_size, floor=floor)
        return next(i for i in candidates if i[0] == chosen)
    return min(candidates, key=lambda i: (outstanding[i[0]], i[0]), default=None)
