"""Limits per user, as one user trying to take more than their share would meet them: held requests
across web processes, rate limits across tokens, the token cap, and one poller per held deployment."""

import asyncio
import json
import time

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.db.backends import utils as db_utils

from llmhub.accounts.services import api_token_create
from tests.factories import DeploymentFactory, UserFactory, token_for

pytestmark = pytest.mark.django_db(transaction=True)


def chat(model, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_the_65th_held_request_of_a_user_is_429_across_web_processes(web):
    user = UserFactory(username="hoarder")
    token = token_for(user)
    deployment = DeploymentFactory(user=user, model_name="cold", status="running", min_instances=0,
                                   target_instances=0, max_instances=1)  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}

    async def pile_up():
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
            held = []
            for i in range(64):  # 32 on each web process; a held stream answers 200 at once, then keepalives
                request = client.build_request("POST", f"{web.urls[i % 2]}/v1/openai/chat/completions",
                                               json=chat(deployment.full_name, stream=True), headers=headers)  # fmt: skip
                held.append(await client.send(request, stream=True))
            assert [r.status_code for r in held] == [200] * 64
            refused = [
                await client.post(f"{url}/v1/openai/chat/completions", json=chat(deployment.full_name, stream=stream),
                                  headers=headers)  # fmt: skip
                for url in web.urls for stream in (False, True)
            ]
            for response in held:
                await response.aclose()
            return refused

    refused = asyncio.run(pile_up())

    for response in refused:
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "too_many_held_requests"
        assert int(response.headers["Retry-After"]) >= 1


def test_a_neighbour_is_held_while_one_user_is_at_the_cap(web):
    greedy, neighbour = UserFactory(username="greedy"), UserFactory(username="neighbour")
    greedy.max_held_requests = 2  # the per-user override in the admin
    greedy.save()
    mine = DeploymentFactory(user=greedy, model_name="cold", status="running", min_instances=0, target_instances=0)
    theirs = DeploymentFactory(user=neighbour, model_name="cold", status="running", min_instances=0,
                               target_instances=0)  # fmt: skip
    greedy_headers = {"Authorization": f"Bearer {token_for(greedy)}"}
    neighbour_headers = {"Authorization": f"Bearer {token_for(neighbour)}"}

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{web.urls[0]}/v1/openai/chat/completions"

            async def stream(headers, model):
                request = client.build_request("POST", url, json=chat(model, stream=True), headers=headers)
                return await client.send(request, stream=True)

            held = [await stream(greedy_headers, mine.full_name) for _ in range(2)]
            third = await stream(greedy_headers, mine.full_name)
            neighbours = await stream(neighbour_headers, theirs.full_name)
            codes = [r.status_code for r in (*held, third, neighbours)]
            for r in (*held, third, neighbours):
                await r.aclose()
            return codes

    assert asyncio.run(scenario()) == [200, 200, 429, 200]


def test_one_poller_per_held_deployment_not_one_per_request(settings, monkeypatch):
    settings.GATEWAY_HOLD_TIMEOUT = 2.0
    user = UserFactory(username="waiter")
    deployment = DeploymentFactory(user=user, model_name="cold", status="deploying")  # no instance ever
    token = token_for(user)
    queries = []

    async def twenty_held():
        from llmhub.asgi import application

        async def post():
            raw = json.dumps(chat(deployment.full_name)).encode()
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/openai/chat/completions", "raw_path": b"", "query_string": b"",
                     "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
                     "headers": [(b"authorization", f"Bearer {token}".encode()),
                                 (b"content-length", str(len(raw)).encode())]}  # fmt: skip
            messages = [{"type": "http.request", "body": raw, "more_body": False}]
            statuses = []

            async def receive():
                if messages:
                    return messages.pop(0)
                await asyncio.sleep(3600)

            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await application(scope, receive, send)
            return statuses[0]

        try:
            return await asyncio.gather(*(post() for _ in range(20)))
        finally:
            await sync_to_async(connections.close_all)()

    real_execute = db_utils.CursorWrapper.execute

    def counting_execute(self, sql, params=None):
        if "fleet_instance" in sql:
            queries.append(sql)
        return real_execute(self, sql, params)

    monkeypatch.setattr(db_utils.CursorWrapper, "execute", counting_execute)
    statuses = asyncio.run(twenty_held())
    monkeypatch.undo()

    assert statuses == [503] * 20
    # Up to 20 first route loads (the requests arrive together), then 2 s held with a look every 0.5 s: one
    # poller makes about 4 more; one per request would make about 80.
    assert len(queries) <= 30, f"{len(queries)} instance queries for 20 requests held 2 s"


def test_the_rate_limit_counts_every_token_of_a_user_together(web):
    user = UserFactory(username="burst")
    user.rate_limit_per_minute = 4  # the per-user field operators set in the admin
    user.save()
    tokens = [token_for(user), token_for(user)]

    def attempt():
        window = int(time.time() // 60)
        codes = [
            httpx.post(f"{web.urls[i % 2]}/v1/openai/chat/completions", json=chat("burst/none"),
                       headers={"Authorization": f"Bearer {tokens[i % 2]}"}).status_code  # fmt: skip
            for i in range(5)
        ]
        return codes, window == int(time.time() // 60)

    codes, same_window = attempt()
    if not same_window:  # a minute boundary fell inside the burst: the fixed window restarted
        codes, same_window = attempt()

    assert codes == [404, 404, 404, 404, 429]


def test_api_tokens_per_user_are_capped(client, settings):
    settings.MAX_API_TOKENS_PER_USER = 3
    user = UserFactory(username="collector")
    for i in range(3):
        api_token_create(user=user, name=f"t{i}")
    client.force_login(user)

    response = client.post("/tokens/", {"name": "one too many"})

    assert response.status_code == 400
    assert "at most 3 API tokens" in response.content.decode()
    assert user.api_tokens.count() == 3
    with pytest.raises(Exception, match="at most 3 API tokens"):
        api_token_create(user=user, name="from the shell")
