"""Load the gateway carries, shared with the autoscaler, and usage records written off the hot path.

Each web process counts its in-flight requests per deployment (and outstanding requests per
instance, for least-outstanding-requests balancing) in memory. A background task per event loop
publishes both to Redis every `PUBLISH_INTERVAL` seconds, as hashes per process that expire after
`PROCESS_TTL` seconds (so a dead process's counts vanish): per deployment for the autoscaler, per
instance (under the fleet's `scaling.INSTANCE_INFLIGHT_PREFIX`) for the reconciler, which stops the
least loaded instance and drains it first. It also writes buffered usage records to PostgreSQL in
one INSERT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import defaultdict
from weakref import WeakKeyDictionary

import redis
from asgiref.sync import sync_to_async
from django.conf import settings

from llmhub.fleet.scaling import INSTANCE_INFLIGHT_PREFIX

from . import prefix, request_log
from .clients import redis_async
from .models import UsageRecord

log = logging.getLogger(__name__)

INFLIGHT_PREFIX = f"{settings.REDIS_KEY_PREFIX}inflight:"
PROCESS_KEY = f"{INFLIGHT_PREFIX}{socket.gethostname()}:{os.getpid()}"
INSTANCES_KEY = f"{INSTANCE_INFLIGHT_PREFIX}{socket.gethostname()}:{os.getpid()}"
PUBLISH_INTERVAL = 1.0  # seconds
PROCESS_TTL = 5  # seconds

inflight: defaultdict[int, int] = defaultdict(int)  # deployment id → requests in this process
outstanding: defaultdict[int, int] = defaultdict(int)  # instance id → requests in this process
usage_buffer: list[UsageRecord] = []
_tasks: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task] = WeakKeyDictionary()


def ensure_background() -> None:
    """Start this event loop's publisher task if it is not running (called by every gateway request)."""
    loop = asyncio.get_running_loop()
    task = _tasks.get(loop)
    if task is None or task.done():
        _tasks[loop] = loop.create_task(_background())


async def _background():
    while True:
        await asyncio.sleep(PUBLISH_INTERVAL)
        try:
            await publish_inflight()
            await flush_usage()
            await request_log.flush()
        except Exception:  # noqa: BLE001 - never let the publisher die; the next round retries
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


async def flush_usage() -> int:
    """Insert the buffered usage records in one query. Returns how many were written."""
    if not usage_buffer:
        return 0
    batch = usage_buffer[:]
    del usage_buffer[: len(batch)]
    await sync_to_async(UsageRecord.objects.bulk_create)(batch)
    return len(batch)


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
    the instance holding that prefix, within the load bound (`prefix.pick`, its floor half the
    deployment's max batch size). Otherwise the instance with
    the fewest outstanding requests in this process (ties by id). Loads are this process's `outstanding`.
    """
    candidates = [i for i in route.instances if i[0] not in exclude]
    if key is not None and len(candidates) > 1 and route.routing == "prefix":
        floor = int(route.max_batch_size * prefix.FLOOR_OF_BATCH)
        chosen = prefix.pick([i[0] for i in candidates], outstanding, key, floor=floor)
        return next(i for i in candidates if i[0] == chosen)
    return min(candidates, key=lambda i: (outstanding[i[0]], i[0]), default=None)
