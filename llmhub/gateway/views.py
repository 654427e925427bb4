"""OpenAI-compatible endpoints under /v1/openai/ (Bearer API token auth), and /metrics.

Under ASGI the two POST endpoints are served by `gateway.asgi` before Django's middleware; these views
serve them under WSGI and Django's test client, and GET /models always.
"""

import functools
import hmac

from django.conf import settings
from django.http import Http404, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmhub import unavailable
from llmhub.accounts.selectors import bearer_secret
from llmhub.deployments.models import Deployment

from . import metrics, services
from .degraded import DATABASE_ERRORS
from .errors import GatewayError, invalid_token
from .routing import cache


def openai_api(view):
    """Authenticate the Bearer token (401 otherwise) and turn GatewayError into OpenAI-shaped errors."""

    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        try:
            caller = await cache.caller(bearer_secret(request.headers.get("Authorization")))
            if caller is None:
                raise invalid_token()
            return await view(request, caller, *args, **kwargs)
        except GatewayError as exc:
            return exc.response()
        except DATABASE_ERRORS:  # PostgreSQL is down and this process has not seen the caller or route
            return GatewayError(503, unavailable.MESSAGE, type="server_error", code="service_unavailable",
                                retry_after=unavailable.RETRY_AFTER).response()  # fmt: skip

    return csrf_exempt(wrapper)


@require_POST
@openai_api
async def chat_completions(request, caller):
    """POST /v1/openai/chat/completions (OpenAI Chat Completions API)."""
    return await services.handle(caller, "chat/completions", request.body)


@require_POST
@openai_api
async def completions(request, caller):
    """POST /v1/openai/completions (OpenAI Completions API)."""
    return await services.handle(caller, "completions", request.body)


@require_POST
@openai_api
async def embeddings(request, caller):
    """POST /v1/openai/embeddings (OpenAI Embeddings API), for deployments with task embed."""
    return await services.handle(caller, "embeddings", request.body)


@require_GET
@openai_api
async def models(request, caller):
    """GET /v1/openai/models: the caller's live deployments as OpenAI model objects, each followed by its LoRA
    adapters (``username/model:adapter``, with ``parent`` the deployment's name). Embedding deployments are
    listed like the others (they answer /v1/openai/embeddings only)."""
    data = []
    async for d in (
        Deployment.objects.select_related("user")
        .filter(user_id=caller.user_id, status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING])
        .order_by("model_name")
    ):
        created = int(d.created_at.timestamp())
        data.append({"id": d.full_name, "object": "model", "created": created, "owned_by": caller.username})
        data += [{"id": f"{d.full_name}:{a.name}", "object": "model", "created": created, "owned_by": caller.username,
                  "parent": d.full_name} for a in d.adapters]  # fmt: skip
    return JsonResponse({"object": "list", "data": data})


@require_GET
def metrics_view(request):
    """GET /metrics in Prometheus' text format; needs `Authorization: Bearer <LLMHUB_METRICS_TOKEN>`."""
    if not settings.METRICS_TOKEN:
        raise Http404("Metrics are off: set LLMHUB_METRICS_TOKEN.")
    given = bearer_secret(request.headers.get("Authorization")) or ""
    if not hmac.compare_digest(given.encode(), settings.METRICS_TOKEN.encode()):
        return HttpResponse(
            "Send Authorization: Bearer <LLMHUB_METRICS_TOKEN>.\n", status=401, content_type="text/plain"
        )
    return HttpResponse(generate_latest(metrics.registry()), content_type=CONTENT_TYPE_LATEST)
