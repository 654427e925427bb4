"""Helpers for tests of the OpenAI-compatible gateway: through Django's test client, or straight through the
site's ASGI application (`asgi_post`)."""

import asyncio
import json
import time

from asgiref.sync import sync_to_async
from django.db import connections


def chat(client, headers, **body):
    """POST a one-message chat completion with `body` merged in; returns the test client's response."""
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    return client.post("/v1/openai/chat/completions", json.dumps(payload), content_type="application/json", **headers)


def assert_openai_error(response, status, code):
    """`response` is an OpenAI-shaped error (``{"error": {"message", "type", "code"}}``) with `status` and `code`."""
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


async def asgi_post(path, headers, body, *, flush=True, disconnect_after_chunks=None, trace=None, stall=None,
                    leave_after=None):  # fmt: skip
    """POST `body` (JSON) through the site's ASGI application (`llmhub.asgi`); return [(seconds since start,
    body bytes)] as sent. With `flush`, the gateway's buffered usage records and request logs are written
    after. With `disconnect_after_chunks`, the client goes away after that many data events. `trace` (a list)
    gets ("start", monotonic time) for the response head and ("sent", more_body) for each body message. With
    `stall` = (n, seconds), the client stops reading for that long at its n-th data event (the server's send
    of it suspends, as uvicorn's does for a full socket). With `leave_after` (seconds), the client goes away
    then, whatever it got."""
    from llmhub.asgi import application
    from llmhub.gateway import request_log, usage_buffer

    raw = json.dumps(body).encode()
    all_headers = {**headers, "content-type": "application/json", "content-length": str(len(raw))}
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    gone = asyncio.Event()
    sent, start = [], time.monotonic()
    if leave_after is not None:
        asyncio.get_running_loop().call_later(leave_after, gone.set)

    async def receive():
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start" and trace is not None:
            trace.append(("start", time.monotonic()))
        if message["type"] == "http.response.body":
            if stall and message.get("body", b"").startswith(b"data: {"):
                if sum(piece.startswith(b"data: {") for _, piece in sent) + 1 == stall[0]:
                    await asyncio.sleep(stall[1])
            if trace is not None:
                trace.append(("sent", bool(message.get("more_body"))))
            sent.append((time.monotonic() - start, message.get("body", b"")))
            data_events = sum(piece.startswith(b"data: {") for _, piece in sent)
            if not message.get("more_body") or (disconnect_after_chunks and data_events >= disconnect_after_chunks):
                gone.set()

    await application(scope, receive, send)
    if flush:
        await usage_buffer.flush()
        await request_log.flush()
    await sync_to_async(connections.close_all)()  # the ORM's worker thread lets go of the test database
    return sent


def openai_over_asgi(token: str, work, *, flush: bool = False):
    """Run ``await work(client)`` with the official `openai` client (AsyncOpenAI) talking to the site's ASGI
    application in this process with API token `token`; return its result. With `flush`, the gateway's
    buffered usage records are written before returning."""
    import httpx
    import openai

    from llmhub.asgi import application
    from llmhub.gateway import usage_buffer

    async def go():
        transport = httpx.ASGITransport(app=application)
        client = openai.AsyncOpenAI(
            base_url="http://testserver/v1/openai", api_key=token, max_retries=0,
            http_client=httpx.AsyncClient(transport=transport, base_url="http://testserver"),
        )  # fmt: skip
        try:
            result = await work(client)
            if flush:
                await usage_buffer.flush()
            return result
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(go())


def count_queries(monkeypatch) -> list[str]:
    """From now on, every SQL statement the ORM runs in this process is appended to the returned list."""
    from django.db.backends import utils as db_utils

    queries: list[str] = []
    real_execute = db_utils.CursorWrapper.execute

    def counting_execute(self, sql, params=None):
        queries.append(sql)
        return real_execute(self, sql, params)

    monkeypatch.setattr(db_utils.CursorWrapper, "execute", counting_execute)
    return queries
