"""Errors the gateway answers in OpenAI's shape, and the scrubbing of text shown to users.

Protocol: OpenAI API errors, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import re

from django.http import JsonResponse


class GatewayError(Exception):
    """An error to return to the client in OpenAI's shape; `retry_after` (seconds) sets Retry-After."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 retry_after: int | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.retry_after = status, message, type, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        if self.retry_after is not None:
            response["Retry-After"] = str(self.retry_after)
        return response

    def sse(self) -> bytes:
        """The error as a final SSE event, for a stream whose 200 headers are already sent."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def invalid_token() -> GatewayError:
    return GatewayError(401, "Missing or invalid API token: send 'Authorization: Bearer <token>'.",
                        code="invalid_api_key")  # fmt: skip


_INTERNAL = [
    re.compile(r"\b[a-z][a-z0-9+.-]*://\S*", re.I),  # URLs: http://10.0.0.5:8000/…, tcp://gpu-1:2376, unix:///…
    re.compile(r"\[[0-9a-f:]*:[0-9a-f:]*\](:\d+)?", re.I),  # [IPv6]:port
    re.compile(r"\b\d{1,3}(\.\d{1,3}){3}(:\d+)?\b"),  # IPv4[:port]
    re.compile(r"\b[a-z0-9-]+(\.[a-z0-9-]+)*:\d{2,5}\b", re.I),  # host:port
    re.compile(r"\b[a-z0-9-]+(\.[a-z0-9-]+)*\.(internal|local|lan|corp|intranet|localdomain)\b", re.I),
    re.compile(r"(?<![\w.])/(var/run|run|tmp|etc|root|home|srv)/\S*"),  # host paths (docker.sock, keys)
]


def public_text(text: str, *, limit: int = 200) -> str:
    """`text` (e.g. a deployment's fail_reason) fit to show a user: URLs, IP addresses, host:port pairs,
    internal host names and host paths replaced by ``<internal>``; at most `limit` characters, one line."""
    for pattern in _INTERNAL:
        text = pattern.sub("<internal>", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
