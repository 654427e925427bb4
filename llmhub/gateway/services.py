"""The OpenAI-compatible proxy: route a request to a ready instance and relay its answer.

Protocol: OpenAI Chat Completions / Completions (JSON in, JSON or Server-Sent Events out), as
served by vLLM's OpenAI-compatible server. Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

The hot path makes no database query: callers and routes come from `routing.cache`; usage records
are buffered and written by the background task in `load`. A request to a deployment scaled to zero
wakes it and is held until an instance is ready (streams get SSE keepalive comments meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q
from django.http import HttpResponse
from django.utils import timezone

from llmhub.deployments.models import Deployment
from llmhub.deployments.timeline import event_record
from llmhub.queue import reconcile_soon

from . import holding, load, messages, metrics, request_log, response_cache, upstream, usage_buffer
from .errors import GatewayError, invalid_token, public_text
from .limits import HeldSlot, held_slot_take, rate_limit
from .messages import Answer, Outlet, engine_payload, parse_body
from .prefix import prefix_key
from .routing import Caller, Route, cache

__all__ = ["Answer", "GatewayError", "answer", "handle", "wake"]  # GatewayError re-exported for the views

log = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"
END = b""  # yielded by a stream once the engine's answer is complete (nothing more will be sent)


@dataclass
class Call:
    """One request passing through: where it goes and what it costs (filled in as it proceeds)."""

    caller: Caller
    route: Route
    endpoint: str
    body: dict  # the request as parsed
    payload: bytes  # the request as sent to the engine (`engine_payload`)
    stream: bool
    client_wants_usage: bool
    started: float
    held: HeldSlot | None = None  # this request's place among its user's held requests, while it has one
    first_event: float | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache: str = ""  # the response cache: "hit", "miss" (cacheable, asked the engine) or "" (not cacheable)
    log: request_log.Capture | None = None  # the prompt and answer, when the deployment keeps request logs
    partial: bytes = b""  # a stream's bytes past its last complete event, until the rest of the event comes

    def finish(self) -> None:
        """Record usage (buffered) and metrics; release the in-flight count (and a held slot left over)."""
        now = time.monotonic()
        if self.held is not None and not self.held.released:
            asyncio.ensure_future(self.held.release())
        load.inflight[self.route.deployment_id] -= 1
        name = self.route.full_name
        series = metrics.series(name)
        series.inflight.dec()
        metrics.requests_of(name, self.status).inc()
        series.duration.observe(now - self.started)
        if self.first_event is not None:
            series.ttft.observe(self.first_event - self.started)
        ttft = self.first_event if self.first_event is not None else (now if not self.stream else None)
        usage = usage_buffer.Usage(
            self.route.deployment_id, self.caller.user_id, time.time(), self.endpoint, self.stream, self.status,
            self.prompt_tokens, self.completion_tokens, latency_ms=round((now - self.started) * 1000),
            ttft_ms=round((ttft - self.started) * 1000) if ttft is not None else None, cache=self.cache,
        )  # fmt: skip
        usage_buffer.keep(usage)
        if self.log is not None:
            request_log.record(self.log, usage=usage)

    def relay(self, data: bytes) -> bytes:
        """What of a stream's next `data` goes to the client now: its events up to the last complete one,
        unparsed, unless they carry a usage object: then they are split into events, so that the usage chunk
        vLLM sends last is read for the usage record and dropped unless the client asked for it. The first
        event's time is the request's time to first token; a kept request log gets the events."""
        if self.partial:
            data = self.partial + data
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            self.partial = data
            return b""
        events, self.partial = data[:end], data[end:]
        if self.first_event is None:
            self.first_event = time.monotonic()
        if self.log is not None:
            self.log.event(events)
        if messages.has_usage(events):
            events, usage = messages.without_usage_event(events, keep=self.client_wants_usage)
            self.take_usage(usage)
        return events

    def take_usage(self, usage: dict | None) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)


async def handle(caller: Caller, endpoint: str, raw: bytes) -> HttpResponse:
    """`answer` as a Django response (for Django views). Raises GatewayError like `answer`."""
    return (await answer(caller, endpoint, raw)).django()


async def answer(caller: Caller, endpoint: str, raw: bytes) -> Answer:
    """Serve one OpenAI request for `caller` at `endpoint` ("chat/completions", "completions" or
    "embeddings"; an embeddings answer is never streamed, its usage has prompt tokens only).

    A whole answer carries `Answer.finish` (usage, metrics, the in-flight count), which its sender calls once
    the answer is sent (`Answer.django` does); a stream does its own at its end, after yielding `END`.

    Raises GatewayError: 400 bad body or an endpoint the deployment's task does not serve, 402 suspended by the spending limit, 404 unknown model, 429 rate
    limit or too many held requests (before any stream starts), 503 failed deployment or no instance in
    time, 502 engine failure; 401 when a held request's token was revoked meanwhile.
    """
    load.ensure_background()
    await rate_limit(caller)
    body = parse_body(raw)
    route = await cache.route(caller, body["model"])
    if route is None:
        raise GatewayError(404, f"The model '{body['model']}' does not exist or you do not have access to it.",
                           code="model_not_found")  # fmt: skip
    check_task(route, endpoint)
    await check_servable(route)
    stream = endpoint != "embeddings" and bool(body.get("stream"))
    client_wants_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
    # Always ask vLLM for usage; the extra final chunk is dropped unless the client asked.
    payload = engine_payload(raw, body, stream)
    cache_key = response_cache.cache_key(
        route=route, user_id=caller.user_id, endpoint=endpoint, body=body, stream=stream
    )
    cached = await response_cache.cache_get(cache_key) if cache_key else None
    held = None if route.instances or cached else await held_slot_take(caller)  # 429 now, not inside a stream
    call = Call(caller, route, endpoint, body, payload, stream, client_wants_usage, started=time.monotonic(),
                held=held)  # fmt: skip
    if route.request_logging:
        call.log = request_log.Capture(body)
    load.inflight[route.deployment_id] += 1
    metrics.series(route.full_name).inflight.inc()
    if stream:
        outlet = Outlet()
        return Answer(200, "text/event-stream", events=relay_stream(call, outlet), outlet=outlet)
    try:
        if cached is not None:  # answered from the response cache: no engine request
            whole = response_cache.cached_response(call, cached)
        else:
            whole = await forward_whole(call)
            if cache_key:
                call.cache = "miss"
                whole = await response_cache.cache_keep(cache_key, whole, route.response_cache_seconds)
    except BaseException as exc:  # also a cancelled request (the client left): its bookkeeping now
        if isinstance(exc, GatewayError):
            call.status = exc.status
        call.finish()
        raise
    whole.finish = call.finish  # once the answer is sent (the client's last byte before the bookkeeping)
    return whole


def check_task(route: Route, endpoint: str) -> None:
    """Raise GatewayError(400) when the deployment's task does not serve `endpoint`: embeddings only on
    deployments with task embed (code ``model_not_embedding``), chat and completions only on the others
    (code ``model_is_embedding``)."""
    embed = route.task == Deployment.Task.EMBED
    if endpoint == "embeddings" and not embed:
        raise GatewayError(400, f"The model '{route.full_name}' does not serve embeddings: deploy it with task "
                           "'embed' to use /v1/openai/embeddings.", code="model_not_embedding")  # fmt: skip
    if endpoint != "embeddings" and embed:
        raise GatewayError(400, f"The model '{route.full_name}' serves embeddings only: use /v1/openai/embeddings.",
                           code="model_is_embedding")  # fmt: skip


async def check_servable(route: Route) -> None:
    """Raise GatewayError for a deployment that cannot serve: 503 when it failed, 402 (code
    ``spending_limit_reached``, the message names the limit) when its owner's spending limit suspended it."""
    if route.status == Deployment.Status.FAILED:  # the reason without internal addresses (they are logged)
        raise GatewayError(503, f"The deployment '{route.full_name}' failed: {public_text(route.fail_reason)}",
                           type="server_error", code="deployment_failed")  # fmt: skip
    if route.status == Deployment.Status.SUSPENDED:
        from llmhub.billing.selectors import spending_limit_message

        message = await spending_limit_message(user_id=route.user_id, full_name=route.full_name)
        raise GatewayError(402, message, type="insufficient_quota", code="spending_limit_reached")


