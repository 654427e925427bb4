"""The OpenAI-compatible proxy: route a request to a ready instance and relay its answer.

Protocol: OpenAI Chat Completions / Completions (JSON in, JSON or Server-Sent Events out), as
served by vLLM's OpenAI-compatible server. Errors use OpenAI's shape:
``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from weakref import WeakKeyDictionary

import httpx
from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from llmhub.accounts.models import User
from llmhub.deployments.models import Deployment
from llmhub.fleet.models import Instance

log = logging.getLogger(__name__)

# In-flight requests per instance id in this process (least-outstanding-requests balancing).
outstanding: defaultdict[int, int] = defaultdict(int)

_clients: WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = WeakKeyDictionary()


class GatewayError(Exception):
    """An error to return to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code

    def response(self) -> JsonResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}
        return JsonResponse(body, status=self.status)


def _client() -> httpx.AsyncClient:
    """One pooled HTTP client per event loop."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        timeout = httpx.Timeout(connect=5.0, read=settings.GATEWAY_UPSTREAM_TIMEOUT, write=30.0, pool=30.0)
        client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=1000))
        _clients[loop] = client
    return client


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body. Raises GatewayError(400) saying what is wrong with it."""
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise GatewayError(400, f"The request body is not valid JSON{where}.", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "Missing 'model': give the deployment's name, e.g. 'username/model-name'.",
                           code="missing_model")  # fmt: skip
    return body


async def deployment_for(user: User, model: str) -> Deployment:
    """The deployment `model` (``username/model_name``) that `user` may use. Raises GatewayError(404)."""
    owner, _, name = model.partition("/")
    deployment = None
    if owner == user.username and name:
        deployment = await (
            Deployment.objects.select_related("user")
            .filter(user=user, model_name=name)
            .exclude(status__in=[Deployment.Status.DELETING, Deployment.Status.DELETED])
            .afirst()
        )
    if deployment is None:
        raise GatewayError(404, f"The model '{model}' does not exist or you do not have access to it.",
                           code="model_not_found")  # fmt: skip
    return deployment


async def ready_instances(deployment: Deployment) -> list[Instance]:
    """Ready instances of `deployment` with their hosts."""
    return [
        i
        async for i in Instance.objects.select_related("host").filter(deployment=deployment, state=Instance.State.READY)
    ]


def pick_instance(instances: list[Instance], exclude: set[int] = frozenset()) -> Instance | None:
    """The instance with the fewest outstanding requests in this process, ties by id; None if none left."""
    candidates = [i for i in instances if i.id not in exclude]
    return min(candidates, key=lambda i: (outstanding[i.id], i.id), default=None)


async def proxy(deployment: Deployment, path: str, body: dict) -> HttpResponse:
    """Relay `body` to `path` (e.g. ``/v1/chat/completions``) on a ready instance of `deployment`.

    Streams (``"stream": true``) are relayed chunk by chunk as they arrive; other answers are
    returned whole with the engine's status. A connect failure is retried on another instance.
    Raises GatewayError 503 (no ready instance), 502 (engine failed) or 402 (suspended by its owner's
    spending limit; code ``spending_limit_reached``, the message names the limit).
    """
    if deployment.status == Deployment.Status.FAILED:
        raise GatewayError(503, f"The deployment '{deployment.full_name}' failed: {deployment.fail_reason[:200]}",
                           type="server_error", code="deployment_failed")  # fmt: skip
    if deployment.status == Deployment.Status.SUSPENDED:
        from llmhub.billing.selectors import spending_limit_message

        raise GatewayError(402, await spending_limit_message(deployment), type="insufficient_quota",
                           code="spending_limit_reached")  # fmt: skip
    instances = await ready_instances(deployment)
    tried: set[int] = set()
    while (instance := pick_instance(instances, tried)) is not None:
        tried.add(instance.id)
        request = _client().build_request("POST", f"{instance.base_url}{path}", json=body)
        outstanding[instance.id] += 1
        try:
            upstream = await _client().send(request, stream=True)
        except httpx.ConnectError:
            outstanding[instance.id] -= 1
            log.warning("instance %s refused a connection; trying another", instance.id)
            continue
        except httpx.HTTPError as exc:
            outstanding[instance.id] -= 1
            raise GatewayError(502, f"The engine failed to answer: {exc.__class__.__name__}.", type="server_error",
                               code="engine_error") from exc  # fmt: skip
        return await _relay(instance.id, upstream, stream=bool(body.get("stream")))
    raise GatewayError(503, f"The deployment '{deployment.full_name}' has no ready instance yet; retry shortly.",
                       type="server_error", code="no_ready_instance")  # fmt: skip


async def _relay(instance_id: int, upstream: httpx.Response, *, stream: bool) -> HttpResponse:
    content_type = upstream.headers.get("content-type", "application/json")
    if not stream or upstream.status_code != 200:
        try:
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            raise GatewayError(
                502, "The engine broke off its answer.", type="server_error", code="engine_error"
            ) from exc
        finally:
            await upstream.aclose()
            outstanding[instance_id] -= 1
        return HttpResponse(content, status=upstream.status_code, content_type=content_type)

    async def chunks():
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError:
            log.warning("instance %s broke off a stream", instance_id)
        finally:
            await upstream.aclose()
            outstanding[instance_id] -= 1

    response = StreamingHttpResponse(chunks(), content_type=content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
