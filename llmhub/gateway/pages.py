"""The request log on the deployment page (dashboard, owner only): entries with search and paging, and a JSONL
download. Anyone else's deployment does not exist here (404)."""

import json

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from llmhub.deployments.selectors import deployment_get

from .models import RequestLog
from .selectors import request_logs_search

PER_PAGE = 20
MAX_QUERY = 200  # characters of a search


def _query(request) -> str:
    return request.GET.get("q", "").strip()[:MAX_QUERY]


@login_required
@require_GET
def request_logs(request, deploy_id):
    """The request log section (an htmx fragment; a page of its own without htmx): 20 entries a page, newest
    first, `?q=` searching prompts and answers, `?page=` (out of range: the nearest page)."""
    deployment = deployment_get(request.user, deploy_id)
    query = _query(request)
    page = Paginator(request_logs_search(deployment.id, query), PER_PAGE).get_page(request.GET.get("page"))
    context = {"deployment": deployment, "query": query, "page": page, "keep_days": settings.REQUEST_LOG_DAYS}
    template = "gateway/request_logs.html#section" if request.htmx else "gateway/request_logs.html"
    return render(request, template, context)


def log_line(entry: RequestLog) -> str:
    """One JSONL line: time (ISO 8601), model, endpoint, stream, status, tokens, latency (ms), messages,
    prompt, response."""
    return json.dumps(
        {
            "created_at": entry.created_at.isoformat(),
            "model": entry.model,
            "endpoint": entry.endpoint,
            "stream": entry.stream,
            "status": entry.status,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "latency_ms": entry.latency_ms,
            "messages": entry.messages,
            "prompt": entry.prompt,
            "response": entry.response,
        },
        ensure_ascii=False,
    )


@login_required
@require_GET
def request_logs_download(request, deploy_id):
    """Every kept entry (or those matching `?q=`) as JSON Lines, newest first, streamed."""
    deployment = deployment_get(request.user, deploy_id)
    entries = request_logs_search(deployment.id, _query(request)).iterator(chunk_size=500)
    response = StreamingHttpResponse((log_line(e) + "\n" for e in entries), content_type="application/jsonl")
    response["Content-Disposition"] = f'attachment; filename="{deployment.model_name}-requests.jsonl"'
    return response
