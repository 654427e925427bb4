"""The gateway relays a stream as it is made, not buffered: measured against an upstream that paces its
chunks 50 ms apart (vLLM's own pacing on a loaded 2-core machine is too irregular to measure against),
through Django's real ASGI application."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmhub.fleet.models import Instance
from tests.factories import DeploymentFactory, HostFactory, token_for

pytestmark = pytest.mark.django_db(transaction=True)

CHUNKS, PACE = 6, 0.05


class PacedSSE(BaseHTTPRequestHandler):
    """An OpenAI-compatible stream: CHUNKS deltas, PACE seconds apart, then [DONE]."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(CHUNKS):
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(PACE)
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def paced_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), PacedSSE)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


async def asgi_post(path: str, headers: dict, body: dict) -> list[tuple[float, bytes]]:
    """POST through Django's ASGI application; return (seconds since start, body bytes) per message sent."""
    from llmhub.asgi import application

    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in {**headers, "content-type": "application/json",
                                                                   "content-length": str(len(raw))}.items()],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    disconnect = asyncio.Event()
    sent: list[tuple[float, bytes]] = []
    start = time.monotonic()

    async def receive():
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            sent.append((time.monotonic() - start, message.get("body", b"")))
            if not message.get("more_body"):
                disconnect.set()

    await application(scope, receive, send)
    return sent


def test_stream_chunks_leave_the_gateway_as_they_arrive(paced_upstream):
    instance = Instance.objects.create(
        deployment=DeploymentFactory(status="running"), host=HostFactory(), state=Instance.State.READY,
        port=paced_upstream,
    )  # fmt: skip
    deployment = instance.deployment
    headers = {"authorization": f"Bearer {token_for(deployment.user)}"}

    sent = asyncio.run(
        asgi_post("/v1/openai/chat/completions", headers, {"model": deployment.full_name, "stream": True,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    )  # fmt: skip

    data = [(t, body) for t, body in sent if body.startswith(b"data: {")]
    assert len(data) == CHUNKS
    # Relayed one by one: the first chunk left long before the upstream finished, each about PACE apart.
    assert data[-1][0] - data[0][0] >= (CHUNKS - 1) * PACE * 0.8
    assert b"data: [DONE]" in b"".join(body for _, body in sent)