async def ready_route(call: Call) -> Route:
    """The route with at least one ready instance: at once when there is one, else wake the deployment
    (scale from zero) and hold until an instance is ready (one poller per deployment, `holding`); a held
    request's caller is checked again when it is released. Raises GatewayError: 401 when its token was
    revoked (or its user deactivated) meanwhile, 404 deleted, 402/503 suspended or failed, 503 after
    GATEWAY_HOLD_TIMEOUT seconds."""
    route = call.route
    if route.instances:
        return route
    try:
        cannot_start(route)
        if route.desired_instances == 0:
            await wake(route)
        deadline = call.started + settings.GATEWAY_HOLD_TIMEOUT
        try:
            fresh = await holding.route_when_ready(call.caller, route.full_name, deadline - time.monotonic())
        except TimeoutError:
            fresh = False
    finally:
        if call.held is not None:
            await call.held.release()
    if await cache.recheck(call.caller) is None:
        raise invalid_token()
    if fresh is None:
        raise GatewayError(404, f"The model '{route.full_name}' was deleted.", code="model_not_found")
    if fresh:
        await check_servable(fresh)
        if fresh.instances:
            call.route = fresh
            return fresh
        cannot_start(fresh)
    raise GatewayError(503, f"No instance of '{route.full_name}' became ready within "
                       f"{settings.GATEWAY_HOLD_TIMEOUT:.0f} s; retry shortly.", type="server_error",
                       code="no_ready_instance", retry_after=30)  # fmt: skip


