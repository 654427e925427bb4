"""Helpers for billing tests: instants in UTC, instance intervals as the reconciler records them."""

from datetime import UTC, datetime
from decimal import Decimal

from llmhub.fleet.models import Host, Instance

MONDAY = datetime(2026, 3, 2, tzinfo=UTC)  # Monday of ISO week 2026-W10


def at(day: int, hour: int = 0, minute: int = 0, second: int = 0, month: int = 3) -> datetime:
    """An instant of 2026 in UTC (March by default)."""
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


def run(deployment, host: Host, start: datetime, stop: datetime | None = None) -> Instance:
    """An instance of `deployment` on `host` whose container ran from `start` to `stop` (None: still runs)."""
    return Instance.objects.create(
        deployment=deployment,
        host=host,
        gpu_indexes=list(range(deployment.num_gpus)),
        gpu_type_id=deployment.gpu_type_id,  # the billable facts, as placement fixes them
        num_gpus=deployment.num_gpus,
        state=Instance.State.STOPPED if stop else Instance.State.READY,
        container_id="c",
        port=40000,
        started_at=start,
        ready_at=start,
        stopped_at=stop,
    )


def usd(value) -> Decimal:
    return Decimal(value).quantize(Decimal("0.01"))
