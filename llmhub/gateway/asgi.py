"""The gateway's hot path as a plain ASGI app, in front of Django's handler.

`POST /v1/openai/chat/completions` and `/v1/openai/completions` skip Django's middleware stack (sessions,
CSRF, auth, messages: none of which a Bearer-token API uses, and each would hop threads under ASGI) and
call `services.answer` directly; everything else goes to Django. Request bodies are bounded here for the
whole site (`bodies`: LLMHUB_MAX_BODY_BYTES, LLMHUB_BODY_READ_TIMEOUT), and API callers are authenticated
from their headers before their body is read. Answers are sent here as ASGI messages; a client
disconnect cancels the stream (closing the upstream).
"""

from __future__ import annotations

import asyncio
import logging

from llmhub import unavailable
from llmhub.accounts.selectors import bearer_secret

from . import bodies, services
from .degraded import DATABASE_ERRORS
from .routing import cache
from .services import GatewayError

log = logging.getLogger(__name__)

ENDPOINTS = {"/v1/openai/chat/completions": "chat/completions", "/v1/openai/completions": "completions",
             "/v1/openai/embeddings": "embeddings"}  # fmt: skip


def wrap(django_app):
    """The site's ASGI application: gateway POSTs served here, everything else by `django_app`, every
    request body bounded (`bodies`); deploy API requests with a body are authenticated before it is read."""
    bounded_django = bodies.bounded(django_app)

    async def application(scope, receive, send):
        if scope["type"] == "http":
            if scope["method"] == "POST" and scope["path"] in ENDPOINTS:
                return await serve(scope, receive, send)
            if scope["path"].startswith("/deploy/") and bodies.has_body(scope):
                try:
                    caller = await cache.caller(bearer_secret(bodies.header(scope, b"authorization")))
                except DATABASE_ERRORS:
                    return await send_unavailable(scope, send)
                if caller is None:
                    return await bodies.send_refusal(send, scope["path"], 401, UNAUTHENTICATED)
        return await bounded_django(scope, receive, send)

    return application


UNAUTHENTICATED = "Missing or invalid API token: send 'Authorization: Bearer <token>'."


async def serve(scope, receive, send) -> None:
    """One gateway POST: the caller authenticated from the headers, then the body read within its bounds."""
    path = scope["path"]
    try:
        caller = await cache.caller(bearer_secret(bodies.header(scope, b"authorization")))
        if caller is None:
            return await bodies.send_refusal(send, path, 401, UNAUTHENTICATED, "invalid_api_key")
        try:
            body = await bodies.read_body(scope, receive)
        except bodies.BodyRefused as exc:
            return await bodies.send_refusal(send, path, exc.status)
        except bodies.ClientGone:
            return
        answer = await services.answer(caller, ENDPOINTS[path], body)
    except GatewayError as exc:
        return await send_response(exc.response(), send)
    except DATABASE_ERRORS:  # not warm in this process (a caller or route never seen) while PostgreSQL is down
        return await send_unavailable(scope, send)
    except Exception:  # noqa: BLE001 - never a stack trace to the client
        log.exception("gateway request failed")
        error = GatewayError(500, "The gateway failed; try again.", type="server_error", code="internal")
        return await send_response(error.response(), send)
    await send_answer(answer, receive, send)


async def send_unavailable(scope, send) -> None:
    """A 503 with Retry-After in the shape of the surface (OpenAI's error, or the deploy API's ``detail``)."""
    await bodies.send_refusal(send, scope["path"], 503, unavailable.MESSAGE, "service_unavailable",
                              retry_after=unavailable.RETRY_AFTER)  # fmt: skip


async def send_response(response, send) -> None:
    """Send a whole Django response (an error) over ASGI."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.content})


async def send_answer(answer: services.Answer, receive, send) -> None:
    """Send the gateway's answer over ASGI; a stream piece by piece until done or the client leaves."""
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers()})
    if answer.events is None:
        try:
            await send({"type": "http.response.body", "body": answer.body})
        finally:
            if answer.finish is not None:
                answer.finish()
        return

    async def stream():
        ended = False
        async for chunk in answer.events:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            elif not ended:  # services.END: the last byte now, the stream's bookkeeping after
                ended = True
                await send({"type": "http.response.body", "body": b""})
        if not ended:
            await send({"type": "http.response.body", "body": b""})

    async def disconnected():
        while (await receive())["type"] != "http.disconnect":
            pass

    streaming, listening = asyncio.ensure_future(stream()), asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({streaming, listening}, return_when=asyncio.FIRST_COMPLETED)
    for task in (streaming, listening):
        if task not in done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    if streaming in done:
        streaming.result()
