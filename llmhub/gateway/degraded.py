"""Serving through an outage of Redis or PostgreSQL: which one is down, said once in the log and in /metrics.

The gateway keeps answering for warm routes while either is down (see the README, "Outages"): with Redis down,
rate limits and held-request limits are not enforced (they *degrade open*) and in-flight counts are not
published; with PostgreSQL down, callers and routes are served from the per-process cache past their TTL and
usage records are kept (`usage_buffer`). Each web process says ``<dependency> is unreachable`` once when it
first fails and ``<dependency> is back`` once when it answers again, and sets the gauge
``llmhub_gateway_degraded{dependency=...}`` to 1 and back to 0.
"""

from __future__ import annotations

import logging
import time

from django.db import InterfaceError, OperationalError
from redis.exceptions import RedisError

from . import metrics

log = logging.getLogger(__name__)

REDIS_ERRORS = (RedisError, OSError, TimeoutError)  # redis-py's connection errors are RedisErrors
DATABASE_ERRORS = (OperationalError, InterfaceError)
RETRY_INTERVAL = 1.0  # seconds: a request skips a dependency that failed less than this ago


class Dependency:
    """The health of one dependency as this process saw it last."""

    def __init__(self, name: str, label: str):
        self.name, self.label = name, label
        self.down = False
        self.failed_at = 0.0
        metrics.degraded.labels(label).set(0)

    def failed(self, exc: BaseException) -> None:
        """Record a failure (logged and shown in /metrics on the first one of an outage only)."""
        self.failed_at = time.monotonic()
        if not self.down:
            self.down = True
            metrics.degraded.labels(self.label).set(1)
            log.error("%s is unreachable (%s: %s); the gateway goes on serving without it", self.name,
                      type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip

    def ok(self) -> None:
        """Record a success (logged and shown in /metrics when it ends an outage)."""
        if self.down:
            self.down = False
            metrics.degraded.labels(self.label).set(0)
            log.warning("%s is back", self.name)

    def resting(self) -> bool:
        """True while the dependency failed less than RETRY_INTERVAL seconds ago: a request does not wait on
        it again (the background round of `load` tries it every second and calls `ok`)."""
        return self.down and time.monotonic() - self.failed_at < RETRY_INTERVAL


redis = Dependency("Redis", "redis")
database = Dependency("PostgreSQL", "postgresql")
