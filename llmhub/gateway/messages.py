"""What passes through the gateway, as bytes: request bodies checked and patched for the engine, answers
(whole or streamed), and the usage read from the engine's answers without parsing more than needed.

Protocol: OpenAI Chat Completions / Completions (JSON in, JSON or Server-Sent Events out) as vLLM serves
them; a stream with `stream_options.include_usage` ends with a chunk whose `choices` is empty and whose
`usage` holds the token counts.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from django.http import HttpResponse, StreamingHttpResponse

from .errors import GatewayError

INCLUDE_USAGE = b',"stream_options":{"include_usage":true}}'
_DECODER = json.JSONDecoder()


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
    if "stream_options" in body and not isinstance(body["stream_options"], dict):
        raise GatewayError(400, "'stream_options' must be an object.", code="invalid_stream_options")
    return body


def engine_payload(raw: bytes, body: dict, stream: bool) -> bytes:
    """The request body sent to the engine: the client's bytes as they came, except that a stream always
    asks for usage (`stream_options.include_usage`, spliced in when the client gave no `stream_options`;
    the body re-serialised only when it gave some without it). `body` is `raw` parsed (`parse_body`)."""
    if not stream:
        return bytes(raw)
    options = body.get("stream_options")
    if options is None:
        stripped = bytes(raw).rstrip()
        if stripped.lstrip()[:1] == b"{" and stripped[-1:] == b"}":  # UTF-8 JSON (not UTF-16/32)
            return stripped[:-1] + INCLUDE_USAGE
    elif options.get("include_usage") is True:
        return bytes(raw)
    return json.dumps({**body, "stream_options": {**(options or {}), "include_usage": True}}).encode()


def usage_of(content: bytes) -> dict | None:
    """The `usage` object of a whole OpenAI answer (JSON), read from its last `"usage"` key without parsing
    the rest (the choices may be long); the whole answer is parsed only when that fails. None when absent."""
    at = content.rfind(b'"usage"')
    if at < 0:
        return None
    try:
        text = content[at + 7 :].decode()
        after = text.lstrip()
        if after[:1] == ":":  # a key, not a string value "usage"
            value = after[1:].lstrip()
            parsed, _ = _DECODER.raw_decode(value)
            if isinstance(parsed, dict):
                return parsed
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        parsed = json.loads(content)
    except ValueError:
        return None
    return parsed.get("usage") if isinstance(parsed, dict) else None


_DECODER = json.JSONDecoder()


def has_usage(events: bytes) -> bool:
    """Whether SSE bytes may hold a usage object (a `"usage"` key that is not `null` everywhere)."""
    found = events.count(b'"usage"')
    return found > 0 and found != events.count(b'"usage":null') + events.count(b'"usage": null')


def without_usage_event(events: bytes, *, keep: bool) -> tuple[bytes, dict | None]:
    """`events` (whole SSE events, each ending in a blank line) without vLLM's usage-only chunk unless
    `keep`, and the last usage object they carry (None when none)."""
    kept, usage = [], None
    for event in events.split(b"\n\n")[:-1]:
        found, usage_only = _event_usage(event)
        usage = found if found is not None else usage
        if not (usage_only and not keep):
            kept.append(event + b"\n\n")
    return b"".join(kept), usage


def _event_usage(event: bytes) -> tuple[dict | None, bool]:
    """(the event's usage object or None, whether it is vLLM's usage-only chunk: `"choices": []`)."""
    if b'"usage"' not in event or b'"usage":null' in event or b'"usage": null' in event:
        return None, False
    try:
        chunk = json.loads(event.split(b"data:", 1)[1])
    except (IndexError, ValueError):
        return None, False
    if not isinstance(chunk, dict):
        return None, False
    usage = chunk.get("usage")
    return (usage if isinstance(usage, dict) else None), not chunk.get("choices")


def _nothing() -> None:
    pass


@dataclass
class Outlet:
    """A way out for a stream's bytes that does not pass through its iterator. A sender that can write from
    synchronous code (the ASGI sender, `gateway.asgi.BodyWriter`) sets `write(data, more)` (`more` False: the
    stream's last bytes, nothing is written after them) and `start` (send the response head now; the first
    `write` sends it otherwise); the relay then writes each piece from the engine connection's read callback
    as it arrives, and sets `pause` and `resume` (reading the engine) for the sender to call while its client
    is not reading. A sender that iterates `Answer.events` only (Django's) leaves `write` None."""

    write: Callable[[bytes, bool], None] | None = None
    start: Callable[[], None] = _nothing
    pause: Callable[[], None] = _nothing
    resume: Callable[[], None] = _nothing


@dataclass
class Answer:
    """What the gateway answers: a whole body, or a stream of SSE bytes (`events`)."""

    status: int
    content_type: str
    body: bytes = b""
    events: AsyncIterator[bytes] | None = None
    outlet: Outlet | None = None  # a stream's other way out (`Outlet`), for a sender that can take it
    extra_headers: dict[str, str] = field(default_factory=dict)  # e.g. x-llmhub-cache
    # A whole answer's bookkeeping (usage, metrics, the in-flight count): called by whoever sends it, once sent.
    finish: Callable[[], None] | None = None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """ASGI response headers: Content-Length for a whole body; no caching, no proxy buffering for a stream."""
        kind = (b"content-type", self.content_type.encode("latin-1"))
        extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.extra_headers.items()]
        if self.events is None:
            return [kind, (b"content-length", str(len(self.body)).encode()), *extra]
        return [kind, (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"), *extra]

    def django(self) -> HttpResponse:
        """The same answer as a Django response (for Django views); a whole answer's `finish` is called."""
        if self.events is None:
            response = HttpResponse(self.body, status=self.status, content_type=self.content_type)
            if self.finish is not None:
                self.finish()
        else:
            response = StreamingHttpResponse(self.events, status=self.status, content_type=self.content_type)
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
        for name, value in self.extra_headers.items():
            response[name] = value
        return response