def cannot_start(route: Route) -> None:
    """Raise GatewayError(503, code ``no_capacity``) when no instance can be placed now (the reconciler's
    reason in `fail_reason` of a live deployment, e.g. "no H100-80GB host has 16 GPUs (the largest has 8)":
    it names no host) rather than holding the request for nothing."""
    if route.fail_reason and route.status in (Deployment.Status.DEPLOYING, Deployment.Status.RUNNING):
        raise GatewayError(503, f"No instance of '{route.full_name}' can start now: {public_text(route.fail_reason)[:200]}. "
                           "Retry later.", type="server_error", code="no_capacity", retry_after=60)  # fmt: skip


async def wake(route: Route) -> bool:
    """Scale a deployment at zero to one instance. Any number of concurrent callers start exactly one
    (a conditional UPDATE claims the wake-up). Returns True for the caller that claimed it."""
    claimed = await (
        Deployment.objects.filter(
            id=route.deployment_id, status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING]
        )
        .filter(Q(target_instances=0) | Q(target_instances__isnull=True, min_instances=0))
        .filter(max_instances__gte=1)
        .aupdate(target_instances=1, busy_at=timezone.now())
    )
    if claimed:
        await sync_to_async(_woken)(route.deployment_id)
    return bool(claimed)


def _woken(deployment_id: int) -> None:
    deployment = Deployment.objects.get(id=deployment_id)
    event_record(deployment=deployment, kind="scaled", message="0 → 1 instance: a request is waiting (scale from zero)")
    reconcile_soon(deployment_id)


async def open_upstream(call: Call) -> tuple[int, upstream.Response]:
    """Send the request to a ready instance (the one holding its prompt's prefix, or the least loaded:
    `load.instance_pick`), trying the others on a connect failure.

    Returns (instance id, the response, its body still to read). Raises GatewayError 503/502.
    """
    route = await ready_route(call)
    tried: set[int] = set()
    key = prefix_key(call.endpoint, call.body) if len(route.instances) > 1 and route.routing == "prefix" else None
    while (choice := load.instance_pick(route, tried, key)) is not None:
        instance_id, base_url, engine_key = choice
        tried.add(instance_id)
        load.outstanding[instance_id] += 1
        try:
            return instance_id, await upstream.pool().post(
                base_url, f"/v1/{call.endpoint}", call.payload, {"Authorization": f"Bearer {engine_key}"}
            )
        except asyncio.CancelledError:  # the client left while the engine's head was awaited
            load.outstanding[instance_id] -= 1
            raise
        except upstream.ConnectFailed:
            load.outstanding[instance_id] -= 1
            cache.forget(call.caller, route.full_name)
            log.warning("instance %s refused a connection; trying another", instance_id)
        except upstream.UpstreamError as exc:
            load.outstanding[instance_id] -= 1
            log.warning("instance %s at %s failed to answer: %r", instance_id, base_url, exc)
            raise GatewayError(502, f"The engine failed to answer ({exc.__class__.__name__}); retry shortly.",
                               type="server_error", code="engine_error") from exc  # fmt: skip
    raise GatewayError(503, f"No instance of '{route.full_name}' answered; retry shortly.", type="server_error",
                       code="no_ready_instance", retry_after=5)  # fmt: skip


async def forward_whole(call: Call) -> Answer:
    """A non-streamed request: the engine's answer whole, with its status; usage taken from it."""
    instance_id, response = await open_upstream(call)
    try:
        content = await response.read()
    except upstream.UpstreamError as exc:
        raise GatewayError(502, "The engine broke off its answer.", type="server_error", code="engine_error") from exc
    finally:
        await response.aclose()
        load.outstanding[instance_id] -= 1
    call.status = response.status
    if call.log is not None:
        call.log.content = content
    if response.status >= 500:
        raise engine_failed(instance_id, response.status, content)
    if response.status == 200:
        call.take_usage(messages.usage_of(content))
    return Answer(response.status, response.headers.get("content-type", "application/json"), body=content)


