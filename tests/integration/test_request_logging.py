"""Request logging through Django's real ASGI application against an OpenAI-compatible upstream: off by default
(nothing kept), on per deployment (prompt, assembled answer and usage kept, written off the hot path)."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmhub.fleet.models import Instance
from llmhub.gateway import request_log
from llmhub.gateway.models import RequestLog, UsageRecord
from tests.factories import DeploymentFactory, HostFactory, token_for
from tests.gateway_support import asgi_post, count_queries

pytestmark = pytest.mark.django_db(transaction=True)

DELTAS = ["Hel", "lo, ", "wör", "ld"]


class Handler(BaseHTTPRequestHandler):
    """Like vLLM: chat or completions, whole or streamed (deltas, then a usage-only chunk, then [DONE])."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        usage = {"prompt_tokens": 5, "completion_tokens": len(DELTAS), "total_tokens": 5 + len(DELTAS)}
        if body.get("max_tokens") == -1:  # a client error, as vLLM words it
            return self._send(400, "application/json", json.dumps({"object": "error", "message": "max_tokens < 1"}))
        if not body.get("stream"):
            choice = (
                {"message": {"role": "assistant", "content": "".join(DELTAS)}} if chat else {"text": "".join(DELTAS)}
            )
            return self._send(
                200, "application/json", json.dumps({"choices": [{"index": 0, **choice}], "usage": usage})
            )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for delta in DELTAS:
            choice = {"delta": {"content": delta}} if chat else {"text": delta}
            self.wfile.write(f"data: {json.dumps({'choices': [{'index': 0, **choice}], 'usage': None})}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())

    def _send(self, status, content_type, text):
        raw = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def empty_queue():
    request_log.pending.clear()


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def serving(upstream, **fields):
    """A running deployment with one ready instance at the upstream; returns (deployment, headers)."""
    deployment = DeploymentFactory(status="running", **fields)
    Instance.objects.create(deployment=deployment, host=HostFactory(), state="ready", port=upstream.server_address[1])
    return deployment, {"authorization": f"Bearer {token_for(deployment.user)}"}


def chat(model, **extra):
    return {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Say hello"}], **extra}  # fmt: skip


def test_off_by_default_nothing_is_kept(upstream):
    deployment, headers = serving(upstream)
    assert deployment.request_logging is False

    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))
    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name, stream=True)))

    assert UsageRecord.objects.filter(deployment=deployment).count() == 2
    assert not RequestLog.objects.exists()
    assert request_log.pending == []


def test_a_stream_is_kept_as_its_assembled_text_with_its_usage(upstream):
    deployment, headers = serving(upstream, request_logging=True)

    sent = asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name, stream=True)))
    relayed = b"".join(piece for _, piece in sent)

    assert relayed.count(b"data: {") == len(DELTAS)  # the client's stream is unchanged
    [entry] = RequestLog.objects.filter(deployment=deployment)
    usage = UsageRecord.objects.get(deployment=deployment)
    assert entry.response == "Hello, wörld"
    assert "data:" not in entry.response
    assert entry.prompt == "system: Be brief.\nuser: Say hello"
    assert entry.messages == chat("")["messages"]
    assert (entry.model, entry.endpoint, entry.stream, entry.status) == (
        deployment.full_name,
        "chat/completions",
        True,
        200,
    )
    assert (entry.prompt_tokens, entry.completion_tokens) == (5, len(DELTAS))
    assert (entry.created_at, entry.latency_ms) == (usage.created_at, usage.latency_ms)


def test_whole_answers_and_completions_are_kept(upstream):
    deployment, headers = serving(upstream, request_logging=True)

    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))
    asyncio.run(asgi_post("/v1/openai/completions", headers, {"model": deployment.full_name, "prompt": "Once upon"}))
    asyncio.run(asgi_post("/v1/openai/completions", headers,
                          {"model": deployment.full_name, "prompt": "Once upon", "stream": True}))  # fmt: skip

    entries = list(RequestLog.objects.filter(deployment=deployment).order_by("id"))
    assert [(e.endpoint, e.stream, e.prompt, e.response) for e in entries] == [
        ("chat/completions", False, "system: Be brief.\nuser: Say hello", "Hello, wörld"),
        ("completions", False, "Once upon", "Hello, wörld"),
        ("completions", True, "Once upon", "Hello, wörld"),
    ]
    assert entries[1].messages is None


def test_an_engine_refusal_is_kept_with_its_status_and_message(upstream):
    deployment, headers = serving(upstream, request_logging=True)

    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name, max_tokens=-1)))

    [entry] = RequestLog.objects.filter(deployment=deployment)
    assert entry.status == 400 and "max_tokens < 1" in entry.response


def test_only_the_deployment_that_asked_is_logged(upstream):
    logged, headers = serving(upstream, request_logging=True)
    quiet = DeploymentFactory(user=logged.user, status="running", model_name="quiet")
    Instance.objects.create(deployment=quiet, host=HostFactory(), state="ready", port=upstream.server_address[1])

    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(quiet.full_name)))
    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(logged.full_name)))

    assert list(RequestLog.objects.values_list("deployment_id", flat=True)) == [logged.id]


def test_capture_costs_no_query_on_the_request_path(upstream, monkeypatch):
    deployment, headers = serving(upstream, request_logging=True)
    asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name)))  # warms the caches
    queries = count_queries(monkeypatch)
    started = time.monotonic()
    for stream in (False, True):
        asyncio.run(asgi_post("/v1/openai/chat/completions", headers, chat(deployment.full_name, stream=stream),
                              flush=False))  # fmt: skip
    assert queries == []  # written later, in one INSERT with the others
    assert len(request_log.pending) == 2 and time.monotonic() - started < 5

    assert asyncio.run(request_log.flush()) == 2
    assert RequestLog.objects.filter(deployment=deployment).count() == 3
