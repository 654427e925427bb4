"""Bounded request bodies for the whole site, enforced at the ASGI layer before any view reads them.

Every request body is capped at MAX_BODY_BYTES (413) and must arrive within BODY_READ_TIMEOUT seconds
(408): refused from Content-Length before a byte of the body is read, or as soon as a chunked body passes
the cap. Django's ASGI handler reads (and spools) a whole body before any view runs, so for Django's
paths the check wraps its `receive`. Errors take the shape of the surface: OpenAI's on /v1/openai, the
deploy API's (``{"detail": ...}``) on /deploy, plain text elsewhere. Refusals close the connection.
"""

from __future__ import annotations

import asyncio
import json
import time

from django.conf import settings

from .errors import GatewayError


class BodyRefused(Exception):
    """The body is too large (413) or too slow (408); `status` says which."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def declared_length(scope) -> int | None:
    """The Content-Length of the request, or None when absent (e.g. chunked)."""
    value = header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def has_body(scope) -> bool:
    length = declared_length(scope)
    return (length or 0) > 0 or header(scope, b"transfer-encoding") is not None


def check_declared(scope) -> None:
    """Raise BodyRefused(413) when the declared Content-Length is past the cap."""
    length = declared_length(scope)
    if length is not None and length > settings.MAX_BODY_BYTES:
        raise BodyRefused(413)


class BoundedReceive:
    """Wraps an ASGI `receive`: passes body messages through while they stay within the cap and the
    deadline; past either it records the refusal (`refused`: 413 or 408) and tells the app the client left."""

    def __init__(self, receive):
        self.receive = receive
        self.deadline = time.monotonic() + settings.BODY_READ_TIMEOUT
        self.read = 0
        self.complete = False
        self.refused: int | None = None

    async def __call__(self):
        if self.refused:
            return {"type": "http.disconnect"}
        if self.complete:
            return await self.receive()
        try:
            async with asyncio.timeout(max(self.deadline - time.monotonic(), 0)):
                message = await self.receive()
        except TimeoutError:
            self.refused = 408
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            if self.read > settings.MAX_BODY_BYTES:
                self.refused = 413
                return {"type": "http.disconnect"}
            self.complete = not message.get("more_body")
        return message


async def read_body(scope, receive) -> bytearray:
    """The whole request body within the cap and the deadline. Raises BodyRefused or ClientGone."""
    check_declared(scope)
    bounded = BoundedReceive(receive)
    body = bytearray()
    while True:
        message = await bounded()
        if bounded.refused:
            raise BodyRefused(bounded.refused)
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if bounded.complete:
            return body


def _message(status: int) -> str:
    if status == 413:
        return (f"The request body is larger than {_size(settings.MAX_BODY_BYTES)}, the most this service "
                "accepts (LLMHUB_MAX_BODY_BYTES).")  # fmt: skip
    return (f"The request body did not arrive within {settings.BODY_READ_TIMEOUT:g} s "
            "(LLMHUB_BODY_READ_TIMEOUT); send it faster or smaller.")  # fmt: skip


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB" if n % (1024 * 1024) == 0 else f"{n} bytes"


def refusal(path: str, status: int, message: str | None = None, code: str | None = None,
            retry_after: int | None = None) -> tuple[int, dict, bytes]:  # fmt: skip
    """(status, headers, body) of a refusal in the shape of the surface at `path` (Retry-After: `retry_after` s)."""
    message = message or _message(status)
    code = code or {413: "request_too_large", 408: "request_timeout"}.get(status)
    if path.startswith("/v1/"):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        raw = json.dumps(GatewayError(status, message, type=kind, code=code).body()).encode()
        content_type = "application/json"
    elif path.startswith("/deploy/"):
        raw, content_type = json.dumps({"detail": message}).encode(), "application/json"
    else:
        raw, content_type = (message + "\n").encode(), "text/plain; charset=utf-8"
    # The rest of the body is never read: the connection ends with this answer.
    headers = {"content-type": content_type, "content-length": str(len(raw)), "connection": "close"}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return status, headers, raw


async def send_refusal(send, path: str, status: int, message: str | None = None, code: str | None = None,
                       retry_after: int | None = None) -> None:  # fmt: skip
    status, headers, raw = refusal(path, status, message, code, retry_after)
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})  # fmt: skip
    await send({"type": "http.response.body", "body": raw})


def bounded(app):
    """ASGI middleware: `app` (Django) sees bodies only within the cap and the deadline; a refusal is
    answered here (the app saw the client leave and answered nothing)."""

    async def application(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        try:
            check_declared(scope)
        except BodyRefused as exc:
            return await send_refusal(send, scope["path"], exc.status)
        wrapped = BoundedReceive(receive)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        await app(scope, wrapped, tracking_send)
        if wrapped.refused and not started:
            await send_refusal(send, scope["path"], wrapped.refused)

    return application
