"""Reads of gateway usage: per-minute series for the deployment page's charts."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import connection
from django.utils import timezone

BUCKET_SQL = """
SELECT date_bin(%(bucket)s, created_at, %(origin)s) AS t,
       count(*) AS requests,
       coalesce(sum(prompt_tokens), 0) AS prompt_tokens,
       coalesce(sum(completion_tokens), 0) AS completion_tokens,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95
FROM gateway_usagerecord
WHERE deployment_id = %(deployment)s AND created_at >= %(since)s
GROUP BY 1 ORDER BY 1
"""


def usage_series(
    deployment_id: int, *, minutes: int = 60, bucket_minutes: int = 1, now: datetime | None = None
) -> dict:
    """Requests, prompt/completion tokens and latency p50/p95 (ms) per bucket over the last `minutes`.

    Returns {"t": [bucket starts], "requests": [...], "prompt_tokens": [...], "completion_tokens": [...],
    "p50": [...], "p95": [...]}, empty buckets filled with 0. Percentiles: PostgreSQL percentile_cont.
    """
    now = now or timezone.now()
    bucket = timedelta(minutes=bucket_minutes)
    origin = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - bucket_minutes)
    starts = [origin + bucket * i for i in range(minutes // bucket_minutes)]
    with connection.cursor() as cursor:
        cursor.execute(BUCKET_SQL, {"bucket": bucket, "origin": origin, "deployment": deployment_id, "since": origin})
        rows = {row[0]: row[1:] for row in cursor.fetchall()}
    out = {"t": starts, "requests": [], "prompt_tokens": [], "completion_tokens": [], "p50": [], "p95": []}
    for start in starts:
        requests, prompt, completion, p50, p95 = rows.get(start, (0, 0, 0, 0, 0))
        for key, value in zip(("requests", "prompt_tokens", "completion_tokens", "p50", "p95"),
                              (requests, prompt, completion, p50, p95)):  # fmt: skip
            out[key].append(float(value or 0))
    return out


def request_logs_search(deployment_id: int, query: str = ""):
    """The deployment's request log entries, newest first; with `query`, those whose prompt or answer contains
    it (case-insensitive)."""
    from django.db.models import Q

    from .models import RequestLog

    entries = RequestLog.objects.filter(deployment_id=deployment_id)
    if query:
        entries = entries.filter(Q(prompt__icontains=query) | Q(response__icontains=query))
    return entries.order_by("-created_at", "-id")
