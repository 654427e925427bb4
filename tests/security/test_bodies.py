"""Bounded requests, as an attacker sends them to the running web process: bodies past the cap (by
Content-Length and chunked), bodies that trickle in, huge bodies with a bad token, and random tokens by
the thousand."""

import asyncio
import json
import secrets
import time

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from llmhub.gateway import routing
from tests.attacker import MIB, RawHttp, error_json, peak_rss_bytes
from tests.factories import UserFactory, token_for

pytestmark = pytest.mark.django_db(transaction=True)

CAP = 16 * MIB  # LLMHUB_MAX_BODY_BYTES by default
GATEWAY, DEPLOY = "/v1/openai/chat/completions", "/deploy/llm"


def assert_shaped(path, status, body, code):
    """The gateway answers in OpenAI's error shape, the deploy API in its own ({"detail": ...})."""
    data = error_json(body)
    if path == GATEWAY:
        assert data["error"]["code"] == code and data["error"]["message"], data
    else:
        assert isinstance(data["detail"], str) and data["detail"], data


@pytest.fixture
def bearer(db):
    return {"Authorization": f"Bearer {token_for(UserFactory(username='mallory'))}"}


@pytest.mark.parametrize("path", [GATEWAY, DEPLOY])
def test_a_body_declared_past_the_cap_is_413_before_it_is_sent(web, bearer, path):
    conn = RawHttp(web.urls[0])
    conn.head("POST", path, {**bearer, "Content-Type": "application/json", "Content-Length": str(60 * MIB)})
    conn.send(b'{"model": "mallory/x", "messages": [')  # and then nothing more: the server must not wait

    status, headers, body = conn.response(timeout=5)

    assert status == 413
    assert_shaped(path, status, body, "request_too_large")
    assert "16 MiB" in body.decode()
    # A body of ordinary size still reaches the endpoint (400: the model/GPU does not exist).
    conn = RawHttp(web.urls[0])
    raw = json.dumps({"model": "mallory/x", "model_name": "x", "gpu": "NOPE", "messages": []}).encode()
    conn.head("POST", path, {**bearer, "Content-Type": "application/json", "Content-Length": str(len(raw))})
    conn.send(raw)
    assert conn.response()[0] in (400, 404)


@pytest.mark.parametrize("path", [GATEWAY, DEPLOY])
def test_a_chunked_body_is_refused_once_it_passes_the_cap(web, bearer, path):
    conn = RawHttp(web.urls[0], timeout=20)
    conn.head("POST", path, {**bearer, "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    sent = 0
    chunk = b"[" + b" " * (MIB - 1)
    while sent < 64 * MIB and conn.send_chunk(chunk):
        sent += len(chunk)

    status, _, body = conn.response(timeout=10)

    assert status == 413
    assert_shaped(path, status, body, "request_too_large")
    # What was sent past the cap sits in the kernel's socket buffers (a few MiB each way), not in the server.
    assert sent < 40 * MIB, f"the server took {sent / MIB:.0f} MiB before refusing"


@pytest.mark.parametrize("path", [GATEWAY, DEPLOY])
def test_a_trickled_body_is_408_at_the_deadline(web, bearer, path):
    conn = RawHttp(web.urls[0])
    conn.head("POST", path, {**bearer, "Content-Type": "application/json", "Content-Length": "10000"})
    started = time.monotonic()
    while time.monotonic() - started < 8 and conn.send(b" "):  # one byte every 0.2 s: 10000 bytes take 33 min
        time.sleep(0.2)

    status, _, body = conn.response(timeout=1)

    assert status == 408  # LLMHUB_BODY_READ_TIMEOUT is 2 s for these web processes
    assert_shaped(path, status, body, "request_timeout")


@pytest.mark.parametrize("path", [GATEWAY, DEPLOY])
def test_a_bad_token_with_a_huge_body_is_401_before_the_body_is_read(web, path):
    conn = RawHttp(web.urls[0])
    conn.head("POST", path, {"Authorization": "Bearer lh-guessed", "Content-Type": "application/json",
                             "Content-Length": str(CAP - 1)})  # fmt: skip

    status, _, body = conn.response(timeout=5)  # nothing of the body was sent

    assert status == 401
    assert_shaped(path, status, body, "invalid_api_key")


def test_a_60_mb_body_does_not_grow_the_web_process(fresh_web, bearer):
    pid, url = fresh_web.pids[0], fresh_web.urls[0]  # its peak memory so far is its start's
    before = peak_rss_bytes(pid)
    for declared in (True, False):  # once with Content-Length, once chunked
        conn = RawHttp(url, timeout=30)
        length = {"Content-Length": str(60 * MIB)} if declared else {"Transfer-Encoding": "chunked"}
        conn.head("POST", GATEWAY, {**bearer, "Content-Type": "application/json", **length})
        chunk = b" " * MIB
        for _ in range(60):
            if not (conn.send(chunk) if declared else conn.send_chunk(chunk)):
                break
        else:
            conn.send(b"" if declared else b"0\r\n\r\n")
        conn.response(timeout=30)
        conn.close()

    grown = peak_rss_bytes(pid) - before

    assert grown < 40 * MIB, f"the web process's peak memory grew by {grown / MIB:.0f} MiB"


def test_random_tokens_are_cached_in_a_bounded_lru(settings):
    settings.GATEWAY_TOKEN_CACHE_SIZE = 50
    user = UserFactory(username="victim")
    token = token_for(user)

    async def attack():
        from llmhub.asgi import application

        async def post(secret):
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/openai/chat/completions", "raw_path": b"", "query_string": b"",
                     "root_path": "", "client": ("10.9.9.9", 1), "server": ("127.0.0.1", 8000),
                     "headers": [(b"authorization", f"Bearer {secret}".encode()), (b"content-length", b"2")]}  # fmt: skip
            messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
            statuses = []

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await application(scope, receive, send)
            return statuses[0]

        try:
            assert await post(token) == 400  # known and cached (400: the body has no model)
            codes = {await post(f"lh-{secrets.token_urlsafe(32)}") for _ in range(300)}
            assert codes == {401}
            return await post(token)
        finally:
            await sync_to_async(connections.close_all)()

    assert asyncio.run(attack()) == 400
    cached = sum(len(getattr(routing.cache, name, {})) for name in ("callers", "unknown"))
    assert cached <= 50 + 1, f"{cached} bearer values cached after 300 random ones"
