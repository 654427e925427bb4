"""The gateway's routing tables, cached in each web process so that a request makes no database query.

Caches: API token hash → owner (and, apart, hashes known to be invalid), both LRUs of
GATEWAY_TOKEN_CACHE_SIZE entries so that random bearer values cannot grow a process; and (owner, model
name) → deployment with its ready instances. All are dropped when the *routing generation* changes: a Redis
counter that writers bump (`llmhub.routing_generation.routing_changed`) after instances become ready or stop, deployments
change status or scale, or any user or token changes (`gateway.signals`). A process looks at the counter at
most every `CHECK_INTERVAL` seconds, so a change reaches every gateway process within that time; entries
also expire after `TTL` (settings.GATEWAY_ROUTE_TTL), except while PostgreSQL is down: then the last known
entry is served (`from_database`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import OperationalError, close_old_connections

from llmhub.accounts.selectors import aapi_token_owner
from llmhub.accounts.services import aapi_token_authenticate, token_hash
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Instance
from llmhub.routing_generation import GENERATION_KEY

from . import degraded
from .clients import redis_async

CHECK_INTERVAL = 0.25  # seconds between two looks at the generation counter
TTL = settings.GATEWAY_ROUTE_TTL  # seconds an entry lives at most (LLMHUB_ROUTE_TTL, 30 by default)


@dataclass(frozen=True)
class Caller:
    """Who a valid API token belongs to."""

    user_id: int
    username: str
    token_key: str  # the token's hash
    rate_limit_per_minute: int | None = None  # the user's own limits (None: the installation's setting)
    max_held_requests: int | None = None


def caller_of(user, key: str) -> Caller:
    """The Caller for `user` (an accounts User) authenticated by the token whose hash is `key`."""
    return Caller(user.id, user.username, key, user.rate_limit_per_minute, user.max_held_requests)


@dataclass
class Route:
    """A deployment as the gateway needs it: where its ready instances listen."""

    deployment_id: int
    user_id: int
    full_name: str
    status: str
    fail_reason: str
    desired_instances: int
    request_logging: bool = False  # keep each request's prompt and answer (`request_log`)
    # (instance id, base URL, engine key): the gateway authenticates to the engine with the instance's own
    # key (``Authorization: Bearer``), never with the caller's token.
    instances: list[tuple[int, str, str]] = field(default_factory=list, repr=False)
    routing: str = "prefix"  # Deployment.routing: "prefix" or "least_outstanding"
    response_cache_seconds: int | None = None  # Deployment.response_cache_seconds (None: no response cache)
    serving_version: str = ""  # digest of what an answer depends on (model, adapters, engine options)
    max_batch_size: int = 0  # Deployment.max_batch_size: requests an engine runs at once
    task: str = "generate"  # Deployment.task: "generate" (chat, completions) or "embed" (embeddings)
    adapter: str = ""  # the LoRA adapter asked for (``username/model:adapter``), "" for the base model


class RoutingCache:
    """Per-process cache; `clear()` is called when the routing generation changes."""

    def __init__(self):
        self.callers: OrderedDict[str, tuple[float, Caller]] = OrderedDict()  # valid tokens, LRU
        self.unknown: OrderedDict[str, float] = OrderedDict()  # hashes known to be invalid, LRU
        self.routes: dict[tuple[int, str], tuple[float, Route | None]] = {}
        self.generation: bytes | None = None
        self.checked_at = 0.0
        self._lock = asyncio.Lock()

    def clear(self):
        self.callers.clear()
        self.unknown.clear()
        self.routes.clear()

    async def refresh(self, *, force: bool = False) -> None:
        """Drop everything when the routing generation moved (looked up at most every CHECK_INTERVAL s,
        or now when `force`)."""
        now = time.monotonic()
        if not force and now - self.checked_at < CHECK_INTERVAL:
            return
        self.checked_at = now
        if degraded.redis.resting():
            return
        try:
            generation = await redis_async().get(GENERATION_KEY)
        except degraded.REDIS_ERRORS as exc:  # serve from the cache as it is until Redis is back
            degraded.redis.failed(exc)
            return
        if generation != self.generation:
            self.generation = generation
            self.clear()

    async def caller(self, secret: str | None) -> Caller | None:
        """The owner of API token `secret`, or None (cached, also when invalid)."""
        if not secret:
            return None
        await self.refresh()
        key = token_hash(secret)
        hit = self._hit(key)
        if hit is not False:
            return hit
        try:
            user = await from_database(aapi_token_authenticate(secret))
        except degraded.DATABASE_ERRORS:
            stale = self._hit(key, stale=True)
            if stale is False:
                raise
            return stale
        caller = caller_of(user, key) if user else None
        self._remember(key, caller)
        return caller

    async def recheck(self, caller: Caller) -> Caller | None:
        """`caller` as it stands now (the token may have been revoked or the user deactivated since it was
        authenticated), or None. Used when a held request is released: looks at the generation now."""
        await self.refresh(force=True)
        hit = self._hit(caller.token_key)
        if hit is not False:
            return hit
        user = await aapi_token_owner(caller.token_key)
        fresh = caller_of(user, caller.token_key) if user else None
        self._remember(caller.token_key, fresh)
        return fresh

    def _hit(self, key: str, *, stale: bool = False) -> Caller | None | bool:
        """The cached Caller, None for a cached invalid hash, False for a miss. An entry past its TTL is a
        miss but stays (LRU-bounded) for `stale`: the last known answer while PostgreSQL is down."""
        now = time.monotonic()
        for table in (self.callers, self.unknown):
            if key in table:
                entry = table[key]
                at, caller = entry if table is self.callers else (entry, None)
                if stale or now - at < TTL:
                    table.move_to_end(key)
                    return caller
        return False

    def _remember(self, key: str, caller: Caller | None) -> None:
        table = self.callers if caller else self.unknown
        table[key] = (time.monotonic(), caller) if caller else time.monotonic()
        table.move_to_end(key)
        while len(table) > settings.GATEWAY_TOKEN_CACHE_SIZE:
            table.popitem(last=False)

    async def route(self, caller: Caller, model: str) -> Route | None:
        """The caller's live deployment named `model` (``username/model_name``), or None."""
        await self.refresh()
        key = (caller.user_id, model)
        hit = self.routes.get(key)
        if hit and time.monotonic() - hit[0] < TTL:
            return hit[1]
        try:
            route = await from_database(load_route(caller, model))
        except degraded.DATABASE_ERRORS:
            if hit is None:
                raise
            return hit[1]  # the last known route while PostgreSQL is down
        self.routes[key] = (time.monotonic(), route)
        return route

    def forget(self, caller: Caller, model: str) -> None:
        """Drop one route (e.g. after an instance refused a connection)."""
        self.routes.pop((caller.user_id, model), None)