def engine_failed(instance_id: int, status: int, content: bytes) -> GatewayError:
    """The 502 for an engine's own 5xx: its body (which may name its addresses) goes to the log, not the user.
    Client errors (4xx, e.g. a prompt too long) are passed on as the engine wrote them."""
    log.warning("instance %s answered HTTP %s: %s", instance_id, status, content[:2000])
    return GatewayError(502, f"The engine failed (HTTP {status}); retry shortly.", type="server_error",
                        code="engine_error")  # fmt: skip


class _Keepalives:
    """KEEPALIVE written through `write` every `interval` seconds from a timer until the stream's first
    event (or `stop`), so that no task stands between the request and the engine."""

    def __init__(self, call: Call, write: Callable[[bytes, bool], None], interval: float):
        self._call, self._write, self._interval = call, write, interval
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        if self._call.first_event is None:
            self._write(KEEPALIVE, True)
            self._timer = self._loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        self._timer.cancel()


async def _with_keepalives(awaitable, interval: float):
    """Await `awaitable`, yielding KEEPALIVE every `interval` seconds meanwhile; then yield its result."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                yield task.result()
                return
            yield KEEPALIVE
    finally:
        if not task.done():
            task.cancel()


async def relay_stream(call: Call, outlet: Outlet):
    """Relay an SSE stream as the engine makes it, whole events at a time (`Call.relay`).

    Before the first event (while held for an instance, or while the engine computes the first
    token) the client gets a KEEPALIVE comment every GATEWAY_KEEPALIVE_INTERVAL seconds. When the sender
    gave `outlet` a `write`, the keepalives are written from a timer (`_Keepalives`) and the engine's pieces
    piped to it from the engine connection's read callback (`upstream.Response.pipe`): this generator yields
    only what comes after them (an error event, `END`). Otherwise it yields every byte, keepalives included.
    A client that disconnects cancels this generator, which closes the upstream request.
    """
    interval = settings.GATEWAY_KEEPALIVE_INTERVAL
    instance_id, response, keepalives = None, None, None
    try:
        if outlet.write is not None:
            if not call.route.instances:
                outlet.start()  # held until an instance is ready: the 200 head at once, keepalives meanwhile
            keepalives = _Keepalives(call, outlet.write, interval)
            instance_id, response = await open_upstream(call)
        else:
            async for item in _with_keepalives(open_upstream(call), interval):
                if item is KEEPALIVE:
                    yield KEEPALIVE
                else:
                    instance_id, response = item
        call.status = response.status
        if response.status != 200:  # an engine error (e.g. prompt too long): pass it on as an event
            content = await response.read()
            if call.log is not None:
                call.log.content = content
            if response.status >= 500:
                raise engine_failed(instance_id, response.status, content)
            yield b"data: " + content.replace(b"\n", b" ") + b"\n\n"
            return
        if outlet.write is not None:
            write = outlet.write
            outlet.start()  # the client's response head, now that the engine is at work (unless sent already)

            def sink(data: bytes, last: bool) -> None:
                events = call.relay(data)
                if last:  # the stream's last bytes and its end in one write
                    events, call.partial = events + call.partial, b""
                    write(events, False)
                elif events:
                    write(events, True)

            outlet.pause, outlet.resume = response.pause_reading, response.resume_reading
            response.pipe(sink)
            await response.finished()
        else:
            while True:
                data = await response.next(within=interval if call.first_event is None else None)
                while data is False:  # keepalives until the first token
                    yield KEEPALIVE
                    data = await response.next(within=interval)
                if data is None:
                    break
                if events := call.relay(data):
                    yield events
        if call.partial:
            yield call.partial
        yield END  # the answer is complete: its last byte goes out before the bookkeeping below
    except GatewayError as exc:
        call.status = exc.status
        yield exc.sse()
    except upstream.UpstreamError:
        call.status = 502
        yield GatewayError(502, "The engine broke off the stream.", type="server_error", code="engine_error").sse()
    except asyncio.CancelledError:
        call.status = 499  # the client went away; closing upstream below aborts the engine's work
        raise
    finally:
        if keepalives is not None:
            keepalives.stop()
        if response is not None:
            await response.aclose()
        if instance_id is not None:
            load.outstanding[instance_id] -= 1
        call.finish()
