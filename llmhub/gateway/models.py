"""What the gateway records: one row per request (usage, status, latency), written in batches."""

from django.conf import settings
from django.db import models


class UsageRecord(models.Model):
    """One gateway request. Tokens come from the engine's `usage` (OpenAI Chat Completions API); for a
    response cache hit, from the cached answer's (no engine was asked: billing counts instance uptime only)."""

    deployment = models.ForeignKey("deployments.Deployment", on_delete=models.CASCADE, related_name="usage")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage")
    created_at = models.DateTimeField(db_index=True)
    endpoint = models.CharField(max_length=32)  # "chat/completions" or "completions"
    stream = models.BooleanField(default=False)
    status = models.PositiveSmallIntegerField()  # HTTP status; 499 when the client went away
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(help_text="Request received → last byte sent, milliseconds.")
    ttft_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Time to first token, milliseconds.")
    idempotency_key = models.UUIDField(
        null=True, unique=True, editable=False,
        help_text="Made by the gateway for each request, so that a record kept through an outage and written "
        "again is stored once (gateway/usage_buffer.py).",
    )  # fmt: skip
    cache = models.CharField(
        max_length=4,
        blank=True,
        choices=[("hit", "hit"), ("miss", "miss")],
        help_text="Response cache: hit (answered from the cache, no engine request), miss, or blank (not cacheable).",
    )

    class Meta:
        indexes = [models.Index(fields=["deployment", "created_at"])]
        ordering = ["-created_at"]


class RequestLog(models.Model):
    """One request's prompt and response with its usage, kept only for a deployment whose owner turned request
    logging on (`Deployment.request_logging`), for `LLMHUB_REQUEST_LOG_DAYS` days (see `request_log`).

    Streams are stored as the assembled text, never the raw Server-Sent Events.
    """

    deployment = models.ForeignKey("deployments.Deployment", on_delete=models.CASCADE, related_name="request_logs")
    created_at = models.DateTimeField(db_index=True)  # the purge deletes by age across deployments
    model = models.CharField(max_length=200, help_text="The model name the request asked for.")
    endpoint = models.CharField(max_length=32)  # "chat/completions", "completions", …
    stream = models.BooleanField(default=False)
    status = models.PositiveSmallIntegerField()  # HTTP status; 499 when the client went away
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(help_text="Request received → last byte sent, milliseconds.")
    messages = models.JSONField(null=True, blank=True, help_text="The chat messages as sent (chat requests).")
    prompt = models.TextField(help_text="The prompt as text (chat messages one per line as 'role: content').")
    response = models.TextField(blank=True, help_text="The answer's text (a stream's deltas assembled).")

    class Meta:
        indexes = [models.Index(fields=["deployment", "-created_at", "-id"], name="request_log_newest")]
        ordering = ["-created_at", "-id"]
