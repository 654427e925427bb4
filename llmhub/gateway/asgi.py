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
import types

from llmhub import unavailable
from llmhub.accounts.selectors import bearer_secret

from . import bodies, services
from .degraded import DATABASE_ERRORS
from .messages import Outlet
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


class BodyWriter:
    """Sends a stream over ASGI from synchronous code, in order: `write` is the stream's `Outlet.write`,
    called from the engine connection's read callback, so that a relayed piece costs no task switch. The
    response head goes out at `start` (`Outlet.start`: the relay calls it once the engine answered, so
    that the client's handling of the head does not delay the engine's request, or at once for a request
    held for a scale from zero) or before the first body bytes, whichever comes first; nothing is sent after
    the last bytes (`more` False).

    ASGI's `send` is a coroutine. A server's send of a body piece finishes without suspending unless its
    client has stopped reading (uvicorn then waits for the connection to drain), so `write` runs it at once.
    When it does suspend, a task finishes it, later pieces queue behind it, and the engine is not read
    (`Outlet.pause`) until the queue is sent (`Outlet.resume`): a slow client holds the engine back.
    `drain` waits for all that and raises what a send raised."""

    def __init__(self, send, outlet: Outlet, status: int, headers: list[tuple[bytes, bytes]]):
        self._send, self._outlet = send, outlet
        self._head: dict | None = {"type": "http.response.start", "status": status, "headers": headers}
        self._ended = False
        self._queue: list[dict] | None = None  # messages behind a send that suspended; None when none did
        self._task: asyncio.Task | None = None
        outlet.write, outlet.start = self.write, self.start

    def start(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._send_now(head)

    def write(self, data: bytes, more: bool = True) -> None:
        if self._ended:
            return
        self._ended = not more
        if self._head is not None:
            self.start()
        self._send_now({"type": "http.response.body", "body": data, "more_body": more})

    def _send_now(self, message: dict) -> None:
        if self._queue is not None:
            self._queue.append(message)
            return
        sending = self._send(message)
        try:
            awaited = sending.send(None)
        except StopIteration:
            return
        self._queue = []
        self._outlet.pause()
        self._task = asyncio.get_running_loop().create_task(self._finish(sending, awaited))

    async def _finish(self, sending, awaited) -> None:
        try:
            await _resumed(sending, awaited)
            while self._queue:
                await self._send(self._queue.pop(0))
        finally:
            self._queue = None
            self._outlet.resume()

    async def drain(self) -> None:
        if self._task is not None:
            await self._task

    def close(self) -> None:
        """Stop a send still under way (the stream ended early: the client left, or it failed)."""
        if self._task is None:
            return
        if not self._task.done():
            self._task.cancel()
        elif not self._task.cancelled():
            self._task.exception()  # retrieved here; the stream raises it itself


@types.coroutine
def _resumed(coroutine, awaited):
    """Go on with `coroutine`, which suspended on `awaited`, inside the task that awaits this (as `yield from`
    would, had it not already started): the task waits for `awaited`, and its cancellation reaches `coroutine`."""
    while True:
        try:
            value = yield awaited
        except BaseException as exc:  # noqa: BLE001 - passed on to the coroutine, as `yield from` does
            try:
                awaited = coroutine.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                awaited = coroutine.send(value)
            except StopIteration as stop:
                return stop.value


async def send_answer(answer: services.Answer, receive, send) -> None:
    """Send the gateway's answer over ASGI; a stream piece by piece (`BodyWriter`) until done or the client
    leaves."""
    if answer.events is None:
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers()})
        try:
            await send({"type": "http.response.body", "body": answer.body})
        finally:
            if answer.finish is not None:
                answer.finish()
        return
    writer = BodyWriter(send, answer.outlet, answer.status, answer.headers())
    # The stream runs in this task (a task of its own would wait a turn of the event loop before the engine's
    # request is written); the client's disconnect, heard by a listening task started once this task waits for
    # the first time (after the engine's request went out), cancels it.
    this = asyncio.current_task()
    loop = this.get_loop()
    streaming, left, listening = True, False, None

    async def disconnected():
        while (await receive())["type"] != "http.disconnect":
            pass

    def client_left(heard: asyncio.Task) -> None:
        nonlocal left
        if streaming and not heard.cancelled():
            left = True
            this.cancel()

    def listen() -> None:
        nonlocal listening
        listening = loop.create_task(disconnected())
        listening.add_done_callback(client_left)

    starting = loop.call_soon(listen)
    try:
        async for chunk in answer.events:
            # services.END (b""): the last byte now (unless the relay wrote it), the stream's bookkeeping after
            writer.write(chunk, more=bool(chunk))
            await writer.drain()
        writer.write(b"", more=False)  # (nothing when the stream ended already)
        await writer.drain()
    except asyncio.CancelledError:
        if not left or this.uncancel() > 0:  # this request itself was cancelled (too)
            raise
    finally:
        streaming = False
        starting.cancel()
        if listening is not None:
            listening.cancel()
        writer.close()
