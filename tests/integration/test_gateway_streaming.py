"""The gateway's stream handling through Django's real ASGI application, against an OpenAI-compatible
upstream whose pacing the test controls (vLLM's own pacing on a loaded 2-core machine is too irregular
to measure against): chunks relayed as they come, keepalives before the first token, the usage chunk,
client disconnects, and no database query per request once warm."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from llmhub.gateway import load, usage_buffer
from llmhub.gateway.models import UsageRecord
from tests.factories import DeploymentFactory, InstanceFactory, token_for
from tests.gateway_support import asgi_post, count_queries

pytestmark = pytest.mark.django_db(transaction=True)

CHUNKS, PACE = 6, 0.05


class Upstream(ThreadingHTTPServer):
    """Answers after `head_delay` s and streams CHUNKS deltas PACE seconds apart after `first_delay` s more;
    like vLLM, adds a final usage-only chunk when the request asked for `stream_options.include_usage`.
    Records what it saw."""

    head_delay = 0.0
    first_delay = 0.0
    requests: list
    disconnected: threading.Event


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.server.arrived.append(time.monotonic())
        time.sleep(self.server.head_delay)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(self.server.first_delay)
        try:
            for i in range(CHUNKS):
                chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}], "usage": None}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(PACE)
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 7, "completion_tokens": CHUNKS, "total_tokens": 7 + CHUNKS}
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.server.disconnected.set()

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = Upstream(("127.0.0.1", 0), Handler)
    server.requests, server.arrived, server.disconnected = [], [], threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.fixture
def target(upstream):
    """A running deployment with one ready instance listening at the upstream; returns (model, headers)."""
    deployment = DeploymentFactory(status="running")
    InstanceFactory(deployment=deployment, ready=True, port=upstream.server_address[1])
    return deployment, {"authorization": f"Bearer {token_for(deployment.user)}"}


def chat(model, **extra):
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_chunks_leave_the_gateway_as_they_arrive(target):
    deployment, headers = target

    sent = asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))

    data = [(t, body) for t, body in sent if body.startswith(b"data: {")]
    assert len(data) == CHUNKS
    # Relayed one by one: the first chunk left long before the upstream finished, each about PACE apart.
    assert data[-1][0] - data[0][0] >= (CHUNKS - 1) * PACE * 0.8
    assert b"data: [DONE]" in b"".join(body for _, body in sent)


def test_a_client_that_stops_reading_gets_every_chunk_in_order_afterwards(target):
    # Chunks go out from the engine connection's read callback; a client that stops reading (the server's send
    # suspends) has the rest queued behind it, in order, and the engine is read again once it catches up.
    deployment, headers = target
    stall = 0.3

    sent = asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name), stall=(2, stall)))

    data = [(t, body) for t, body in sent if body.startswith(b"data: {")]
    events = [e for _, body in data for e in body.split(b"\n\n") if e.startswith(b"data: {")]  # (read together once paused)
    assert [json.loads(event[6:])["choices"][0]["delta"]["content"] for event in events] == \
        [f"t{i} " for i in range(CHUNKS)]  # fmt: skip
    assert data[1][0] - data[0][0] >= stall * 0.9  # it did stall at the second chunk
    assert b"".join(body for _, body in sent).endswith(b"data: [DONE]\n\n") and sent[-1][1] == b""
    assert UsageRecord.objects.get().completion_tokens == CHUNKS


def test_the_usage_chunk_is_asked_for_recorded_and_dropped_unless_the_client_asked(target, upstream):
    deployment, headers = target

    plain = asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))
    asked = asyncio.run(
        asgi_post("/v1/openai/chat/completions", headers,
                  chat(deployment.full_name, stream_options={"include_usage": True}))
    )  # fmt: skip

    assert all(r["stream_options"]["include_usage"] is True for r in upstream.requests)  # always asked upstream
    assert b'"choices": []' not in b"".join(body for _, body in plain)
    assert b'"choices": []' in b"".join(body for _, body in asked)
    records = list(UsageRecord.objects.filter(deployment=deployment).order_by("id"))
    assert [(r.prompt_tokens, r.completion_tokens, r.status, r.stream) for r in records] == [(7, CHUNKS, 200, True)] * 2
    assert all(r.ttft_ms is not None and r.latency_ms >= r.ttft_ms for r in records)


def test_the_last_byte_goes_out_before_the_usage_bookkeeping(target, monkeypatch):
    # The client's answer is complete before the gateway records usage and metrics (at concurrency 1 that
    # bookkeeping was a measurable part of the latency it adds); the record is still made, once.
    deployment, headers = target
    trace = []
    keep = usage_buffer.keep
    monkeypatch.setattr(usage_buffer, "keep", lambda usage: (trace.append(("kept", usage.status)), keep(usage)))

    for body in (chat(deployment.full_name), {**chat(deployment.full_name), "stream": False}):
        trace.clear()
        asyncio.run(asgi_post("/v1/openai/chat/completions", headers, body, trace=trace))
        assert [entry for entry in trace if entry[0] != "start"][-2:] == [("sent", False), ("kept", 200)], trace
    assert UsageRecord.objects.filter(deployment=deployment).count() == 2
    assert load.inflight[deployment.id] == 0


def test_the_engine_has_the_request_before_the_client_gets_the_response_head(target, upstream):
    # The head goes out once the engine answered, so that the client's handling of it (at concurrency 1, a
    # context switch the gateway waits through) is not on the engine's critical path.
    deployment, headers = target
    trace = []

    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name), trace=trace))

    assert trace[0][0] == "start" and upstream.arrived[0] <= trace[0][1]


@pytest.mark.parametrize("wait", ["head_delay", "first_delay"])
def test_keepalives_flow_while_the_first_token_is_awaited(target, upstream, settings, wait):
    # Whether the engine is slow to answer at all or slow to its first token.
    settings.GATEWAY_KEEPALIVE_INTERVAL = 0.1
    setattr(upstream, wait, 0.55)
    deployment, headers = target

    sent = asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))

    bodies = [body for _, body in sent if body]
    first_data = next(i for i, body in enumerate(bodies) if body.startswith(b"data:"))
    assert bodies[:first_data].count(b": keepalive\n\n") >= 3
    assert b": keepalive" not in b"".join(bodies[first_data:])  # only until the first token


def test_a_client_that_disconnects_cancels_the_upstream_request(target, upstream):
    deployment, headers = target

    asyncio.run(
        asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name), disconnect_after_chunks=2)
    )

    assert upstream.disconnected.wait(timeout=5), "the engine kept streaming to nobody"
    [record] = UsageRecord.objects.filter(deployment=deployment)
    assert record.status == 499
    assert load.inflight[deployment.id] == 0


def test_a_client_that_leaves_before_the_engine_answered_leaves_no_outstanding_request(target, upstream):
    # The instance's count of outstanding requests (least-outstanding routing) goes back down.
    deployment, headers = target
    upstream.head_delay = 0.5
    [instance] = deployment.instances.all()

    sent = asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name), leave_after=0.2))

    assert not any(body.startswith(b"data:") for _, body in sent)
    assert load.outstanding[instance.id] == 0 and load.inflight[deployment.id] == 0
    assert UsageRecord.objects.get(deployment=deployment).status == 499


def test_a_stream_cancelled_by_the_server_stops_and_is_not_taken_for_a_client_that_left(target, upstream):
    # The server cancelling a request mid-stream (e.g. shutting down) is passed on, not swallowed as the
    # client's disconnect is; the engine's request is closed all the same.
    deployment, headers = target

    async def cancelled_mid_stream():
        trace = []
        request = asyncio.ensure_future(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name),
                                                  flush=False, trace=trace))  # fmt: skip
        while trace.count(("sent", True)) < 2:  # two chunks relayed
            await asyncio.sleep(0.01)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await usage_buffer.flush()
        await sync_to_async(connections.close_all)()  # (asgi_post, cancelled, did not)

    asyncio.run(cancelled_mid_stream())

    assert upstream.disconnected.wait(timeout=5), "the engine kept streaming to nobody"
    assert UsageRecord.objects.get(deployment=deployment).status == 499
    assert load.inflight[deployment.id] == 0


def test_a_warm_gateway_makes_no_database_query_per_request(target, monkeypatch):
    deployment, headers = target
    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))  # warms the caches
    queries = count_queries(monkeypatch)
    monkeypatch.setattr(usage_buffer, "flush", _no_flush)  # batches are written off the hot path

    for _ in range(3):
        asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))

    assert queries == []


async def _no_flush():
    return 0
