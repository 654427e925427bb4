"""The response cache through the real gateway (ASGI application, PostgreSQL, Redis) in front of a counting
stand-in engine: a deterministic non-streamed request repeated is answered from Redis without an engine
request, per deployment and owner, and dropped when what the answers depend on changes."""

import asyncio
import json

import httpx
import pytest
import redis.asyncio
from asgiref.sync import sync_to_async
from django.db import connections

from llmhub.fleet.models import Instance
from llmhub.gateway import response_cache, routing, usage_buffer
from llmhub.gateway.models import UsageRecord
from tests.factories import DeploymentFactory, HostFactory, token_for
from tests.fakes.openai_engine import CountingEngine

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(autouse=True)
def empty_response_cache():
    """No entry from an earlier run (ids restart with each test database)."""
    import redis as redis_sync
    from django.conf import settings

    client = redis_sync.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(match=f"{response_cache.KEY_PREFIX}*"):
        client.delete(key)


@pytest.fixture
def engine():
    engine = CountingEngine()
    yield engine
    engine.stop()


def deployment_on(engine, *, cache_seconds=60, model_name="m", **fields):
    deployment = DeploymentFactory(status="running", model_name=model_name, response_cache_seconds=cache_seconds,
                                   **fields)  # fmt: skip
    Instance.objects.create(deployment=deployment, host=HostFactory(), state="ready", port=engine.port)
    return deployment


def send(token, *requests):
    """POST each (endpoint, body) in turn through the gateway; returns [(status, headers, body bytes)]."""
    from llmhub.asgi import application

    async def go():
        transport = httpx.ASGITransport(app=application)
        headers = {"Authorization": f"Bearer {token}"}
        out = []
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                for endpoint, body in requests:
                    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                    r = await client.post(f"/v1/openai/{endpoint}", content=raw, headers=headers)
                    out.append((r.status_code, r.headers, r.content))
            await usage_buffer.flush()
        finally:
            await sync_to_async(connections.close_all)()
        return out

    return asyncio.run(go())


def routing_change_seen():
    """As if `routing.CHECK_INTERVAL` had passed: the next request looks at the routing generation."""
    routing.cache.checked_at = 0.0


def chat(deployment, **body):
    return "chat/completions", {"model": deployment.full_name, "messages": MESSAGES, **body}


def test_a_repeated_deterministic_request_is_answered_from_the_cache_without_an_engine_request(engine):
    deployment = deployment_on(engine)
    token = token_for(deployment.user)
    first, second = send(token, chat(deployment, temperature=0), chat(deployment, temperature=0))
    assert engine.hits == 1
    assert first[0] == second[0] == 200
    assert first[1]["x-llmhub-cache"] == "miss" and second[1]["x-llmhub-cache"] == "hit"
    assert json.loads(second[2]) == json.loads(first[2])  # the same answer, "answer 1"
    assert second[1]["content-type"] == "application/json"

    records = list(UsageRecord.objects.order_by("id").values_list("cache", "status", "completion_tokens"))
    assert records == [("miss", 200, 2), ("hit", 200, 2)]  # a hit has its own status in usage


def test_the_body_is_normalised_and_a_fixed_seed_is_deterministic_too(engine):
    deployment = deployment_on(engine)
    token = token_for(deployment.user)
    endpoint, body = chat(deployment, seed=7, temperature=0.9, max_tokens=5)
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2).encode()  # other key order, whitespace
    results = send(token, (endpoint, body), (endpoint, reordered), (endpoint, {**body, "stream": False}))
    assert [r[1]["x-llmhub-cache"] for r in results] == ["miss", "hit", "hit"]
    assert engine.hits == 1
    send(token, chat(deployment, seed=8, temperature=0.9, max_tokens=5))  # another seed: another answer
    assert engine.hits == 2


def test_random_sampling_streams_errors_and_deployments_without_a_cache_always_reach_the_engine(engine):
    deployment = deployment_on(engine)
    token = token_for(deployment.user)
    random_twice = [
        chat(deployment),
        chat(deployment),
        chat(deployment, temperature=0.7),
        chat(deployment, temperature=0.7),
    ]
    streams = [chat(deployment, temperature=0, stream=True)] * 2
    errors = [chat(deployment, temperature=0, fail=True)] * 2
    results = send(token, *random_twice, *streams, *errors)
    assert engine.hits == 8
    assert [r[0] for r in results] == [200] * 6 + [400] * 2
    assert all(r[1].get("x-llmhub-cache") != "hit" for r in results)

    plain = CountingEngine()
    uncached = deployment_on(plain, cache_seconds=None, model_name="plain", user=deployment.user)
    results = send(token, chat(uncached, temperature=0), chat(uncached, temperature=0))
    plain.stop()
    assert "x-llmhub-cache" not in results[1][1]
    assert plain.hits == 2


def test_entries_are_never_shared_across_users_or_deployments(engine):
    alice = deployment_on(engine)
    bob = deployment_on(engine, model_name="m")  # another user's deployment of the same name
    other_of_alice = deployment_on(engine, model_name="other", user=alice.user)
    alice_token, bob_token = token_for(alice.user), token_for(bob.user)
    send(alice_token, chat(alice, temperature=0))
    assert send(bob_token, chat(bob, temperature=0))[0][1]["x-llmhub-cache"] == "miss"
    assert send(alice_token, chat(other_of_alice, temperature=0))[0][1]["x-llmhub-cache"] == "miss"
    # Bob sends exactly Alice's body: her deployment is not his (404), her entry not reachable
    assert send(bob_token, chat(alice, temperature=0))[0][0] == 404
    assert engine.hits == 3
    assert send(alice_token, chat(alice, temperature=0))[0][1]["x-llmhub-cache"] == "hit"


def test_changing_the_adapters_or_engine_options_drops_the_cached_answers(engine):
    deployment = deployment_on(engine)
    token = token_for(deployment.user)
    send(token, chat(deployment, temperature=0))
    assert send(token, chat(deployment, temperature=0))[0][1]["x-llmhub-cache"] == "hit"

    deployment.lora_adapters = [{"name": "sql", "repo": "llmhub/tiny-random-llama-lora"}]
    deployment.save()
    routing_change_seen()
    assert send(token, chat(deployment, temperature=0))[0][1]["x-llmhub-cache"] == "miss"
    assert send(token, chat(deployment, temperature=0))[0][1]["x-llmhub-cache"] == "hit"

    deployment.engine_options = {"max_model_len": 1024}
    deployment.save(update_fields=["engine_options"])
    routing_change_seen()
    assert send(token, chat(deployment, temperature=0))[0][1]["x-llmhub-cache"] == "miss"
    assert engine.hits == 3


def test_a_redis_error_is_a_miss_never_a_500(engine, monkeypatch):
    deployment = deployment_on(engine)
    token = token_for(deployment.user)
    broken = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens
    monkeypatch.setattr(response_cache, "redis_client", lambda: broken)
    results = send(token, chat(deployment, temperature=0), chat(deployment, temperature=0))
    assert [r[0] for r in results] == [200, 200]
    assert engine.hits == 2
    assert all(r[1].get("x-llmhub-cache") != "hit" for r in results)
