"""A 503 instead of a 500 while PostgreSQL is down: the dashboard answers a plain "temporarily unavailable"
page, the deploy API ``{"detail": ...}`` (its error shape), both with Retry-After. No traceback reaches the
client or the log for an outage: one warning line per request names the error.

`DatabaseUnavailableMiddleware` turns a database error raised by a view (sessions and users are loaded
lazily, inside the view) into that answer; `server_error` (the site's handler500) does the same for one
raised by a middleware, and is Django's plain 500 page otherwise. The gateway (/v1/openai) has its own
OpenAI-shaped 503 (`gateway.asgi`).
"""

from __future__ import annotations

import json
import logging
import sys

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.template.loader import render_to_string
from django.views import defaults

log = logging.getLogger(__name__)

DATABASE_ERRORS = (OperationalError, InterfaceError)
RETRY_AFTER = 30  # seconds
MESSAGE = f"LLMHub is temporarily unavailable (its database is not answering); retry in {RETRY_AFTER} s."


def unavailable_response(path: str) -> HttpResponse:
    """The 503 for `path`: JSON ``{"detail": MESSAGE}`` under /deploy/ (the deploy API) and /v1/, else the
    HTML page (rendered without context processors: they would query the database)."""
    if path.startswith(("/deploy/", "/v1/")):
        response = HttpResponse(json.dumps({"detail": MESSAGE}), status=503, content_type="application/json")
    else:
        response = HttpResponse(render_to_string("unavailable.html", {"retry_after": RETRY_AFTER}), status=503)
    response["Retry-After"] = str(RETRY_AFTER)
    return response


class DatabaseUnavailableMiddleware:
    """Answers a view's OperationalError / InterfaceError with `unavailable_response` (sync and async)."""

    sync_capable = async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, DATABASE_ERRORS):
            log.warning("%s %s: 503, the database is unreachable (%s)", request.method, request.path,
                        str(exception).splitlines()[0] if str(exception) else type(exception).__name__)  # fmt: skip
            return unavailable_response(request.path)
        return None


def server_error(request):
    """handler500: the 503 of `unavailable_response` when the error being handled is a database outage,
    else Django's plain 500 page."""
    if isinstance(sys.exc_info()[1], DATABASE_ERRORS):
        return unavailable_response(request.path)
    return defaults.server_error(request)
