"""While PostgreSQL is down, a web process keeps serving the callers and routes it knew, past their TTL; one it
never saw is a database error (the gateway's 503), and once PostgreSQL is back entries are fresh again."""

import asyncio
import time

import pytest
from django.db import OperationalError

from llmhub.gateway import degraded, routing
from tests.factories import DeploymentFactory, token_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_expired_entries_are_served_while_the_database_is_down(monkeypatch):
    deployment = DeploymentFactory(status="running", model_name="m")
    secret = token_for(deployment.user)
    cache = routing.RoutingCache()

    async def warm():
        caller = await cache.caller(secret)
        return caller, await cache.route(caller, deployment.full_name)

    caller, route = asyncio.run(warm())
    assert route.deployment_id == deployment.id

    async def down(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(routing, "aapi_token_authenticate", down)
    monkeypatch.setattr(routing, "load_route", down)
    monkeypatch.setattr(routing, "TTL", 0.0)  # every entry is past its TTL
    monkeypatch.setattr(degraded, "RETRY_INTERVAL", 0.0)
    time.sleep(0.01)

    async def during():
        return await cache.caller(secret), await cache.route(caller, deployment.full_name)

    stale_caller, stale_route = asyncio.run(during())
    assert stale_caller == caller and stale_route == route
    assert degraded.database.down

    other = DeploymentFactory(status="running", model_name="n")
    with pytest.raises(OperationalError):  # never seen by this process: nothing to serve it from
        asyncio.run(cache.caller(token_for(other.user)))