async def load_route(caller: Caller, model: str) -> Route | None:
    """The Route for served model name `model`: ``username/model-name`` (the base model) or
    ``username/model-name:adapter`` (one of the deployment's LoRA adapters, served by the engine under that
    name). None when the name is not the caller's, or the deployment or the adapter does not exist."""
    owner, _, name = model.partition("/")
    name, colon, adapter = name.partition(":")
    if owner != caller.username or not name or (colon and not adapter):
        return None
    deployment = await (
        Deployment.objects.select_related("user")
        .filter(user_id=caller.user_id, model_name=name)
        .exclude(status__in=[Deployment.Status.DELETING, Deployment.Status.DELETED])
        .afirst()
    )
    if deployment is None or (adapter and adapter not in {a.name for a in deployment.adapters}):
        return None
    instances = [
        (i.id, i.base_url, i.engine_key)
        async for i in Instance.objects.select_related("host")
        .filter(deployment=deployment, state=Instance.State.READY)
        .order_by("id")
    ]
    return Route(
        deployment_id=deployment.id,
        user_id=deployment.user_id,
        full_name=deployment.full_name,
        status=deployment.status,
        fail_reason=deployment.fail_reason,
        desired_instances=deployment.desired_instances,
        routing=deployment.routing,
        response_cache_seconds=deployment.response_cache_seconds,
        serving_version=serving_version(deployment),
        max_batch_size=deployment.max_batch_size,
        request_logging=deployment.request_logging,
        task=deployment.task,
        adapter=adapter,
        instances=instances,
    )


def serving_version(deployment: Deployment) -> str:
    """A short digest of what a deployment's answers depend on: task, model repo and revision, engine options
    and LoRA adapters. It is part of every response cache key, so that changing any of them drops the
    deployment's cached answers (`response_cache`)."""
    fields = [deployment.task, deployment.hf_repo, deployment.hf_revision, deployment.engine_options,
              deployment.lora_adapters]  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


async def from_database(lookup):
    """Await `lookup` (a database query); on an outage record it (`degraded`), replace the broken connection
    and raise the error again. Raises django.db.OperationalError or InterfaceError."""
    if degraded.database.resting():
        lookup.close()
        raise OperationalError("PostgreSQL is unreachable (retried within a second)")
    try:
        result = await lookup
    except degraded.DATABASE_ERRORS as exc:
        degraded.database.failed(exc)
        await sync_to_async(close_old_connections)()
        raise
    degraded.database.ok()
    return result


cache = RoutingCache()


def routing_fingerprint() -> str:
    """A digest of what routing depends on that the reconciler changes: ready instances and
    deployment statuses and targets. Compare before/after a reconcile pass."""
    ready = list(Instance.objects.filter(state=Instance.State.READY).order_by("id").values_list("id", flat=True))
    deployments = list(
        Deployment.objects.exclude(status=Deployment.Status.DELETED)
        .order_by("id")
        .values_list("id", "status", "target_instances")
    )
    return hashlib.sha256(repr((ready, deployments)).encode()).hexdigest()
