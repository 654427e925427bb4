"""Usage records of gateway requests: written to PostgreSQL off the hot path, and kept through an outage.

Every finished request's `Usage` (a plain tuple: building a Django model instance, its UUID and its aware
datetime took about 0.1 ms in a live web process, on the answer's path) is appended to this process's `records`
(`keep`). The background round of `load` calls `flush` every second:

1. the records in memory become `UsageRecord`s, each with its own idempotency key (a UUID, unique in the
   table), and go to PostgreSQL in one ``INSERT … ON CONFLICT DO NOTHING``;
2. when PostgreSQL fails, they are pushed to the Redis list `PENDING_KEY` instead, which every web process
   shares and which outlives a process killed during the outage;
3. once PostgreSQL answers, one process at a time (a Redis lock of `DRAIN_LOCK_SECONDS`) writes that list,
   `BATCH` records at a time, and only then removes them from it. A process killed between the two leaves
   them in the list; the next writer's ``ON CONFLICT DO NOTHING`` skips those already written, so none is
   counted twice.

With Redis down as well, records stay in this process's memory. Bounds: at most `MAX_IN_MEMORY` records per
process and `MAX_PENDING` in Redis (a record is about 300 bytes: 1,000,000 is about 300 MB); past them the
oldest are dropped, logged and counted in ``llmhub_gateway_usage_dropped``. At 1,000 requests/s a 5-minute
outage of PostgreSQL is 300,000 records.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from typing import NamedTuple

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, close_old_connections

from llmhub.deployments.models import Deployment

from . import degraded, metrics
from .clients import redis_async
from .models import UsageRecord

log = logging.getLogger(__name__)

PENDING_KEY = f"{settings.REDIS_KEY_PREFIX}usage:pending"
DRAIN_LOCK_KEY = f"{settings.REDIS_KEY_PREFIX}usage:drain-lock"
DRAIN_LOCK_SECONDS = 30
BATCH = 1000
MAX_IN_MEMORY = 100_000
MAX_PENDING = 1_000_000
FIELDS = ("deployment_id", "user_id", "created_at", "endpoint", "stream", "status", "prompt_tokens",
          "completion_tokens", "latency_ms", "ttft_ms", "cache", "idempotency_key")  # fmt: skip


class Usage(NamedTuple):
    """What a finished request used, as `services.Call.finish` knows it: the `UsageRecord` fields but the
    idempotency key, with `created_at` in Unix seconds (`time.time()`)."""

    deployment_id: int
    user_id: int
    created_at: float
    endpoint: str
    stream: bool
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: int
    ttft_ms: int | None
    cache: str

    def record(self) -> UsageRecord:
        """The row, with a new idempotency key."""
        fields = {**self._asdict(), "created_at": self.created_at_datetime}
        return UsageRecord(**fields, idempotency_key=uuid.uuid4())

    @property
    def created_at_datetime(self) -> datetime:
        return datetime.fromtimestamp(self.created_at, UTC)


records: list[Usage | UsageRecord] = []  # UsageRecords: put back after both PostgreSQL and Redis failed


def keep(record: Usage) -> None:
    """Queue one finished request's usage for `flush` (this process's memory, bounded by MAX_IN_MEMORY)."""
    records.append(record)
    if len(records) > MAX_IN_MEMORY:
        _dropped(len(records) - MAX_IN_MEMORY)
        del records[: len(records) - MAX_IN_MEMORY]
    metrics.usage_pending.set(len(records))


async def flush() -> int:
    """Write this process's records, then (PostgreSQL being up) the ones kept in Redis during an outage.
    Returns how many rows were written to PostgreSQL. Never raises for an outage: what could not be written
    is kept (in Redis, else back in memory) for the next round."""
    written = 0
    if records:
        batch = [r.record() if isinstance(r, Usage) else r for r in records]  # the keys made once, kept on retries
        del records[: len(batch)]
        try:
            written += await sync_to_async(_write)(batch)
            degraded.database.ok()
        except degraded.DATABASE_ERRORS as exc:
            degraded.database.failed(exc)
            await _keep_in_redis(batch)
            return written
        finally:
            metrics.usage_pending.set(len(records))
    if degraded.database.down and degraded.database.resting():
        return written
    try:
        written += await _drain()
    except degraded.DATABASE_ERRORS as exc:
        degraded.database.failed(exc)
    except degraded.REDIS_ERRORS as exc:
        degraded.redis.failed(exc)
    return written


def _write(batch: list[UsageRecord]) -> int:
    """INSERT … ON CONFLICT DO NOTHING; records of a deployment deleted meanwhile are left out."""
    try:
        UsageRecord.objects.bulk_create(batch, ignore_conflicts=True)
    except IntegrityError:  # a deployment (and with it its usage) was deleted since the request
        live = set(Deployment.objects.filter(id__in={r.deployment_id for r in batch}).values_list("id", flat=True))
        batch = [r for r in batch if r.deployment_id in live]
        UsageRecord.objects.bulk_create(batch, ignore_conflicts=True)
    except degraded.DATABASE_ERRORS:
        close_old_connections()  # the broken connection is replaced on the next round
        raise
    return len(batch)


async def _keep_in_redis(batch: list[UsageRecord]) -> None:
    try:
        length = await redis_async().rpush(PENDING_KEY, *[_dump(r) for r in batch])
        if length > MAX_PENDING:
            await redis_async().ltrim(PENDING_KEY, length - MAX_PENDING, -1)
            _dropped(length - MAX_PENDING)
    except degraded.REDIS_ERRORS as exc:
        degraded.redis.failed(exc)
        records[:0] = batch  # both down: back in memory, oldest first
        if len(records) > MAX_IN_MEMORY:
            _dropped(len(records) - MAX_IN_MEMORY)
            del records[: len(records) - MAX_IN_MEMORY]


async def _drain() -> int:
    """Write the records kept in Redis, BATCH at a time, under the drain lock. Returns how many."""
    client = redis_async()
    if not await client.exists(PENDING_KEY):
        return 0
    if not await client.set(DRAIN_LOCK_KEY, "1", nx=True, ex=DRAIN_LOCK_SECONDS):
        return 0  # another process is writing them
    written = 0
    try:
        while raw := await client.lrange(PENDING_KEY, 0, BATCH - 1):
            written += await sync_to_async(_write)([_load(item) for item in raw])
            degraded.database.ok()
            await client.ltrim(PENDING_KEY, len(raw), -1)
    finally:
        await client.delete(DRAIN_LOCK_KEY)
    if written:
        log.info("%d usage records kept during an outage were written", written)
    return written


def _dropped(count: int) -> None:
    metrics.usage_dropped.inc(count)
    log.error("usage buffer full: %d oldest usage records dropped", count)


def _dump(record: UsageRecord) -> str:
    values = {field: getattr(record, field) for field in FIELDS}
    values["created_at"] = record.created_at.isoformat()
    values["idempotency_key"] = str(record.idempotency_key)
    return json.dumps(values)


def _load(raw: bytes) -> UsageRecord:
    values = json.loads(raw)
    values["created_at"] = datetime.fromisoformat(values["created_at"])
    return UsageRecord(**values)
