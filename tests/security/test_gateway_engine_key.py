"""The gateway sends the engine the instance's own key, never the caller's API token (an engine that
received user tokens could replay them, and an engine without a key check would need none)."""

import asyncio

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from tests.factories import DeploymentFactory, InstanceFactory, token_for
from tests.fakes.http import Handler, chat_completion, serve

pytestmark = pytest.mark.django_db(transaction=True)


class Recorder(Handler):
    """An engine that records the Authorization header of every request and answers a chat completion."""

    def do_POST(self):  # noqa: N802
        body = self.read_json()
        self.server.seen.append(self.headers.get("Authorization"))
        self.reply(200, chat_completion(body["model"], "hi", prompt_tokens=1, completion_tokens=1))


def test_the_gateway_authenticates_to_the_engine_with_the_instance_key():
    server = serve(Recorder, seen=[])
    deployment = DeploymentFactory(status="running", model_name="m")
    instance = InstanceFactory(deployment=deployment, ready=True,
                                       port=server.server_address[1])  # fmt: skip
    token = token_for(deployment.user)

    async def call():
        from llmhub.asgi import application

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://t") as client:
            try:
                return await client.post("/v1/openai/chat/completions", headers={"Authorization": f"Bearer {token}"},
                                         json={"model": deployment.full_name, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
            finally:
                await sync_to_async(connections.close_all)()

    response = asyncio.run(call())
    server.shutdown()

    assert response.status_code == 200, response.text
    assert server.seen == [f"Bearer {instance.engine_key}"]
    assert token not in "".join(server.seen)
