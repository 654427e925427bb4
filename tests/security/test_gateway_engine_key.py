"""The gateway sends the engine the instance's own key, never the caller's API token (an engine that
received user tokens could replay them, and an engine without a key check would need none)."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from tests.factories import DeploymentFactory, InstanceFactory, token_for

pytestmark = pytest.mark.django_db(transaction=True)


class Recorder(BaseHTTPRequestHandler):
    """An engine that records the Authorization header of every request and answers a chat completion."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(self.headers.get("Authorization"))
        raw = json.dumps({
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def test_the_gateway_authenticates_to_the_engine_with_the_instance_key():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
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
