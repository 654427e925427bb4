"""Request logging (opt-in per deployment, `Deployment.request_logging`): each request's prompt and answer with
its usage, kept `REQUEST_LOG_DAYS` days.

Cost on the request path: none when logging is off (one attribute test); when on, a reference to the parsed
body and, for a stream, each SSE event appended to a list as it is relayed. Nothing is parsed or written
while the request is served: `record` is called where usage is recorded (`services.Call.finish`, after the
last byte went out) and only queues; `flush` (the gateway's background task, next to the usage records)
assembles the texts in a worker thread and writes them in one INSERT. A stream is stored as its assembled
text (the deltas' `content` or `text` joined), never as raw events (OpenAI Chat Completions / Completions
streaming format, as vLLM sends it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from . import degraded
from .models import RequestLog
from .usage_buffer import Usage

log = logging.getLogger(__name__)

MAX_TEXT = 100_000  # characters kept of one prompt or one answer (the rest is cut, marked TRUNCATED)
MAX_CAPTURE_BYTES = 4 * MAX_TEXT  # bytes of a stream's events held for one request at most
TRUNCATED = "\n[… cut: request logs keep 100,000 characters]"
MAX_PENDING = 10_000  # queued entries per process; past it (the database away for long) the oldest go


@dataclass(slots=True)
class Capture:
    """What one logged request sent and got, as raw as it passed: the parsed request body, and the answer
    (`content` whole, or a stream's `events`)."""

    body: dict
    content: bytes = b""
    events: list[bytes] = field(default_factory=list)
    size: int = 0

    def event(self, event: bytes) -> None:
        """Keep SSE events of a stream (one or several whole events) (until MAX_CAPTURE_BYTES are held)."""
        if self.size < MAX_CAPTURE_BYTES:
            self.events.append(event)
            self.size += len(event)


@dataclass(slots=True)
class Pending:
    capture: Capture
    usage: Usage
    model: str


pending: list[Pending] = []


def record(capture: Capture, *, usage: Usage) -> None:
    """Queue the log entry of a finished request (called where its `usage` record is made); written by `flush`."""
    pending.append(Pending(capture, usage, str(capture.body.get("model", ""))[:200]))
    if len(pending) > MAX_PENDING:
        del pending[: len(pending) - MAX_PENDING]
        log.warning("request log queue full: oldest entries dropped")


async def flush() -> int:
    """Write the queued entries in one INSERT (texts assembled in a worker thread). Returns how many."""
    if not pending:
        return 0
    batch = pending[:]
    del pending[: len(batch)]
    try:
        return await sync_to_async(_write)(batch)
    except degraded.DATABASE_ERRORS as exc:  # PostgreSQL is down: kept in memory for the next round
        degraded.database.failed(exc)
        pending[:0] = batch
        if len(pending) > MAX_PENDING:
            del pending[: len(pending) - MAX_PENDING]
            log.warning("request log queue full: oldest entries dropped")
        return 0


def _write(batch: list[Pending]) -> int:
    try:
        RequestLog.objects.bulk_create([entry(p) for p in batch])
    except degraded.DATABASE_ERRORS:
        close_old_connections()  # the broken connection is replaced on the next round
        raise
    return len(batch)


def entry(item: Pending) -> RequestLog:
    """The RequestLog row of one finished request."""
    usage, body = item.usage, item.capture.body
    messages = body.get("messages") if isinstance(body.get("messages"), list) else None
    return RequestLog(
        deployment_id=usage.deployment_id,
        created_at=usage.created_at_datetime,
        model=item.model,
        endpoint=usage.endpoint,
        stream=usage.stream,
        status=usage.status,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        latency_ms=usage.latency_ms,
        messages=messages,
        prompt=_cut(prompt_text(body)),
        response=_cut(answer_text(item.capture)),
    )


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + TRUNCATED


def _content_text(content) -> str:
    """A message's content: a string, or the text parts of a list of content parts (OpenAI's shape)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def prompt_text(body: dict) -> str:
    """The prompt as text: chat messages one per line as ``role: content``; a completion's `prompt` (a list of
    prompts one per line); an embedding's `input`."""
    if isinstance(body.get("messages"), list):
        return "\n".join(
            f"{m.get('role', '?')}: {_content_text(m.get('content'))}" if isinstance(m, dict) else str(m)
            for m in body["messages"]
        )
    for key in ("prompt", "input"):
        if key in body:
            value = body[key]
            if isinstance(value, list):
                return "\n".join(v if isinstance(v, str) else json.dumps(v) for v in value)
            return value if isinstance(value, str) else json.dumps(value)
    return ""


def _choice_text(choice: dict) -> str:
    for key in ("delta", "message"):
        if isinstance(choice.get(key), dict):
            return _content_text(choice[key].get("content"))
    return choice.get("text") if isinstance(choice.get("text"), str) else ""


def answer_text(capture: Capture) -> str:
    """The answer's text: the first choice's message (or completion text) of a whole answer, the deltas of
    a stream's first choice joined; for an error, the engine's or the gateway's error message."""
    if capture.events:
        parts = []
        for event in capture.events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                    continue
                parts.append(_text_of(line[5:]))
        return "".join(parts)
    return _text_of(capture.content) if capture.content else ""


def _text_of(raw: bytes) -> str:
    """The text of one JSON answer or chunk (choices[0], or an error's message); undecodable: as it came."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
    if not isinstance(data, dict):
        return ""
    if isinstance(data.get("error"), dict) or "message" in data and "choices" not in data:
        error = data.get("error") if isinstance(data.get("error"), dict) else data
        return f"[error] {error.get('message', '')}"
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return "".join(_choice_text(c) for c in choices if isinstance(c, dict) and c.get("index", 0) == 0)
    if isinstance(data.get("data"), list):  # embeddings: the vectors are not text worth keeping
        return f"[{len(data['data'])} embeddings]"
    return ""


def request_logs_purge(*, now: datetime | None = None) -> int:
    """Delete log entries older than `REQUEST_LOG_DAYS` days (beat, hourly). Returns how many went."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.REQUEST_LOG_DAYS)
    deleted, _ = RequestLog.objects.filter(created_at__lt=cutoff).delete()
    return deleted
