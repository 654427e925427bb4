"""OpenAI-compatible endpoints under /v1/openai/ (Bearer API token auth)."""

import functools

from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from llmhub.accounts.selectors import bearer_secret
from llmhub.accounts.services import aapi_token_authenticate
from llmhub.deployments.models import Deployment

from . import services
from .services import GatewayError


def openai_api(view):
    """Authenticate the Bearer token (401 otherwise) and turn GatewayError into OpenAI-shaped errors."""

    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        try:
            user = await aapi_token_authenticate(bearer_secret(request.headers.get("Authorization")))
            if user is None:
                raise GatewayError(401, "Missing or invalid API token: send 'Authorization: Bearer <token>'.",
                                   code="invalid_api_key")  # fmt: skip
            return await view(request, user, *args, **kwargs)
        except GatewayError as exc:
            return exc.response()

    return csrf_exempt(wrapper)


async def _proxy(request, user, path: str):
    body = services.parse_body(request.body)
    deployment = await services.deployment_for(user, body["model"])
    return await services.proxy(deployment, path, body)


@require_POST
@openai_api
async def chat_completions(request, user):
    """POST /v1/openai/chat/completions (OpenAI Chat Completions API)."""
    return await _proxy(request, user, "/v1/chat/completions")


@require_POST
@openai_api
async def completions(request, user):
    """POST /v1/openai/completions (OpenAI Completions API)."""
    return await _proxy(request, user, "/v1/completions")


@require_GET
@openai_api
async def models(request, user):
    """GET /v1/openai/models: the user's live deployments as OpenAI model objects."""
    data = [
        {"id": d.full_name, "object": "model", "created": int(d.created_at.timestamp()), "owned_by": user.username}
        async for d in Deployment.objects.select_related("user")
        .filter(user=user, status__in=[Deployment.Status.DEPLOYING, Deployment.Status.RUNNING])
        .order_by("model_name")
    ]
    return JsonResponse({"object": "list", "data": data})
