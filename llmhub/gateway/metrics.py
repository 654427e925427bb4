"""Prometheus metrics (prometheus-client). Gateway series are counted in the web process; fleet series
(instances by state, pending instances, GPU-hours) are read from the database at scrape time.

With several web processes (`llmhub.web` sets PROMETHEUS_MULTIPROC_DIR for them) the gateway series are
kept in prometheus-client's multiprocess mode and `registry()` sums every process's files; the in-flight
gauge counts live processes only.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

from django.db.models import Count, DurationField, ExpressionWrapper, F, Sum
from django.db.models.functions import Coalesce, Now
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import REGISTRY, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

requests_total = Counter(
    "llmhub_gateway_requests", "Gateway requests by deployment and HTTP status.", ["deployment", "status"]
)
request_duration = Histogram(
    "llmhub_gateway_request_duration_seconds", "Request received → last byte sent.", ["deployment"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
time_to_first_token = Histogram(
    "llmhub_gateway_time_to_first_token_seconds", "Request received → first streamed event.", ["deployment"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
inflight_requests = Gauge("llmhub_gateway_inflight_requests", "Requests in flight.", ["deployment"],
                          multiprocess_mode="livesum")  # fmt: skip
degraded = Gauge(
    "llmhub_gateway_degraded", "1 while the gateway serves without a dependency (redis, postgresql), else 0.",
    ["dependency"], multiprocess_mode="livemax",
)  # fmt: skip
usage_pending = Gauge(
    "llmhub_gateway_usage_pending", "Usage records kept in this process until PostgreSQL and Redis take them.",
    multiprocess_mode="livesum",
)  # fmt: skip
usage_dropped = Counter(
    "llmhub_gateway_usage_dropped", "Usage records dropped because the outage buffer was full (see the README)."
)


class Series(NamedTuple):
    """One deployment's gateway series, labelled once (`series`)."""

    inflight: Gauge
    duration: Histogram
    ttft: Histogram


@functools.lru_cache(maxsize=4096)
def series(deployment: str) -> Series:
    """The in-flight gauge and the duration and time-to-first-token histograms of `deployment` (its served
    name), looked up (prometheus-client's ``labels()``) once per deployment and process, not per request."""
    return Series(inflight_requests.labels(deployment), request_duration.labels(deployment),
                  time_to_first_token.labels(deployment))  # fmt: skip


@functools.lru_cache(maxsize=4096)
def requests_of(deployment: str, status: int) -> Counter:
    """The request counter of `deployment` (its served name) and HTTP `status`, looked up once per process."""
    return requests_total.labels(deployment, str(status))


class FleetCollector:
    """Instances by state, pending instances and GPU-hours accrued, per deployment, from the database."""

    def describe(self):
        """The series' names without querying (REGISTRY.register calls this at import time)."""
        yield GaugeMetricFamily("llmhub_instances", "Instances by state.", labels=["state"])
        yield GaugeMetricFamily("llmhub_pending_instances", "Instances waiting for capacity.")
        yield GaugeMetricFamily("llmhub_gpu_hours", "GPU-hours accrued.", labels=["deployment", "deploy_id"])

    def collect(self):
        """The fleet series; none while PostgreSQL is down (the gateway's own series are still shown)."""
        from django.db import InterfaceError, OperationalError

        try:
            yield from self._collect()
        except (OperationalError, InterfaceError):
            return

    def _collect(self):
        from llmhub.fleet.models import Instance

        by_state = GaugeMetricFamily("llmhub_instances", "Instances by state.", labels=["state"])
        rows = Instance.objects.exclude(state=Instance.State.STOPPED).values("state").annotate(n=Count("id"))
        counts = {row["state"]: row["n"] for row in rows}
        for state in Instance.LIVE_STATES:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        pending = GaugeMetricFamily("llmhub_pending_instances", "Instances waiting for capacity.")
        pending.add_metric([], counts.get(Instance.State.PENDING, 0))
        yield pending
        uptime = ExpressionWrapper(Coalesce(F("stopped_at"), Now()) - F("started_at"), output_field=DurationField())
        gpu_hours = GaugeMetricFamily(
            "llmhub_gpu_hours", "GPU-hours accrued by instances since they started, per deployment.",
            labels=["deployment", "deploy_id"],
        )  # fmt: skip
        rows = (
            Instance.objects.filter(started_at__isnull=False)
            .values("deployment__deploy_id", "deployment__user__username", "deployment__model_name")
            .annotate(seconds=Sum(uptime), gpus=F("deployment__num_gpus"))
        )
        for row in rows:
            name = f"{row['deployment__user__username']}/{row['deployment__model_name']}"
            hours = row["seconds"].total_seconds() / 3600 * row["gpus"] if row["seconds"] else 0.0
            gpu_hours.add_metric([name, row["deployment__deploy_id"]], hours)
        yield gpu_hours


REGISTRY.register(FleetCollector())


def registry() -> CollectorRegistry:
    """What /metrics shows: this process's registry, or with several web processes (PROMETHEUS_MULTIPROC_DIR)
    the sum over all of them plus the fleet series."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)
    combined.register(FleetCollector())
    return combined
