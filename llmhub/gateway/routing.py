"""The gateway's routing tables, cached in each web process so that a request makes no database query.

Two caches: API token hash → owner, and (owner, model name) → deployment with its ready instances.
Both are dropped when the *routing generation* changes: a Redis counter that writers bump
(`generation.routing_changed`) after instances become ready or stop, deployments change status or scale, or
tokens are created or revoked. A process looks at the counter at most every `CHECK_INTERVAL` seconds,
so a change reaches every gateway process within that time; entries also expire after `TTL`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field

from llmhub.accounts.services import aapi_token_authenticate, token_hash
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Instance

from .clients import redis_async
from .generation import GENERATION_KEY

CHECK_INTERVAL = 0.25  # seconds between two looks at the generation counter
TTL = 30.0  # seconds an entry lives at most


@dataclass(frozen=True)
class Caller:
    """Who a valid API token belongs to."""

    user_id: int
    username: str
    token_key: str  # the token's hash: rate limits are per token


@dataclass
class Route:
    """A deployment as the gateway needs it: where its ready instances listen."""

    deployment_id: int
    user_id: int
    full_name: str
    status: str
    fail_reason: str
    desired_instances: int
    # (instance id, base URL, engine key): the gateway authenticates to the engine with the instance's own
    # key (``Authorization: Bearer``), never with the caller's token.
    instances: list[tuple[int, str, str]] = field(default_factory=list, repr=False)


class RoutingCache:
    """Per-process cache; `clear()` is called when the routing generation changes."""

    def __init__(self):
        self.callers: dict[str, tuple[float, Caller | None]] = {}
        self.routes: dict[tuple[int, str], tuple[float, Route | None]] = {}
        self.generation: bytes | None = None
        self.checked_at = 0.0
        self._lock = asyncio.Lock()

    def clear(self):
        self.callers.clear()
        self.routes.clear()

    async def refresh(self) -> None:
        """Drop everything when the routing generation moved (looked up at most every CHECK_INTERVAL s)."""
        now = time.monotonic()
        if now - self.checked_at < CHECK_INTERVAL:
            return
        self.checked_at = now
        generation = await redis_async().get(GENERATION_KEY)
        if generation != self.generation:
            self.generation = generation
            self.clear()

    async def caller(self, secret: str | None) -> Caller | None:
        """The owner of API token `secret`, or None (cached, also when invalid)."""
        if not secret:
            return None
        await self.refresh()
        key = token_hash(secret)
        hit = self.callers.get(key)
        if hit and time.monotonic() - hit[0] < TTL:
            return hit[1]
        user = await aapi_token_authenticate(secret)
        caller = Caller(user.id, user.username, key) if user else None
        self.callers[key] = (time.monotonic(), caller)
        return caller

    async def route(self, caller: Caller, model: str) -> Route | None:
        """The caller's live deployment named `model` (``username/model_name``), or None."""
        await self.refresh()
        key = (caller.user_id, model)
        hit = self.routes.get(key)
        if hit and time.monotonic() - hit[0] < TTL:
            return hit[1]
        route = await load_route(caller, model)
        self.routes[key] = (time.monotonic(), route)
        return route

    def forget(self, caller: Caller, model: str) -> None:
        """Drop one route (e.g. after an instance refused a connection)."""
        self.routes.pop((caller.user_id, model), None)


async def load_route(caller: Caller, model: str) -> Route | None:
    owner, _, name = model.partition("/")
    if owner != caller.username or not name:
        return None
    deployment = await (
        Deployment.objects.select_related("user")
        .filter(user_id=caller.user_id, model_name=name)
        .exclude(status__in=[Deployment.Status.DELETING, Deployment.Status.DELETED])
        .afirst()
    )
    if deployment is None:
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
        instances=instances,
    )


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
